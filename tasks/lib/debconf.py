"""debconf's answer database (`/var/cache/debconf/config.dat`): read one question's value.

The file is a list of RFC 822-style stanzas separated by blank lines:

    Name: grub-pc/install_devices
    Template: grub-pc/install_devices
    Value: /dev/disk/by-id/ata-ST500DM002-1BD142_W2A1B2C3
    Owners: grub-pc
    Flags: seen

p2v never writes this file itself: answers are changed in the chroot with
`debconf-set-selections`, debconf's own interface, and read back from here.
"""

from __future__ import annotations

CONFIG_DAT = "/var/cache/debconf/config.dat"


def question_value(text: str, question: str) -> str | None:
    """The `Value:` of `question`, "" when it has none, None when the question is absent."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith((" ", "\t")):
                fields[key.strip()] = value.strip()
        if fields.get("Name") == question:
            return fields.get("Value", "")
    return None
