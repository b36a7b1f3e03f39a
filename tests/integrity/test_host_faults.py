"""Host faults injected under every writable format: the Nth host write (or sync) fails once with
EIO or ENOSPC (imgfs.block.recording.Fault), swept over N.

Each case: the guest operation that met the fault raises (never a silent success); the rest of
the workload, once the fault has cleared, writes and flushes normally; the image then checks
clean (or leaks only, or the format's own dirty state that its repair clears) and every sector
reads back what the model allows: the data of every write that succeeded, and for the failed
write, per sector, the old or the new data (never garbage).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from imgfs.block import recording
from imgfs.block.disk import open_disk
from imgfs.block.hostfile import CacheMode
from imgfs.errors import ImgfsError
from tests.integrity.crashstates import (
    BASE,
    KEY_NAME,
    SECTOR,
    MiB,
    check_state,
    open_subject,
    pattern,
    plan_workload,
    run_workload,
)
from tests.integrity.subjects import SUBJECTS

SIZE = 2 * MiB
FAULTS = {
    "write-EIO": ((recording.WRITE,), errno.EIO),
    "write-ENOSPC": ((recording.WRITE,), errno.ENOSPC),
    "sync-EIO": ((recording.SYNC,), errno.EIO),
    # every modification and sync: also punch_hole, zero_range and truncate (slow tier)
    "any-EIO": (("any",), errno.EIO),
}
DEFAULT_FAULTS = ["sync-EIO", "write-EIO"]  # ENOSPC takes the same paths: slow tier


def _prepare(name: str, tmp_path: Path) -> tuple[Path, bytes]:
    subject = SUBJECTS[name]
    base = tmp_path / "base"
    base.mkdir()
    if subject.key is not None:
        (tmp_path / KEY_NAME).write_bytes(subject.key)  # key_file_for() of base/ and every nN/
    subject.make(base, SIZE)
    disk = open_subject(subject, base / subject.filename)
    try:
        prefill = plan_workload(SIZE, 10, seed=77, first_version=1_000_000)
        run_workload(disk, [op for op in prefill if op.kind != "flush"], None)
    finally:
        disk.close()
    if subject.after_prefill is not None:
        subject.after_prefill(base)
    disk = open_subject(subject, base / subject.filename, read_only=True)
    try:
        base_raw = bytes(disk.read(0, SIZE))
    finally:
        disk.close()
    return base, base_raw


def _count_ops(name: str, base: Path, tmp_path: Path, plan, kinds) -> int:
    subject = SUBJECTS[name]
    work = tmp_path / "count"
    shutil.copytree(base, work)
    recorder = recording.Recorder()
    with recording.installed(recorder):
        disk = open_subject(subject, work / subject.filename, cache=CacheMode.WRITEBACK)
        try:
            run_workload(disk, plan, None)
        finally:
            disk.close()
    shutil.rmtree(work)
    return sum(op.kind in kinds for op in recorder.ops)


def sweep(name: str, fault_name: str, tmp_path: Path, max_cases: int, ops: int = 14) -> int:
    """Run the sweep; returns how many fault cases were checked."""
    subject = SUBJECTS[name]
    kinds, error = FAULTS[fault_name]
    base, base_raw = _prepare(name, tmp_path)
    plan = plan_workload(SIZE, ops, seed=5)
    counted = (*recording.MODIFYING, recording.SYNC) if "any" in kinds else kinds
    total = _count_ops(name, base, tmp_path, plan, counted)
    stride = max(1, -(-total // max_cases))
    cases = 0
    failures: list[str] = []
    for nth in range(0, total, stride):
        work = tmp_path / f"n{nth}"
        shutil.copytree(base, work)
        fault = recording.Fault(nth, kinds, error)
        recorder = recording.Recorder(keep_in_memory=False, fault=fault)
        failed: list[int] = []
        raised = 0
        with recording.installed(recorder):
            try:
                disk = open_subject(subject, work / subject.filename)
            except ImgfsError:  # the fault hit the open (a header update): it fails cleanly
                raised += 1
                disk = open_subject(subject, work / subject.filename)
                assert not disk.read_only, f"{name}: a failed open left the image unusable"
            try:
                for i, op in enumerate(plan):
                    try:
                        run_workload(disk, [op], None)
                    except ImgfsError as e:
                        assert e.errno in (error, errno.EIO), e
                        failed.append(i)
                        raised += 1
                try:
                    disk.flush()
                except ImgfsError:  # the fault hit this flush itself
                    raised += 1
                    disk.flush()  # the fault has cleared: this must work
            finally:
                try:
                    disk.close()
                except ImgfsError:
                    # The fault hit the close's header update (Parallels' in-use flag): the
                    # image stays marked unclean, which the check below must see and repair.
                    raised += 1
        assert fault.fired, f"{name}: fault {nth} of {total} never fired"
        assert raised, f"{name}: {fault_name} at {fault.fired_at} raised nowhere"
        # What each sector may hold: successful writes are durable (a flush followed); the
        # failed operation's sectors may be old or new.
        allowed: list[set[int]] = [{BASE} for _ in range(SIZE // SECTOR)]
        for i, op in enumerate(plan):
            if op.kind == "flush":
                continue
            for s in range(op.sector, op.sector + op.count):
                allowed[s] = allowed[s] | {op.version} if i in failed else {op.version}
        problems = check_state(subject, work / subject.filename, base_raw, allowed)
        problems = [p for p in problems if p not in ("LEAKS-REPAIRED", "LEAKS-LEFT", "RECOVERED")]
        if problems:
            failures.append(f"{fault_name} #{nth} ({fault.fired_at}): " + "; ".join(problems))
        shutil.rmtree(work)
        cases += 1
    assert not failures, "\n".join(failures[:8])
    tally = os.environ.get("IMGFS_FAULT_TALLY")
    if tally:
        with open(tally, "a") as f:
            f.write(f"{name}\t{fault_name}\t{total}\t{cases}\n")
    return cases


@pytest.mark.parametrize("fault", DEFAULT_FAULTS)
@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_fault_sweep(name: str, fault: str, tmp_path: Path) -> None:
    assert sweep(name, fault, tmp_path, max_cases=3) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_fault_sweep_every_operation(name: str, fault: str, tmp_path: Path) -> None:
    assert sweep(name, fault, tmp_path, max_cases=10_000, ops=40) >= 1


def test_injected_fault_reaches_the_caller(tmp_path: Path) -> None:
    """The layer itself: the chosen write fails with the chosen errno, once."""
    SUBJECTS["raw"].make(tmp_path, MiB)
    fault = recording.Fault(1, (recording.WRITE,), errno.ENOSPC)
    with recording.installed(recording.Recorder(fault=fault)):
        disk = open_disk(str(tmp_path / "d.img"), "raw")
        try:
            disk.write(0, pattern(1, 0, 1))
            with pytest.raises(ImgfsError) as info:
                disk.write(512, pattern(2, 1, 1))
            assert info.value.errno == errno.ENOSPC
            disk.write(512, pattern(3, 1, 1))
        finally:
            disk.close()
    assert fault.fired and fault.seen == 2  # counting stops once a one-shot fault fired


def test_fault_selected_by_environment_reaches_a_mounted_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMGFS_FAIL_IO=write:0:ENOSPC: the daemon's first host write fails; the FUSE writer gets
    ENOSPC for that write, and the next write and fsync succeed."""
    from tests.mountutil import start_mount, stop_mount

    with pytest.raises(ValueError, match="KIND:N:ERRNO"):
        recording.parse_fault("write:x")
    assert recording.parse_fault("sync:2:EIO") == recording.Fault(2, ("sync",), errno.EIO)
    images = tmp_path / "images"
    images.mkdir()
    SUBJECTS["raw"].make(images, MiB)
    monkeypatch.setenv(recording.ENV_FAIL, "write:0:ENOSPC")
    m = start_mount(images, tmp_path / "mnt", tmp_path / "mount.log")
    monkeypatch.delenv(recording.ENV_FAIL)
    try:
        fd = os.open(m.file("d.img"), os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, pattern(1, 0, 8), 0)
            assert info.value.errno == errno.ENOSPC
            assert os.pwrite(fd, pattern(2, 0, 8), 0) == 4096
            os.fsync(fd)
        finally:
            os.close(fd)
        m.umount()
    finally:
        stop_mount(m)
    assert (images / "d.img").read_bytes()[:4096] == pattern(2, 0, 8)


