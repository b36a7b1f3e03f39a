#!/usr/bin/env bash
# Benchmark imgfs side by side with qemu-storage-daemon (and the raw file itself, "phys") using
# the shared FUSE-exporter harness ../../shared/bench/peers.sh. imgfs is added as two extra peers:
#
#   imgfs       imgfs mount --foreground (default --cache writeback: buffered host I/O, reads
#               inline on the trio thread with RWF_NOWAIT)
#   imgfs-none  the same with --cache none (O_DIRECT host file: every read/write on the pool)
#
# Both stay in the foreground so the harness knows their pid; they log to {mdir}/imgfs.log.
# The harness names the raw template image "raw.raw"; imgfs exports every image NAME as
# NAME.raw, so the exported file is {mnt}/raw.raw.raw ({name}.raw).
#
# Usage: bench/run.sh [peers.sh options]   (extra options are passed through and win over the
#        defaults below, e.g. bench/run.sh --dry-run, bench/run.sh --reps 5 --runtime 5)
# Results: bench/results/peers-<date>.* (gitignored). Needs root (FUSE, tracefs for the probe).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
peers_sh=$(dirname "$0")/../../shared/bench/peers.sh
imgfs=$repo/.venv/bin/imgfs

[ -x "$peers_sh" ] || [ -f "$peers_sh" ] || { echo "run.sh: $peers_sh not found" >&2; exit 1; }
[ -x "$imgfs" ] || { echo "run.sh: $imgfs not found (make venv)" >&2; exit 1; }
for tool in fio qemu-storage-daemon qemu-img fusermount3; do
    command -v "$tool" >/dev/null || {
        echo "run.sh: $tool missing: apt-get install -y fio qemu-system-common qemu-utils fuse3" >&2
        exit 1
    }
done

mount_cmd="$imgfs mount --foreground --log {mdir}/imgfs.log {imgdir} {mnt}"
common=";; {mnt}/{name}.raw ;; formats=raw ;; umount=$imgfs umount {mnt}"

exec bash "$peers_sh" \
    --extra "imgfs=$mount_cmd $common" \
    --extra "imgfs-none=$mount_cmd --cache none $common" \
    --peers phys,qsd,imgfs,imgfs-none \
    --images raw \
    --direct1 all \
    --reps 3 \
    --runtime 3 \
    --size 1G \
    --results "$here/results" \
    "$@"
