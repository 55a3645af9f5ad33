"""Distro families: what p2v does differently per distribution, behind one interface.

`pick_family(os)` returns the source's `Family` (tasks/lib/distro/base.py):
the first of `FAMILIES` that claims the layout's OS identity, or `Other`,
which keeps the answers p2v gave before families for a distribution it has
none for. One module per family:

    debian    Debian and its derivatives but Ubuntu
    ubuntu    Ubuntu
    el6       Enterprise Linux 6 (and an EL of unknown version)
    el7       Enterprise Linux 7
    el8plus   Enterprise Linux 8 and later, Fedora, Amazon Linux 2023
    other     anything else (not in FAMILIES: the fallback)

A new family (SUSE, say) is one module with a `Family` subclass and its line
in FAMILIES, before any family that would also claim it.
"""

from __future__ import annotations

from tasks.lib.distro.base import AUTORELABEL, Family
from tasks.lib.distro.debian import Debian
from tasks.lib.distro.el6 import EL6
from tasks.lib.distro.el7 import EL7
from tasks.lib.distro.el8plus import EL8Plus
from tasks.lib.distro.other import Other
from tasks.lib.distro.ubuntu import Ubuntu
from tasks.lib.source.model import OSIdentity, SystemDescription

# In the order they are asked: a more specific family before the one it narrows (Ubuntu before Debian).
FAMILIES: tuple[type[Family], ...] = (
    Ubuntu,
    Debian,
    EL6,
    EL7,
    EL8Plus,
)

__all__ = ["AUTORELABEL", "EL6", "EL7", "FAMILIES", "Debian", "EL8Plus", "Family", "Other", "Ubuntu",
           "family_of_system", "pick_family"]


def pick_family(os: OSIdentity) -> Family:
    """The family of the source whose OS identity (layout.json's system.os) is `os`."""
    family = next((candidate for candidate in FAMILIES if candidate.matches(os)), Other)
    return family(os)


def family_of_system(system: SystemDescription) -> Family:
    return pick_family(system.os)
