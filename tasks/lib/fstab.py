"""The old home of the fstab parser: it lives in tasks/lib/formats/fstab.py now."""

from __future__ import annotations

from tasks.lib.formats.fstab import (
    LOCAL_FS,
    NETWORK_FS,
    PSEUDO_FS,
    FstabEntry,
    mount_order,
    parse_fstab,
    skip_reason,
    source_kind,
    unescape,
)

__all__ = ["LOCAL_FS", "NETWORK_FS", "PSEUDO_FS", "FstabEntry", "mount_order", "parse_fstab", "skip_reason",
           "source_kind", "unescape"]
