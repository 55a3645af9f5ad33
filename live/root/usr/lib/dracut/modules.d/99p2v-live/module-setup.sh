#!/bin/bash
# p2v live system: the overlay's directories before systemd mounts /sysroot.

# Only when asked for (dracut --add p2v-live).
check() {
    return 255
}

depends() {
    echo dmsquash-live
    return 0
}

install() {
    inst_hook pre-mount 99 "$moddir/overlay-dirs.sh"
}
