"""The doing of the fix stage's steps, in the chroot of the mounted target (tasks/fix.py runs them
in order). What each step changes is planned, purely, in the modules of tasks/lib/fixes/ above."""
