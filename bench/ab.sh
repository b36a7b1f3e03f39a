#!/usr/bin/env bash
# A/B two imgfs source trees on the same warm raw image, alternating A and B each round, with fio
# on the exported file. Used for the "Suggestions" numbers in bench/RESULTS.md.
#
# Usage: bench/ab.sh [-r ROUNDS] [-t SECONDS] [-i IMAGE] [-a "MOUNT ARGS"] TREE_A TREE_B JOB...
#   TREE_*  an imgfs source tree (e.g. the repo and a `git worktree add /tmp/imgfs-exp` copy);
#           each is run as `env PYTHONPATH=TREE .venv/bin/python -P -m imgfs mount --foreground`
#           (-P: the working directory must not shadow PYTHONPATH)
#   JOB     rw:bs:direct[:ioengine:iodepth], e.g. read:1M:1  randread:16k:1:libaio:16
#   -i      raw image to export (default: a new 1 GiB random image, removed at the end)
#   -a      extra `imgfs mount` arguments for both trees, e.g. "--cache none"
# Environment: PIN="taskset -c 0" runs the daemon and fio on one CPU (see RESULTS.md, noise).
# Prints one line per round, tree and job: MB/s (10^6 B/s) and IOPS.
set -euo pipefail

rounds=3 runtime=3 image="" mount_args=""
while getopts "r:t:i:a:" opt; do
    case $opt in
        r) rounds=$OPTARG ;;
        t) runtime=$OPTARG ;;
        i) image=$OPTARG ;;
        a) mount_args=$OPTARG ;;
        *) sed -n '2,15p' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 3 ] || { sed -n '2,15p' "$0" >&2; exit 2; }
tree_a=$(cd "$1" && pwd) tree_b=$(cd "$2" && pwd)
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
python=$repo/.venv/bin/python imgfs=$repo/.venv/bin/imgfs
work=$(mktemp -d /tmp/imgfs-ab.XXXXXX)
daemon=""

cleanup() {
    if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then
        mountpoint -q "$work/mnt" && { "$imgfs" umount "$work/mnt" || fusermount3 -uz "$work/mnt"; }
        kill "$daemon" 2>/dev/null || true
        wait "$daemon" 2>/dev/null || true
    fi
    mountpoint -q "$work/mnt" 2>/dev/null && fusermount3 -uz "$work/mnt"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

if [ -z "$image" ]; then
    image=$work/raw.raw
    dd if=/dev/urandom of="$image" bs=1M count=1024 status=none conv=fsync
fi
size=$(stat -c %s "$image")
name=$(basename "$image")

for round in $(seq "$rounds"); do
    for tree in "$tree_a" "$tree_b"; do
        mkdir -p "$work/imgs" "$work/mnt"
        rm -f "$work/imgs/$name"
        ln "$image" "$work/imgs/$name" 2>/dev/null || ln -s "$(readlink -f "$image")" "$work/imgs/$name"
        cat "$image" >/dev/null  # warm the host page cache
        # shellcheck disable=SC2086  # PIN and mount_args are word lists on purpose
        env PYTHONPATH="$tree" ${PIN:-} "$python" -P -m imgfs mount --foreground $mount_args \
            --log "$work/imgfs.log" "$work/imgs" "$work/mnt" 2>>"$work/imgfs.err" &
        daemon=$!
        for _ in $(seq 100); do [ -e "$work/mnt/$name.raw" ] && break; sleep 0.1; done
        [ -e "$work/mnt/$name.raw" ] || { echo "ab.sh: mount of $tree failed:" >&2; cat "$work/imgfs.err" >&2; exit 1; }
        for job in "$@"; do
            IFS=: read -r rw bs direct engine depth <<<"$job"
            # shellcheck disable=SC2086
            out=$(${PIN:-} fio --name=ab --filename="$work/mnt/$name.raw" --rw="$rw" --bs="$bs" \
                --direct="$direct" --ioengine="${engine:-psync}" --iodepth="${depth:-1}" \
                --time_based --runtime="$runtime" --size="$size" --norandommap --randrepeat=1 \
                --thread --disk_util=0 --allow_file_create=0 --fallocate=none \
                --output-format=terse --terse-version=3)
            # terse v3: read bw KiB/s = field 7, read IOPS = 8; write bw = 48, write IOPS = 49
            if [[ $rw == *write* ]]; then f=48; else f=7; fi
            echo "$out" | awk -F';' -v r="$round" -v t="$tree" -v j="$job" -v f="$f" \
                '{ printf "%s %s %s %.0f MB/s %.0f IOPS\n", r, t, j, $f * 1.024 / 1000, $(f + 1) }'
        done
        "$imgfs" umount "$work/mnt"
        wait "$daemon" || true
        daemon=""
    done
done
