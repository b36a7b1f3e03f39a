"""A real Linux guest (../shared/vmkit, QEMU/TCG) on a disk exported by imgfs.

Each case creates a blank 256 MiB raw image, exports it through imgfs and boots the vmkit guest
on MOUNTPOINT/guest.img.raw with the ``mkfs-files`` workload (mkfs.ext4, write 35 known files,
sync, drop caches, read them back and compare). After ``imgfs umount`` the host checks the image
file itself: ``e2fsck -fn`` must be clean and the files, extracted with debugfs, must have the
checksums vmkit expects; that proves the guest's writes really reached the image. A second
mount and a fresh boot with the ``verify`` workload (fsck in the guest, re-read every file) must
pass too.

The cases form a pairwise covering of imgfs ``--cache`` x QEMU's drive ``cache=`` x guest bus.
QEMU's ``cache=none`` opens the exported file with O_DIRECT, which exercises imgfs's direct_io
path; imgfs's ``--cache none`` makes imgfs itself use O_DIRECT on the image file.

The format cases do the same on an image of another writable format, created empty by its usual
producer (``qemu-img create``, ``uml_mkcow``). There the host checks go through an independent
reader: ``qemu-img check`` must be clean, and ``qemu-img convert -O raw`` of the image (``uml_moo``
for cow, which qemu does not read) must hold the clean ext4 with the guest's files; the second
mount must then export exactly those bytes before the ``verify`` boot. So what the guest wrote
through imgfs is what QEMU reads from the image. Two cases put the disk on a raw base holding
scattered junk, which the chain must read through and which the guest's writes, write-zeroes and
partial clusters must hide; the base must not change.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mountutil import Mount
from tests.oracle import assert_same_bytes, qemu_check, qemu_info, sha256_file

pytestmark = pytest.mark.vm

VMKIT = Path(__file__).resolve().parents[2].parent / "shared" / "vmkit"
IMAGE_SIZE = 256 * 1024 * 1024
BUILD_TIMEOUT = 900  # the first build downloads ~90 MB of Debian packages
BOOT_TIMEOUT = 120  # boot.sh kills qemu after this; a boot takes 3-8 s under TCG
CONSOLE_TAIL = 60


@dataclass(frozen=True)
class Vmkit:
    cache: Path

    @property
    def expected_sha256(self) -> Path:
        return self.cache / "expected.sha256"


@pytest.fixture(scope="module")
def vmkit() -> Vmkit:
    """Build (or reuse) the guest kernel and initramfs in $VMKIT_CACHE or /tmp/vmkit-cache."""
    assert (VMKIT / "build.sh").is_file(), f"vmkit not found at {VMKIT}"
    cache = Path(os.environ.get("VMKIT_CACHE") or "/tmp/vmkit-cache")
    cache.mkdir(parents=True, exist_ok=True)
    # Two test runs sharing the cache must not build into it at the same time.
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(
            [str(VMKIT / "build.sh"), "--cache", str(cache)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    assert result.returncode == 0, (
        f"vmkit build.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    kit = Vmkit(cache)
    assert kit.expected_sha256.is_file(), f"build.sh left no {kit.expected_sha256}"
    return kit


def tail(path: Path, lines: int = CONSOLE_TAIL) -> str:
    if not path.exists():
        return f"(no {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def boot(
    kit: Vmkit,
    disk: Path,
    *,
    bus: str,
    qemu_cache: str,
    workload: str,
    console: Path,
    mount: Mount,
    script: Path | None = None,
) -> str:
    """Boot the guest on disk; assert that boot.sh exits 0 with a PASS result line, and return
    that line (it carries the boot's ``seconds=``). ``script`` runs that file as the ``custom``
    workload."""
    cmd = [
        str(VMKIT / "boot.sh"),
        str(disk),
        "--bus",
        bus,
        *(["--script", str(script)] if script else ["--workload", workload]),
        "--cache",
        qemu_cache,
        "--cache-dir",
        str(kit.cache),
        "--console",
        str(console),
        "--timeout",
        str(BOOT_TIMEOUT),
        "--quiet",
    ]
    try:
        # bytes, not text=True: universal newlines would turn the CRs below into line breaks
        result = subprocess.run(cmd, capture_output=True, timeout=BOOT_TIMEOUT + 60)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"boot.sh {workload} did not finish in {BOOT_TIMEOUT + 60} s\n"
            f"--- guest console (tail) ---\n{tail(console)}\n"
            f"--- imgfs log (tail) ---\n{tail(mount.log, 20)}"
        ) from e
    # The last line is the result. boot.sh copies CRs from the (CRLF) console into its guest_*
    # fields, so split on newlines only (not splitlines()) and drop the CRs.
    stdout = result.stdout.decode(errors="replace")
    stderr = result.stderr.decode(errors="replace")
    result_line = stdout.rstrip("\n").rpartition("\n")[2].replace("\r", "")
    ok = (
        result.returncode == 0
        and result_line.startswith("vmkit: result=PASS ")
        and f" workload={workload} " in result_line
    )
    assert ok, (
        f"boot.sh {workload} on {bus} (qemu cache={qemu_cache}) exited {result.returncode}: "
        f"{result_line!r}\n--- boot.sh stderr ---\n{stderr.strip()}\n"
        f"--- guest console (tail) ---\n{tail(console)}\n"
        f"--- imgfs log (tail) ---\n{tail(mount.log, 20)}"
    )
    print(f"{disk.name}: {result_line}")  # boot times, for -s runs
    return result_line


def host_fsck(image: Path) -> None:
    result = subprocess.run(
        ["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (
        f"e2fsck -fn {image} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


def host_check_files(kit: Vmkit, image: Path, scratch: Path) -> None:
    """Extract the guest's files from the image with debugfs; compare with vmkit's checksums."""
    scratch.mkdir()
    result = subprocess.run(
        ["debugfs", "-R", f"rdump / {scratch}", str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"debugfs rdump failed:\n{result.stdout}\n{result.stderr}"
    expected = {}
    for line in kit.expected_sha256.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        expected[name] = digest
    assert len(expected) == 35, f"unexpected {kit.expected_sha256}: {len(expected)} entries"
    wrong = []
    for name, digest in sorted(expected.items()):
        path = scratch / name
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if got != digest:
            wrong.append(f"{name}: {got} (expected {digest})")
    assert not wrong, "files in the image differ from what the guest wrote:\n" + "\n".join(wrong)


# (imgfs --cache, boot.sh --cache, bus): every pair of values of any two of these occurs once.
CASES = [
    ("writeback", "writeback", "virtio"),
    ("writeback", "none", "scsi"),
    ("none", "none", "virtio"),
    ("none", "writeback", "scsi"),
]


@pytest.mark.parametrize(
    ("imgfs_cache", "qemu_cache", "bus"),
    CASES,
    ids=[f"imgfs-{i}-qemu-{q}-{b}" for i, q, b in CASES],
)
def test_guest_mkfs_then_verify(
    vmkit: Vmkit,
    images: Path,
    tmp_path: Path,
    mount: Callable[..., Mount],
    imgfs_cache: str,
    qemu_cache: str,
    bus: str,
) -> None:
    image = images / "guest.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)

    # 1. mkfs + write + read back, in the guest, through imgfs
    m = mount(images, "--cache", imgfs_cache, name="mnt-write")
    disk = m.file("guest.img")
    assert disk.stat().st_size == IMAGE_SIZE
    boot(
        vmkit,
        disk,
        bus=bus,
        qemu_cache=qemu_cache,
        workload="mkfs-files",
        console=tmp_path / "mkfs-files.console.log",
        mount=m,
    )
    m.umount()

    # 2. on the host, the image file itself holds a clean ext4 with the guest's files
    assert image.stat().st_size == IMAGE_SIZE
    host_fsck(image)
    host_check_files(vmkit, image, tmp_path / "extracted")

    # 3. a fresh mount and a fresh boot find everything again
    m = mount(images, "--cache", imgfs_cache, name="mnt-verify")
    boot(
        vmkit,
        m.file("guest.img"),
        bus=bus,
        qemu_cache=qemu_cache,
        workload="verify",
        console=tmp_path / "verify.console.log",
        mount=m,
    )
    m.umount()
    host_fsck(image)


# --- the guest on images of the other writable formats --------------------------------------------

# The writable formats main has merged; CI asserts the registry knows each of them, so a case
# cannot silently drop out. Extend this when a format's driver lands (qcow2, vpc and vhdx are
# still on their branches); FORMAT_CASES below already has their cases.
MERGED_WRITABLE_FORMATS = ("vmdk", "vdi", "qed", "qcow", "parallels", "cow", "vpc", "vhdx", "qcow2")

BASE = "base.img"  # a raw backing file, for the chain cases
JUNK_STRIDE = 3 * 1024 * 1024 + 12 * 1024  # not cluster aligned: partial clusters need COW
JUNK_LENGTH = 64 * 1024


def registered_formats() -> set[str]:
    from imgfs.block.registry import all_drivers

    return {driver.format_name for driver in all_drivers()}


def qemu_img(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert result.returncode == 0, f"qemu-img {' '.join(args)}: {result.stderr.strip()}"
    return result


def write_junk_base(path: Path) -> None:
    """A sparse raw disk with a tagged 64 KiB block every ~3 MiB: what the overlay does not
    hold must read as this, what the guest wrote or zeroed must not."""
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        for offset in range(0, IMAGE_SIZE - JUNK_LENGTH, JUNK_STRIDE):
            tag = f"imgfs vm test base junk at {offset:012d} ".encode()
            f.seek(offset)
            f.write((tag * (JUNK_LENGTH // len(tag) + 1))[:JUNK_LENGTH])


def qemu_create(fmt: str, options: str = "") -> Callable[[Path, str], None]:
    """A creator that runs ``qemu-img create -f fmt [-o options] NAME 256M`` in IMAGES_DIR."""

    def create(images: Path, name: str) -> None:
        opts = ["-o", options] if options else []
        qemu_img("create", "-q", "-f", fmt, *opts, name, str(IMAGE_SIZE), cwd=images)

    return create


def qemu_overlay(fmt: str) -> Callable[[Path, str], None]:
    """An empty ``fmt`` overlay on a raw base full of junk (backing named relative, as users do)."""

    def create(images: Path, name: str) -> None:
        write_junk_base(images / BASE)
        qemu_img("create", "-q", "-f", fmt, "-b", BASE, "-F", "raw", name, cwd=images)

    return create


def uml_cow(images: Path, name: str) -> None:
    """An empty UML cow file on a raw base full of junk (``uml_mkcow`` records the name given)."""
    write_junk_base(images / BASE)
    result = subprocess.run(
        ["uml_mkcow", name, BASE], capture_output=True, text=True, timeout=60, cwd=images
    )
    assert result.returncode == 0, f"uml_mkcow: {result.stdout}{result.stderr}"


@dataclass(frozen=True)
class FormatCase:
    id: str
    fmt: str  # the name in imgfs's registry, and qemu-img's -f
    image: str  # the guest disk's file name in IMAGES_DIR
    create: Callable[[Path, str], None]
    imgfs_cache: str
    qemu_cache: str
    bus: str
    slow: bool = False
    qemu_checks: bool = True  # qemu-img check implements this format
    qemu_reads: bool = True  # else the reference raw comes from uml_moo (cow)
    base: str | None = None  # a raw backing file, which must come out unchanged


# Each case gets its own (imgfs --cache, qemu cache=, bus), so that across the formats every imgfs
# mode and every qemu mode occurs, each bus with several of them. Three default-tier cases (the
# formats people most often hand to a VM: vmdk, vdi, and a qcow2 overlay on a raw base); the rest
# are slow.
FORMAT_CASES = [
    FormatCase("vmdk", "vmdk", "guest.vmdk", qemu_create("vmdk"), "none", "writeback", "virtio"),
    FormatCase("vdi", "vdi", "guest.vdi", qemu_create("vdi"), "writeback", "none", "scsi"),
    FormatCase(
        "qed", "qed", "guest.qed", qemu_create("qed"), "writethrough", "unsafe", "virtio", slow=True
    ),
    FormatCase(
        "vmdk-streamOptimized",
        "vmdk",
        "guest.vmdk",
        qemu_create("vmdk", "subformat=streamOptimized"),
        "unsafe",
        "directsync",
        "scsi",
        slow=True,
    ),
    FormatCase(
        "qcow",
        "qcow",
        "guest.qcow",
        qemu_create("qcow"),
        "directsync",
        "writethrough",
        "ide",
        slow=True,
        qemu_checks=False,
    ),
    FormatCase(
        "parallels",
        "parallels",
        "guest.hds",
        qemu_create("parallels"),
        "writeback",
        "directsync",
        "virtio",
        slow=True,
    ),
    FormatCase(
        "cow-on-raw",
        "cow",
        "guest.cow",
        uml_cow,
        "none",
        "none",
        "ide",
        slow=True,
        qemu_checks=False,
        qemu_reads=False,
        base=BASE,
    ),
    FormatCase(
        "qcow2",
        "qcow2",
        "guest.qcow2",
        qemu_create("qcow2", "compat=1.1"),
        "writeback",
        "writethrough",
        "scsi",
        slow=True,
    ),
    FormatCase(
        "qcow2-on-raw",
        "qcow2",
        "guest.qcow2",
        qemu_overlay("qcow2"),
        "none",
        "writeback",
        "virtio",
        base=BASE,
    ),
    # force_size: otherwise qemu rounds a VHD's size down to a CHS geometry
    FormatCase(
        "vpc",
        "vpc",
        "guest.vhd",
        qemu_create("vpc", "subformat=dynamic,force_size=on"),
        "writethrough",
        "none",
        "scsi",
        slow=True,
        qemu_checks=False,
    ),
    FormatCase(
        "vhdx",
        "vhdx",
        "guest.vhdx",
        qemu_create("vhdx", "subformat=dynamic"),
        "directsync",
        "unsafe",
        "virtio",
        slow=True,
    ),
]


def format_params() -> list:
    known = registered_formats()
    return [
        pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else [])
        for case in FORMAT_CASES
        if case.fmt in known
    ]


def test_merged_formats_are_registered() -> None:
    """Every merged writable format has a driver, so its VM case below really runs."""
    known = registered_formats()
    missing = [fmt for fmt in MERGED_WRITABLE_FORMATS if fmt not in known]
    assert not missing, f"formats main has merged but the registry lacks: {missing}"
    without_case = [
        fmt for fmt in MERGED_WRITABLE_FORMATS if fmt not in {c.fmt for c in FORMAT_CASES}
    ]
    assert not without_case, f"merged formats without a VM case: {without_case}"


def reference_raw(case: FormatCase, images: Path, out: Path) -> Path:
    """The disk's bytes as an independent reader sees them in the image file."""
    if case.qemu_reads:
        qemu_img("convert", "-f", case.fmt, "-O", "raw", case.image, str(out), cwd=images)
    else:
        # uml_moo merges the cow file and its base into a new raw file
        assert case.base is not None
        result = subprocess.run(
            ["uml_moo", "-b", case.base, case.image, str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=images,
        )
        assert result.returncode == 0, f"uml_moo: {result.stdout}{result.stderr}"
    assert out.stat().st_size == IMAGE_SIZE, f"{out}: {out.stat().st_size} bytes"
    return out


def host_qemu_check(case: FormatCase, image: Path) -> None:
    if not case.qemu_checks:
        return
    status, report = qemu_check(image, case.fmt)
    assert status == 0, f"qemu-img check -f {case.fmt} {image}: status {status}: {report}"


@pytest.mark.parametrize("case", format_params())
def test_guest_on_format(
    vmkit: Vmkit,
    images: Path,
    tmp_path: Path,
    mount: Callable[..., Mount],
    case: FormatCase,
) -> None:
    image = images / case.image
    case.create(images, case.image)
    if case.qemu_reads:
        assert qemu_info(image, case.fmt)["virtual-size"] == IMAGE_SIZE
    base_digest = sha256_file(images / case.base) if case.base else None

    # 1. mkfs + write + read back, in the guest, through imgfs
    m = mount(images, "--cache", case.imgfs_cache, name="mnt-write")
    disk = m.file(case.image)
    assert disk.stat().st_size == IMAGE_SIZE
    boot(
        vmkit,
        disk,
        bus=case.bus,
        qemu_cache=case.qemu_cache,
        workload="mkfs-files",
        console=tmp_path / "mkfs-files.console.log",
        mount=m,
    )
    m.umount()

    # 2. on the host, an independent reader of the format finds a consistent image holding a
    # clean ext4 with the guest's files; the base is untouched
    host_qemu_check(case, image)
    reference = reference_raw(case, images, tmp_path / "reference.raw")
    host_fsck(reference)
    host_check_files(vmkit, reference, tmp_path / "extracted")
    if case.base:
        assert sha256_file(images / case.base) == base_digest, f"{case.base} was written"

    # 3. a fresh mount exports exactly those bytes, and a fresh boot finds everything again
    m = mount(images, "--cache", case.imgfs_cache, name="mnt-verify")
    assert_same_bytes(m.file(case.image), reference)
    boot(
        vmkit,
        m.file(case.image),
        bus=case.bus,
        qemu_cache=case.qemu_cache,
        workload="verify",
        console=tmp_path / "verify.console.log",
        mount=m,
    )
    m.umount()
    host_qemu_check(case, image)
    assert_same_bytes(reference_raw(case, images, tmp_path / "after-verify.raw"), reference)
    if case.base:
        assert sha256_file(images / case.base) == base_digest, f"{case.base} was written"


# --- a heavier guest workload: overwrite, delete and refill ---------------------------------------

REWRITE_SCRIPT = Path(__file__).with_name("rewrite.sh")


def host_check_manifest(image: Path, scratch: Path) -> int:
    """Extract the files with debugfs and compare them with the MANIFEST.sha256 the guest stored
    (checksums it read back after dropping its caches); returns the number of files."""
    scratch.mkdir()
    result = subprocess.run(
        ["debugfs", "-R", f"rdump / {scratch}", str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"debugfs rdump failed:\n{result.stdout}\n{result.stderr}"
    manifest = (scratch / "MANIFEST.sha256").read_text().splitlines()
    wrong = []
    for line in manifest:
        digest, name = line.split(maxsplit=1)
        path = scratch / name
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if got != digest:
            wrong.append(f"{name}: {got} (the guest read {digest})")
    assert not wrong, "files in the image differ from what the guest read:\n" + "\n".join(wrong)
    return len(manifest)


@pytest.mark.slow
@pytest.mark.parametrize("case", format_params())
def test_guest_rewrite_on_format(
    vmkit: Vmkit,
    images: Path,
    tmp_path: Path,
    mount: Callable[..., Mount],
    case: FormatCase,
) -> None:
    """rewrite.sh: ~70 MiB written to files, in-place overwrites at odd offsets (fsync'd),
    deletes and refills, so allocated clusters are rewritten and freed space reused; the guest
    compares what it reads back after dropping caches and runs e2fsck. The host then checks the
    image and that a fresh mount exports exactly what QEMU reads."""
    image = images / case.image
    case.create(images, case.image)
    base_digest = sha256_file(images / case.base) if case.base else None
    m = mount(images, "--cache", case.imgfs_cache, name="mnt-write")
    boot(
        vmkit,
        m.file(case.image),
        bus=case.bus,
        qemu_cache=case.qemu_cache,
        workload="custom",
        console=tmp_path / "rewrite.console.log",
        mount=m,
        script=REWRITE_SCRIPT,
    )
    m.umount()

    host_qemu_check(case, image)
    reference = reference_raw(case, images, tmp_path / "reference.raw")
    host_fsck(reference)
    # b0-b9 less three deleted, n0-n5, dir/f000-f031
    assert host_check_manifest(reference, tmp_path / "extracted") == 7 + 6 + 32
    if case.base:
        assert sha256_file(images / case.base) == base_digest, f"{case.base} was written"
    m = mount(images, "--cache", case.imgfs_cache, name="mnt-read")
    assert_same_bytes(m.file(case.image), reference)
    m.umount()