@pytest.mark.parametrize(
    "name", ["vmdk", "vmdk-2gb-sparse", "qcow", "qed", "vhdx", "qcow2", "vpc", "vdi", "parallels",
             "cow"]
)  # fmt: skip
def test_failed_table_update_then_rewrite_is_durable(name: str, tmp_path: Path) -> None:
    """Regression (vmdk, qcow, qed, vhdx): when the write of the table entry for newly
    allocated space failed, the in-memory table kept the entry, so the retried guest write went
    in place to space no on-disk entry named, and was lost at reopen. After such a failure (in
    the write, or in the flush for formats that defer table updates), a retry must land and
    stay."""
    subject = SUBJECTS[name]
    subject.make(tmp_path, 2 * MiB)
    data = pattern(3, 16, 16)
    (tmp_path / "clean").mkdir()
    for f in tmp_path.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / "clean" / f.name)
    recorder = recording.Recorder()
    with recording.installed(recorder):
        disk = open_disk(str(tmp_path / subject.filename), subject.fmt)
        disk.write(8192, data)
        disk.close()
    writes = [op for op in recorder.ops if op.kind == recording.WRITE]
    at = next(i for i, op in enumerate(writes) if data in op.data)
    entry = next(i for i in range(at + 1, len(writes)) if writes[i].offset < writes[at].offset)
    work = tmp_path / "clean"
    fault = recording.Fault(entry, (recording.WRITE,), errno.EIO)
    with recording.installed(recording.Recorder(keep_in_memory=False, fault=fault)):
        disk = open_disk(str(work / subject.filename), subject.fmt)
        try:
            with pytest.raises(ImgfsError):
                disk.write(8192, data)
                disk.flush()
            disk.write(8192, data)  # the retry
            disk.flush()
        finally:
            disk.close()
    disk = open_disk(str(work / subject.filename), subject.fmt, read_only=True)
    try:
        assert bytes(disk.read(8192, len(data))) == data, f"{name}: the retried write was lost"
    finally:
        disk.close()
