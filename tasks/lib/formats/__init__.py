"""One module per on-disk format of a source server, each parser working on text.

The parsers read; the rewriters are still in the fix steps (`tasks/lib/fixes/`).
"""
