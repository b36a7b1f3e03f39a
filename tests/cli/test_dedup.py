"""imgfs dedup on directories of qcow2 clones and raw images, checked with qemu-img: every image
reads back as before (qemu-img compare against copies made first) and passes qemu-img check,
the space goes down, a second run re-hashes nothing, and an interrupted run harms nothing."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from imgfs.dedup.control import TEST_HOOK_ENV
from tests.mountutil import imgfs_cmd, subprocess_env
from tests.oracle import qemu_check, qemu_img

MiB = 1024 * 1024
BLOCK = 64 * 1024


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    result = subprocess.run([*args, str(image)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "error" not in result.stdout.lower(), result


def make_clones(directory: Path, count: int, size: int, seed: int = 1) -> list[Path]:
    """``count`` qcow2 images converted from one random base, each then rewritten in 10-20% of
    its size with its own random data (some writes unaligned)."""
    rng = random.Random(seed)
    directory.mkdir(exist_ok=True)
    base = directory.parent / f"clone-base-{seed}.raw"
    base.write_bytes(rng.randbytes(size))
    images = []
    for k in range(count):
        image = directory / f"vm{k:02d}.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(base), str(image))
        share = (10 + (k * 10) // max(1, count - 1)) / 100  # 10% .. 20%
        pieces = 3
        piece = int(size * share / pieces) // 512 * 512
        commands = []
        for p in range(pieces):
            source = directory.parent / f"diverge-{seed}-{k}-{p}.bin"
            source.write_bytes(rng.randbytes(piece))
            offset = rng.randrange(0, (size - piece) // 512) * 512
            commands.append(f"write -s {source} {offset} {piece}")
        qemu_io(image, *commands)
        images.append(image)
    base.unlink()
    return images


def run_dedup(directory: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    result = subprocess.run(
        imgfs_cmd("dedup", str(directory), "--output", "json", *args),
        capture_output=True, text=True, timeout=600, env={**subprocess_env(), **(env or {})},
    )  # fmt: skip
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def allocated(paths: list[Path]) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in paths)


def distinct_data_bytes(images: list[Path], scratch: Path) -> int:
    """Bytes needed to store each distinct non-zero 64 KiB block of the images once (their guest
    content through qemu-img, not through imgfs)."""
    seen: set[bytes] = set()
    zero = bytes(BLOCK)
    raw = scratch / "content.raw"
    for image in images:
        qemu_img("convert", "-O", "raw", str(image), str(raw))
        with open(raw, "rb") as f:
            while block := f.read(BLOCK):
                if block != zero[: len(block)]:
                    seen.add(hashlib.sha256(block).digest())
        raw.unlink()
    return len(seen) * BLOCK


def snapshot(images: list[Path], where: Path) -> dict[str, Path]:
    where.mkdir()
    copies = {}
    for image in images:
        copies[image.name] = where / image.name
        shutil.copyfile(image, copies[image.name])
    return copies


def assert_all_intact(directory: Path, copies: dict[str, Path]) -> None:
    """Every image passes qemu-img check and holds the same guest bytes as its copy."""
    for name, copy in copies.items():
        image = directory / name
        status, data = qemu_check(image)
        assert status == 0, f"qemu-img check {name}: {status} {data}"
        result = qemu_img("compare", str(image), str(copy), check=False)
        assert result.returncode == 0, f"{name}: {result.stdout} {result.stderr}"
    for base in directory.glob("imgfs-dedup-base-*.qcow2"):
        status, data = qemu_check(base)
        assert status == 0, f"qemu-img check {base.name}: {status} {data}"
    assert not list(directory.glob(".*imgfs-dedup-tmp")), "temporary files left behind"


@pytest.mark.parametrize("size", [32 * MiB, pytest.param(64 * MiB, marks=pytest.mark.slow)])
def test_rebase_of_ten_clones_saves_the_duplicated_space(tmp_path: Path, size: int) -> None:
    directory = tmp_path / "images"
    images = make_clones(directory, 10, size)
    copies = snapshot(images, tmp_path / "before")
    before = allocated(images)
    # Duplicated space: what the images take now minus what storing each distinct block once
    # would take. Saved space: what they take now minus what images and base take after.
    duplicated = before - distinct_data_bytes(images, tmp_path)

    status, report = run_dedup(directory, "--method", "rebase")
    assert status == 0, report
    assert sorted(report["rebase"]["rewritten"]) == [p.name for p in images]
    bases = sorted(directory.glob("imgfs-dedup-base-*.qcow2"))
    assert [b.name for b in bases] == ["imgfs-dedup-base-1.qcow2"]
    after = allocated(images + bases)
    saved = before - after
    assert saved >= 0.8 * duplicated, (before, after, duplicated)
    for image in images:
        info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
        assert info["backing-filename"] == "imgfs-dedup-base-1.qcow2"
    assert_all_intact(directory, copies)

    # A second run finds everything in the index and nothing left to do.
    keys = {p.name: os.stat(p).st_mtime_ns for p in images}
    status, again = run_dedup(directory, "--method", "rebase")
    assert status == 0, again
    assert again["scan"]["hashed"] == [] and again["scan"]["hashed-bytes"] == 0
    assert sorted(again["scan"]["from-index"]) == sorted([p.name for p in images + bases])
    assert again["rebase"]["plans"] == []
    assert {p.name: os.stat(p).st_mtime_ns for p in images} == keys


def test_dry_run_changes_no_image(tmp_path: Path) -> None:
    directory = tmp_path / "images"
    images = make_clones(directory, 3, 8 * MiB)
    stats = {p.name: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in images}
    status, report = run_dedup(directory, "--dry-run")
    assert status == 0, report
    (plan,) = report["rebase"]["plans"]
    assert plan["new-base"] and sorted(plan["images"]) == [p.name for p in images]
    assert plan["estimated-saving"] > 8 * MiB
    assert {p.name: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in images} == stats
    assert not list(directory.glob("imgfs-dedup-base-*"))


@pytest.mark.parametrize(
    "step",
    [pytest.param("hash-chunk:3", marks=pytest.mark.slow), "base-block:40", "rebase-block:300",
     pytest.param("verify-chunk:5", marks=pytest.mark.slow),
     pytest.param("rename:2", marks=pytest.mark.slow)],
)  # fmt: skip
def test_interrupted_run_leaves_every_image_valid(tmp_path: Path, step: str) -> None:
    directory = tmp_path / "images"
    images = make_clones(directory, 4, 8 * MiB, seed=2)
    copies = snapshot(images, tmp_path / "before")
    status, report = run_dedup(directory, "--method", "rebase", env={TEST_HOOK_ENV: step})
    assert status == 130 and report["interrupted"], report
    assert_all_intact(directory, copies)
    # The next run finishes the job from where it is (the index is still good).
    status, report = run_dedup(directory, "--method", "rebase")
    assert status == 0, report
    assert_all_intact(directory, copies)
    for image in images:
        info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
        assert info.get("backing-filename", "").startswith("imgfs-dedup-base-"), info


def test_images_that_cannot_be_rebased_are_left_alone(tmp_path: Path) -> None:
    directory = tmp_path / "images"
    images = make_clones(directory, 2, 4 * MiB, seed=3)
    raw = directory / "disk.raw"
    qemu_img("convert", "-O", "raw", str(images[0]), str(raw))
    overlay = directory / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", images[1].name, "-F", "qcow2", str(overlay))
    linked = directory / "linked.qcow2"
    shutil.copyfile(images[0], linked)
    os.link(linked, tmp_path / "elsewhere.qcow2")  # a second name outside the directory
    copies = snapshot([*images, raw, overlay, linked], tmp_path / "before")
    status, report = run_dedup(directory, "--method", "rebase")
    assert status == 0, report
    skipped = report["rebase"]["skipped"]
    assert "raw" in skipped["disk.raw"]
    assert "backing file" in skipped["overlay.qcow2"]
    assert images[1].name in skipped  # the overlay's backing image
    assert "hard links" in skipped["linked.qcow2"]
    assert report["rebase"].get("rewritten", []) == []
    assert_all_intact(directory, {k: v for k, v in copies.items() if k != "disk.raw"})


MKFS = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}


@pytest.fixture(params=["xfs", pytest.param("btrfs", marks=pytest.mark.slow)])
def reflink_fs(request: pytest.FixtureRequest, tmp_path: Path):
    """A loop-mounted file system with reflinks (XFS with reflink=1, btrfs), removed after."""
    backing = tmp_path / "fs.img"
    with open(backing, "wb") as f:
        f.truncate(400 * MiB)
    subprocess.run([*MKFS[request.param], str(backing)], check=True, capture_output=True)
    mnt = tmp_path / request.param
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def test_fideduperange_shares_equal_blocks(reflink_fs: Path, tmp_path: Path) -> None:
    directory = reflink_fs / "images"
    directory.mkdir()
    rng = random.Random(5)
    common = rng.randbytes(16 * MiB)
    raws = []
    for k in range(3):  # raw disks: the same 16 MiB, a different 1 MiB each
        data = bytearray(common)
        data[k * MiB : (k + 1) * MiB] = rng.randbytes(MiB)
        path = directory / f"disk{k}.img"
        path.write_bytes(data)
        raws.append(path)
    clones = make_clones(directory, 2, 8 * MiB, seed=6)
    os.sync()
    copies = snapshot([*raws, *clones], tmp_path / "before")
    free_before = free_bytes(reflink_fs)

    status, report = run_dedup(directory, "--method", "fideduperange")
    assert status == 0, report
    f = report["fideduperange"]
    assert f["unsupported"] is None and f["errors"] == [], f
    # Two of the three raw disks share 15 MiB with the first; the clones share most blocks.
    assert f["bytes-shared"] >= 2 * 14 * MiB + 5 * MiB, f
    os.sync()
    if "btrfs" not in reflink_fs.name:
        # XFS frees each shared block's old copy at once. (btrfs keeps a whole old extent
        # while any part of it is still used, so its free space says little here; the shared
        # extents below are what counts.)
        assert free_bytes(reflink_fs) - free_before >= 0.9 * f["bytes-shared"]
    for name, copy in copies.items():
        assert (
            hashlib.sha256((directory / name).read_bytes()).digest()
            == hashlib.sha256(copy.read_bytes()).digest()
        ), name
    for clone in clones:
        assert qemu_check(clone)[0] == 0
    # imgfs info sees the sharing (FIEMAP's shared flag).
    info = subprocess.run(imgfs_cmd("info", "--output=json", str(raws[1])), capture_output=True,
                          text=True, env=subprocess_env(), check=True)  # fmt: skip
    assert json.loads(info.stdout)["imgfs-allocation"]["host-shared"] >= 14 * MiB

    status, again = run_dedup(directory, "--method", "fideduperange")
    assert status == 0, again
    assert again["scan"]["hashed"] == [] and again["fideduperange"]["ranges-shared"] == 0


def test_fideduperange_elsewhere_says_unsupported(tmp_path: Path) -> None:
    directory = tmp_path / "images"
    make_clones(directory, 2, 2 * MiB, seed=7)
    st = os.statvfs(directory)
    status, report = run_dedup(directory, "--method", "fideduperange")
    assert status == 0, report
    f = report["fideduperange"]
    # tmp is not XFS/btrfs here: the ioctl is refused and said so, nothing fails.
    assert f["unsupported"] or f["ranges-shared"] > 0, (f, st)


def test_signal_from_outside_at_any_moment_harms_nothing(tmp_path: Path) -> None:
    """SIGTERM from another process while the run works (wherever it is then)."""
    directory = tmp_path / "images"
    images = make_clones(directory, 4, 8 * MiB, seed=8)
    copies = snapshot(images, tmp_path / "before")
    proc = subprocess.Popen(
        imgfs_cmd("dedup", str(directory), "--method", "rebase", "--progress"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(),
    )  # fmt: skip
    assert proc.stderr is not None
    # Wait until it is past hashing (a progress bar for the base or an image has appeared).
    seen = b""
    while b"base" not in seen and b"vm0" not in seen and proc.poll() is None:
        seen += proc.stderr.read1(4096)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), (out, err)
    assert_all_intact(directory, copies)


def test_a_second_run_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "images"
    make_clones(directory, 2, 2 * MiB, seed=9)
    index = directory / ".imgfs-dedup.sqlite"
    with open(index, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = subprocess.run(imgfs_cmd("dedup", str(directory)), capture_output=True,
                                text=True, env=subprocess_env(), timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert "another imgfs dedup is running" in result.stderr
    assert not list(directory.glob("imgfs-dedup-base-*"))


def test_an_unreadable_index_is_started_afresh(tmp_path: Path) -> None:
    directory = tmp_path / "images"
    images = make_clones(directory, 2, 4 * MiB, seed=10)
    (directory / ".imgfs-dedup.sqlite").write_bytes(b"not a database at all" * 100)
    status, report = run_dedup(directory, "--method", "rebase", "--dry-run")
    assert status == 0, report
    assert sorted(report["scan"]["hashed"]) == [p.name for p in images]
    status, again = run_dedup(directory, "--method", "rebase", "--dry-run")
    assert again["scan"]["hashed"] == []


def test_a_killed_run_leaves_images_valid_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    """SIGKILL (no chance to clean up) while images are being rewritten: every image is the
    old file or the complete new one, and the next run removes the temporary files."""
    directory = tmp_path / "images"
    images = make_clones(directory, 4, 8 * MiB, seed=11)
    copies = snapshot(images, tmp_path / "before")
    proc = subprocess.Popen(
        imgfs_cmd("dedup", str(directory), "--method", "rebase", "--progress"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=subprocess_env(),
    )  # fmt: skip
    assert proc.stderr is not None
    seen = b""
    while b"vm01" not in seen and proc.poll() is None:  # rewriting the second image
        seen += proc.stderr.read1(4096)
    proc.kill()
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode in (-signal.SIGKILL, 0)
    for name, copy in copies.items():  # valid, and the same guest bytes, whichever file it is
        assert qemu_check(directory / name)[0] == 0
        assert qemu_img("compare", str(directory / name), str(copy), check=False).returncode == 0
    status, report = run_dedup(directory, "--method", "rebase")
    assert status == 0, report
    assert_all_intact(directory, copies)
