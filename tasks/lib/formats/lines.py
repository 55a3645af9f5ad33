"""The lossless view shared by every format: a file as its lines, each with its own ending.

The parsers build lossy models (the values a file sets, not how it spells
them), so a file is never re-rendered from a model: `render(load(text))` is
`text` byte for byte, comments, spacing, CRLF and a missing last newline
included, and a rewriter replaces only the lines it must change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextLines:
    """A text file as lines without their endings, and the endings apart (the last may be "")."""

    lines: tuple[str, ...]
    endings: tuple[str, ...]

    def render(self) -> str:
        return "".join(line + end for line, end in zip(self.lines, self.endings, strict=True))

    def with_lines(self, replaced: dict[int, str]) -> TextLines:
        """Lines replaced by index (0-based); every other line, and every ending, as it was."""
        return TextLines(tuple(replaced.get(i, line) for i, line in enumerate(self.lines)), self.endings)


def load(text: str) -> TextLines:
    lines: list[str] = []
    endings: list[str] = []
    for raw in text.splitlines(keepends=True):
        body = raw.splitlines()[0] if raw.splitlines() else ""
        lines.append(body)
        endings.append(raw[len(body):])
    return TextLines(tuple(lines), tuple(endings))


def render(document: TextLines) -> str:
    return document.render()


def with_newline(lines: list[str]) -> str:
    """Lines joined as a rewriter writes them: each ends in a newline."""
    return "".join(line + "\n" for line in lines)
