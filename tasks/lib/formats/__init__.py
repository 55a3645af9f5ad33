"""One module per on-disk format of a source server: its parser and its rewriters, working on text.

Every module also offers `load`/`render` (tasks/lib/formats/lines.py): the
parsers' models are lossy, so a file is rewritten line by line from its own
text and never re-rendered from a model; what a format does not touch stays
byte for byte. The fix steps (tasks/lib/fixes/) decide what changes and call
these modules to change it. docs/architecture.md says why no library
(ruamel.yaml, python-augeas) does this.
"""
