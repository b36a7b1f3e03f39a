"""Every writable image variant the integrity tests exercise, and how to make each one."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from imgfs.formats.cow import CowDriver
from tests.integrity.crashstates import KEY_NAME, Subject


def _qemu_create(filename: str, fmt: str, options: str = ""):
    def make(images: Path, size: int) -> None:
        args = ["qemu-img", "create", "-q", "-f", fmt]
        if options:
            args += ["-o", options]
        subprocess.run([*args, str(images / filename), str(size)], check=True, timeout=60)

    return make


def _vdi_header_ahead(errors: list[str]) -> bool:
    """VDI's header counts a block the map does not name yet: the driver syncs the header's
    ``blocks_allocated`` before the map (so no allocation can reuse an index the map names);
    qemu-img check calls the difference an error and ``check -r all`` recounts."""
    for line in errors:
        m = re.fullmatch(r"ERROR: allocated blocks mismatch, is (\d+), should be (\d+)", line)
        if not m or int(m[2]) <= int(m[1]):
            return False
    return bool(errors)


def _parallels_in_use(errors: list[str]) -> bool:
    """Parallels' in-use flag, set while the image is open for writing: a crash leaves it set
    and ``check -r all`` clears it (imgfs opens such an image read-only until then)."""
    return bool(errors) and all(
        line in ("ERROR image was not closed correctly",)
        or line.startswith("ERROR space leaked at the end of the image")
        for line in errors
    )


PASSPHRASE = b"crash states\n"


def _qemu_create_encrypted(filename: str, fmt: str, options: str):
    """qemu-img create of an encrypted image, keyed by the passphrase file the crash test
    writes beside the image directory (retried: qemu's LUKS creation fails now and then)."""
    from tests.formats.crypto_util import qemu_create

    def make(images: Path, size: int) -> None:
        qemu_create(images / filename, fmt, str(size), images.parent / KEY_NAME, options)

    return make


def _snapshot_base(images: Path) -> None:
    subprocess.run(
        ["qemu-img", "snapshot", "-c", "base", str(images / "d.qcow2")], check=True, timeout=60
    )


def _make_cow(images: Path, size: int) -> None:
    backing = images / "cow-backing.img"
    # A backing file with recognisable content in every sector.
    from tests.integrity.crashstates import pattern

    backing.write_bytes(pattern(999_999_999, 0, size // 512))
    CowDriver.create(str(images / "d.cow"), size, {"backing_file": "cow-backing.img"})


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in [
        Subject("raw", "d.img", "raw", _qemu_create("d.img", "raw"), "raw"),
        Subject("qcow2", "d.qcow2", "qcow2", _qemu_create("d.qcow2", "qcow2"), "qcow2"),
        Subject(
            "qcow2-v2-512",
            "d.qcow2",
            "qcow2",
            _qemu_create("d.qcow2", "qcow2", "compat=0.10,cluster_size=512"),
            "qcow2",
        ),
        # Every cluster and L2 table of the prefill shared with a snapshot: the workload's
        # writes copy them, and the snapshot must survive every crash state unchanged.
        Subject(
            "qcow2-snapshot",
            "d.qcow2",
            "qcow2",
            _qemu_create("d.qcow2", "qcow2"),
            "qcow2",
            after_prefill=_snapshot_base,
            snapshot="base",
        ),
        Subject(
            "qcow2-luks",
            "d.qcow2",
            "qcow2",
            _qemu_create_encrypted("d.qcow2", "qcow2", "encrypt.format=luks,encrypt.iter-time=10"),
            "qcow2",
            key=PASSPHRASE,
        ),
        Subject(
            "luks",
            "d.luks",
            "luks",
            _qemu_create_encrypted("d.luks", "luks", "iter-time=10"),
            "luks",
            key=PASSPHRASE,
        ),
        Subject("qcow", "d.qcow", "qcow", _qemu_create("d.qcow", "qcow"), "qcow"),
        Subject("qed", "d.qed", "qed", _qemu_create("d.qed", "qed"), "qed", leaks_repairable=False),
        Subject("vmdk", "d.vmdk", "vmdk", _qemu_create("d.vmdk", "vmdk"), "vmdk"),
        Subject(
            "vmdk-flat",
            "d.vmdk",
            "vmdk",
            _qemu_create("d.vmdk", "vmdk", "subformat=monolithicFlat"),
            "vmdk",
        ),
        Subject(
            "vmdk-2gb-sparse",
            "d.vmdk",
            "vmdk",
            _qemu_create("d.vmdk", "vmdk", "subformat=twoGbMaxExtentSparse"),
            "vmdk",
        ),
        Subject("vpc", "d.vhd", "vpc", _qemu_create("d.vhd", "vpc", "force_size=on"), "vpc"),
        Subject(
            "vpc-fixed",
            "d.vhd",
            "vpc",
            _qemu_create("d.vhd", "vpc", "subformat=fixed,force_size=on"),
            "vpc",
        ),
        Subject(
            "vhdx",
            "d.vhdx",
            "vhdx",
            _qemu_create("d.vhdx", "vhdx", "block_size=1M"),
            "vhdx",
        ),
        Subject("vdi", "d.vdi", "vdi", _qemu_create("d.vdi", "vdi"), "vdi", _vdi_header_ahead),
        Subject(
            "parallels",
            "d.hds",
            "parallels",
            _qemu_create("d.hds", "parallels"),
            "parallels",
            _parallels_in_use,
        ),
        Subject("cow", "d.cow", "cow", _make_cow, None, extra_files=("cow-backing.img",)),
    ]
}

# The variants the mounted tests (kill -9) run: those a plain `imgfs mount` opens as they are
# made (the encrypted ones need keys; the snapshot variant is plain qcow2 until after_prefill).
PLAIN_MOUNT_SUBJECTS = sorted(
    name for name, s in SUBJECTS.items() if s.key is None and s.after_prefill is None
)
