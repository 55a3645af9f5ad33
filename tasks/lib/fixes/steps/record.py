"""The conversion record inside the image (/var/lib/p2v/conversion.json)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.lib.paths import read_text_in_root, resolve_in_root, write_text_in_root

# Inside the target: what p2v did, for the server's next administrator, and
# what lets a rerun see that the initrd is already current.
CONVERSION_RECORD = "/var/lib/p2v/conversion.json"


def _read_record(root: Path) -> dict[str, Any]:
    text = read_text_in_root(root, CONVERSION_RECORD)
    try:
        data = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(root: Path, record: Mapping[str, Any]) -> None:
    resolve_in_root(root, os.path.dirname(CONVERSION_RECORD)).mkdir(parents=True, exist_ok=True)
    write_text_in_root(root, CONVERSION_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n", mode=0o644)
