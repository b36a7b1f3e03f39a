"""A real guest's discards reach the image: fstrim in a vmkit guest on an exported qcow2 (drive
``discard=unmap``, so QEMU turns the guest's discards into fallocate(PUNCH_HOLE) on the
exported file) frees the image's clusters.

Two boots on the same image: the first makes an ext4 without mkfs-time discard, writes 16 MiB
and deletes half of it; the second runs fstrim. Between them the host reads the image's
allocation (qemu-img check's allocated clusters); after the trim it must have dropped by most
of the deleted 8 MiB, and the image must still be clean and hold a clean file system.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.mountutil import Mount
from tests.oracle import qemu_check, qemu_img, qemu_raw
from tests.vm.test_vmkit import BOOT_TIMEOUT, VMKIT, Vmkit, host_fsck, tail, vmkit  # noqa: F401

pytestmark = pytest.mark.vm

MiB = 1024 * 1024

FILL = """\
. /vmkit/workloads/common.inc
do_mkfs -E nodiscard
mkdir -p /mnt && mount -t ext4 "$DISK" /mnt || die "mount failed"
for i in 1 2 3 4; do
  dd if=/vmkit/data/blob-4m.bin of=/mnt/big$i.bin bs=1M 2>/dev/null || die "write big$i"
done
sync
rm /mnt/big2.bin /mnt/big3.bin
sync
umount /mnt || die "umount failed"
"""

TRIM = """\
. /vmkit/workloads/common.inc
mkdir -p /mnt && mount -t ext4 "$DISK" /mnt || die "mount failed"
out=$(fstrim -v /mnt 2>&1) || die "fstrim failed: $out"
echo "VMKIT-FSTRIM $out"
sha256sum /mnt/big1.bin /mnt/big4.bin | sed 's/^/VMKIT-SHA256 /'
umount /mnt || die "umount failed"
"""


def boot_script(kit: Vmkit, disk: Path, script: Path, console: Path, mount: Mount) -> str:
    """Boot the guest on ``disk`` running ``script`` with discard on; return its console."""
    cmd = [
        str(VMKIT / "boot.sh"),
        str(disk),
        "--bus",
        "virtio",
        "--script",
        str(script),
        "--discard",
        "on",
        "--cache-dir",
        str(kit.cache),
        "--console",
        str(console),
        "--timeout",
        str(BOOT_TIMEOUT),
        "--quiet",
    ]
    result = subprocess.run(cmd, capture_output=True, timeout=BOOT_TIMEOUT + 60)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0 and "result=PASS" in out, (
        f"boot.sh {script.name} exited {result.returncode}: {out[-500:]}\n"
        f"--- guest console (tail) ---\n{tail(console)}\n"
        f"--- imgfs log (tail) ---\n{tail(mount.log, 20)}"
    )
    return console.read_text(errors="replace")


def allocated_clusters(image: Path) -> int:
    status, report = qemu_check(image, "qcow2")
    assert status == 0, report
    return report["allocated-clusters"]


def test_guest_fstrim_frees_qcow2_clusters(
    vmkit: Vmkit,  # noqa: F811
    images: Path,
    tmp_path: Path,
    mount: Callable[..., Mount],
) -> None:
    image = images / "guest.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), str(256 * MiB))
    fill, trim = tmp_path / "fill.sh", tmp_path / "trim.sh"
    fill.write_text(FILL)
    trim.write_text(TRIM)

    m = mount(images, name="mnt-fill")
    boot_script(vmkit, m.file("guest.qcow2"), fill, tmp_path / "fill.console", m)
    m.umount()
    before = allocated_clusters(image)
    assert before * 65536 >= 16 * MiB  # the 16 MiB written are allocated

    m = mount(images, name="mnt-trim")
    console = boot_script(vmkit, m.file("guest.qcow2"), trim, tmp_path / "trim.console", m)
    m.umount()
    after = allocated_clusters(image)
    assert "VMKIT-FSTRIM" in console and "trimmed" in console, console[-2000:]
    freed = (before - after) * 65536
    assert freed >= 7 * MiB, f"fstrim freed {freed} bytes ({before} -> {after} clusters)"
    host_fsck(qemu_raw(image, tmp_path / "after.raw"))
