"""The p2v live system: what a server PXE-boots into to convert itself.

`bin/live-build` (live.build) makes a kernel, a dracut initrd and a squashfs
root with p2v, its venv and every tool the stages call, cached under
`$P2V_CACHE/live/<key>/`. Modules here import only the standard library at
load time: a cached build answers before `tasks` (the whole pipeline) loads.
"""
