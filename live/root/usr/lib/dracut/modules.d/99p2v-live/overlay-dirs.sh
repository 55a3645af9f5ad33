#!/bin/sh
# dracut 059 makes /run/overlayfs and /run/ovlwork only in its mount hook,
# after systemd has tried to mount the overlay at /sysroot (and printed a
# FAILED line on every boot). Make them first: sysroot.mount then succeeds, and
# the mount hook finds the root mounted already.
mkdir -m 0755 -p /run/overlayfs /run/ovlwork
