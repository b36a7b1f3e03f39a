#!/usr/bin/env bash
# Build a small directory of disk images for trying imgfs out (`make demo` calls this).
#
#   contrib/make-demo-images.sh DIR
#
# Makes, in DIR:
#   disk.img   64 MiB raw disk: MBR partition table (sfdisk), partition 1 = ext4 labelled
#              "imgfs-demo" holding README.txt, data.bin (1 MiB random) and SHA256SUMS
#   blank.raw  1 GiB raw, empty and sparse
#   disk.* in every other format imgfs writes or reads, disk-snap.qcow2 (an internal snapshot),
#   disk-luks.qcow2 (encrypted; passphrase "demo" in disk-luks.qcow2.key: mount with
#   --key-dir DIR) and share.vvfat/ (a directory exported as a FAT32 disk)
#
# An image that already exists is kept (delete it, or DIR, to make it again). Each one is built
# under a temporary name and renamed when complete, so an interrupted run leaves no half image.
# Needs: util-linux (sfdisk is in Debian's `fdisk` package), e2fsprogs, coreutils. No loop
# devices, no root.
set -euo pipefail

if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
export PATH="$PATH:/usr/sbin:/sbin"       # sfdisk and mkfs.ext4 live there
mkdir -p "$dir"

tmp=
scratch=
cleanup() {
    [ -z "$tmp" ] || rm -f "$tmp"
    [ -z "$scratch" ] || rm -rf "$scratch"
}
trap cleanup EXIT

# make_image NAME COMMAND [ARG...]: unless DIR/NAME exists, run COMMAND ARG... TMPFILE, then
# rename TMPFILE to DIR/NAME.
make_image() {
    local name=$1
    shift
    if [ -e "$dir/$name" ]; then
        echo "  kept  $dir/$name"
        return
    fi
    tmp="$dir/.$name.tmp"
    rm -f "$tmp"
    "$@" "$tmp"
    mv -f "$tmp" "$dir/$name"
    tmp=
    echo "  made  $dir/$name"
}

# A 64 MiB disk: an MBR label with one Linux partition from 1 MiB to the end, and an ext4
# filesystem written straight into that partition with mkfs.ext4 -E offset= (no loop device).
build_disk() {
    local out=$1 start size
    truncate -s 64M "$out"
    printf 'label: dos\nlabel-id: 0x696d6766\nstart=2048, type=83, bootable\n' \
        | sfdisk --quiet "$out"
    # partition 1 as sfdisk laid it out, in 512-byte sectors
    read -r start size < <(sfdisk --dump "$out" \
        | sed -n 's/^.*1 : *start= *\([0-9]*\), *size= *\([0-9]*\),.*$/\1 \2/p')
    [ -n "${start:-}" ] && [ -n "${size:-}" ] || { echo "$0: cannot read partition 1" >&2; exit 1; }

    scratch=$(mktemp -d)
    cat >"$scratch/README.txt" <<'EOF'
This ext4 filesystem lives in partition 1 of demo/images/disk.img.
imgfs exports that image as MOUNTPOINT/disk.img.raw; to look inside, as root:
    losetup -fP --show mnt/disk.img.raw       # prints /dev/loopN
    mount -o ro /dev/loopNp1 /media
    (cd /media && sha256sum -c SHA256SUMS)
    umount /media; losetup -d /dev/loopN
EOF
    head -c 1M /dev/urandom >"$scratch/data.bin"
    (cd "$scratch" && sha256sum README.txt data.bin >SHA256SUMS)

    mkfs.ext4 -q -F -L imgfs-demo -E "offset=$((start * 512))" -d "$scratch" \
        "$out" "$((size / 2))k"
    rm -rf "$scratch"
    scratch=
}

# 1 GiB of nothing: every block a hole.
build_blank() {
    truncate -s 1G "$1"
}

echo "demo images in $dir:"
make_image disk.img  build_disk
make_image blank.raw build_blank

# --- More formats -------------------------------------------------------------------------
# Each one converts disk.img, so the same partition table and ext4 filesystem appear through
# every format, and `cmp mnt/disk.img.raw mnt/disk.qcow2.raw` must say nothing.
#
convert_to() { qemu-img convert -f raw -O "$1" "${@:2:$#-2}" "$dir/disk.img" "${!#}"; }
#
make_image disk.qcow2     convert_to qcow2
make_image disk-z.qcow2   convert_to qcow2 -c              # compressed clusters
make_image disk.qcow      convert_to qcow
make_image disk.vmdk      convert_to vmdk
make_image disk-stream.vmdk convert_to vmdk -o subformat=streamOptimized
# (not monolithicFlat or twoGbMaxExtent*: renaming the temporary file would break the extent
# names their descriptors hold)
make_image disk.vhd       convert_to vpc -o force_size=on
#                           # (without force_size qemu rounds the size up to a CHS geometry)
make_image disk.vhdx      convert_to vhdx
make_image disk.vdi       convert_to vdi
make_image disk.qed       convert_to qed
make_image disk.hds       convert_to parallels
# An internal snapshot: mounted, disk-snap.qcow2@installed.raw appears beside disk-snap.qcow2.raw.
make_image disk-snap.qcow2 sh -c 'qemu-img convert -f raw -O qcow2 "$0" "$1" &&
    qemu-img snapshot -c installed "$1"' "$dir/disk.img"
# Encrypted (LUKS inside qcow2); the passphrase file beside it is found by `--key-dir DIR`.
# qemu-img sometimes fails to create LUKS images ("Unable to get accurate CPU usage"): retried.
[ -e "$dir/disk-luks.qcow2.key" ] || printf '%s' demo > "$dir/disk-luks.qcow2.key"
make_luks() {
    local try
    for try in 1 2 3 4 5; do
        if qemu-img convert -f raw -O qcow2 --object "secret,id=k,file=$dir/disk-luks.qcow2.key" \
            -o encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=100 "$dir/disk.img" "$1" \
            2>/dev/null; then
            return 0
        fi
    done
    echo "qemu-img could not create the LUKS demo image" >&2
    return 1
}
make_image disk-luks.qcow2 make_luks
#
# qemu-img cannot write cloop, bochs, UML cow or dmg images: their own tools make them. The cow
# file is an overlay on a copy of disk.img (imgfs exports a base image read-only, and disk.img
# should stay writable).
make_image disk.cloop     sh -c 'create_compressed_fs -q -B 65536 "$0" "$1" >/dev/null 2>&1' "$dir/disk.img"
make_image disk.bochs     sh -c 'bximage -func=convert -imgmode=growing -q "$0" "$1" >/dev/null' "$dir/disk.img"
make_image cow-base.img  cp --sparse=always "$dir/disk.img"
make_image disk.cow       sh -c 'uml_mkcow -f "$1" "$0" >/dev/null' "$(realpath "$dir")/cow-base.img"
# A sample from the shared corpus, when it is there (nothing here writes dmg).
corpus=$(dirname "$0")/../../shared/corpus
if [ -f "$corpus/dmg/node-udif/compression-zlib.dmg" ]; then
    make_image sample.dmg cp "$corpus/dmg/node-udif/compression-zlib.dmg"
fi
# A host directory shown as a FAT32 disk (vvfat): share.vvfat.raw.
make_image share.vvfat sh -c 'mkdir -p "$1/docs" && printf "hello from a host directory\n" \
    > "$1/hello.txt" && cp "$0" "$1/docs/"' "$(dirname "$0")/../README.md"
