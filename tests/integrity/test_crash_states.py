"""Crash-state testing of every writable format (see tests/integrity/crashstates.py for the model).

Default tier: 50 distinct crash states per format and cache mode (100 per format). The slow tier
checks 400 per format and mode, on a longer workload, for more than 10,000 in all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imgfs.block import recording
from imgfs.block.disk import open_disk
from imgfs.block.hostfile import CacheMode
from tests.integrity.crashstates import (
    GuestModel,
    GuestOp,
    MiB,
    classify,
    pattern,
    plan_workload,
    run_crash_test,
    split_at,
)
from tests.integrity.subjects import SUBJECTS

MODES = [CacheMode.WRITEBACK, CacheMode.NONE]
# Totals of the slow tier land here (one line per case) for docs/INTEGRITY.md.
TALLY = os.environ.get("IMGFS_CRASH_TALLY")


def _run(
    name: str,
    mode: CacheMode,
    tmp_path: Path,
    states: int,
    ops: int,
    seed: int,
    qemu_read_every: int = 1,
) -> None:
    outcome = run_crash_test(
        SUBJECTS[name],
        tmp_path,
        cache=mode,
        size=2 * MiB,
        states=states,
        seed=seed,
        ops=ops,
        qemu_read_every=qemu_read_every,
    )
    if TALLY:
        with open(TALLY, "a") as f:
            f.write(
                f"{name}\t{mode.value}\t{outcome.checked}\t{outcome.duplicates}\t"
                f"{outcome.leaks_repaired}\t{outcome.leaks_left}\t{outcome.recovered}\t"
                f"{len(outcome.failures)}\n"
            )
    assert not outcome.failures, f"{len(outcome.failures)} bad crash states:\n" + "\n".join(
        outcome.failures[:10]
    )
    assert outcome.checked >= states, f"only {outcome.checked} distinct crash states"


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_crash_states(name: str, mode: CacheMode, tmp_path: Path) -> None:
    # The host I/O log is the same under both modes (O_DIRECT changes how a write reaches the
    # disk, not which writes are issued), so each mode gets its own seed: 100 distinct states.
    seed = 7 if mode is CacheMode.WRITEBACK else 8
    _run(name, mode, tmp_path, states=50, ops=24, seed=seed, qemu_read_every=5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [101, 202])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_crash_states_slow(name: str, mode: CacheMode, seed: int, tmp_path: Path) -> None:
    seed += 0 if mode is CacheMode.WRITEBACK else 1000  # distinct states per mode (see above)
    _run(name, mode, tmp_path, states=200, ops=80, seed=seed)


def test_recorder_logs_companion_files_and_syncs(tmp_path: Path) -> None:
    """The recording layer sees the extent file of a monolithicFlat vmdk (a companion file the
    driver opens itself), and every sync; a mark splits the log where the guest flushed."""
    SUBJECTS["vmdk-flat"].make(tmp_path, 1 * MiB)
    recorder = recording.Recorder()
    with recording.installed(recorder):
        disk = open_disk(str(tmp_path / "d.vmdk"), "vmdk")
        disk.write(4096, pattern(1, 8, 8))
        recorder.mark(("flush",))
        disk.flush()
        disk.close()
    writes = [op for op in recorder.ops if op.kind == recording.WRITE]
    extent = [op for op in writes if os.path.basename(op.path) == "d-flat.vmdk"]
    assert len(extent) == 1
    assert extent[0].offset == 4096 and extent[0].data == pattern(1, 8, 8)
    syncs = {os.path.basename(op.path) for op in recorder.ops if op.kind == recording.SYNC}
    assert "d-flat.vmdk" in syncs
    durable, pending = split_at(recorder.ops, len(recorder.ops))
    assert extent[0] in durable and not pending


def test_model_allows_old_or_new_and_catches_garbage() -> None:
    """The checker itself: an acknowledged write must be there, an unacknowledged one may be
    old or new per sector, and anything else (zeros where data was promised, a stamp from the
    wrong sector) fails."""
    plan = plan_workload(MiB, 6, seed=3)
    writes = [op for op in plan if op.kind == "write"]
    w = writes[0]
    marks = [("start", plan.index(w)), ("done", plan.index(w))]
    model = GuestModel(plan, MiB // 512)
    base = bytes(MiB)
    unacked = model.allowed(marks)
    image = bytearray(base)
    assert classify(bytes(image), base, unacked) is None  # old
    image[w.sector * 512 : (w.sector + w.count) * 512] = pattern(w.version, w.sector, w.count)
    assert classify(bytes(image), base, unacked) is None  # new
    flush = [("start", len(plan)), ("done", len(plan))]
    acked = GuestModel([*plan, GuestOp("flush")], MiB // 512).allowed(marks + flush)
    assert classify(bytes(image), base, acked) is None
    assert "allowed" in (classify(base, base, acked) or "")  # the promised data is missing
    wrong = bytearray(image)
    wrong[w.sector * 512 : w.sector * 512 + 512] = pattern(w.version, w.sector + 1, 1)
    assert "garbage" in (classify(bytes(wrong), base, unacked) or "")


def test_mounted_run_recorded_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMGFS_RECORD_IO makes the mount daemon log its host I/O; crash states built from that log
    check clean and hold, per sector, the old data or one of the versions written (no marks
    come from a mounted run, so the acknowledged-write check is the in-process tests' job)."""
    import random
    import shutil

    from tests.integrity.crashstates import (
        BASE,
        apply,
        check_state,
        crash_states,
        materialize,
    )
    from tests.mountutil import start_mount, stop_mount

    subject = SUBJECTS["qcow2"]
    images = tmp_path / "images"
    images.mkdir()
    subject.make(images, 2 * MiB)
    base_dir = tmp_path / "base"
    shutil.copytree(images, base_dir)
    log = tmp_path / "io.log"
    monkeypatch.setenv(recording.ENV_RECORD, str(log))
    m = start_mount(images, tmp_path / "mnt", tmp_path / "mount.log")
    monkeypatch.delenv(recording.ENV_RECORD)
    allowed: list[set[int]] = [{BASE} for _ in range(2 * MiB // 512)]
    try:
        fd = os.open(m.file(subject.filename), os.O_RDWR)
        try:
            for op in plan_workload(2 * MiB, 12, seed=9):
                if op.kind == "write":
                    os.pwrite(fd, pattern(op.version, op.sector, op.count), op.sector * 512)
                    for s in range(op.sector, op.sector + op.count):
                        allowed[s].add(op.version)
                elif op.kind == "flush":
                    os.fsync(fd)
        finally:
            os.close(fd)
        m.umount()
    finally:
        stop_mount(m)
    ops = recording.load_log(str(log))
    assert any(op.kind == recording.SYNC for op in ops)
    assert any(op.kind == recording.WRITE and op.length >= 512 for op in ops)
    base_files = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    seen: set[str] = set()
    for n, state in enumerate(crash_states(ops, random.Random(3), 30)):
        if len(seen) >= 30:
            break
        files, digest = apply(base_files, state.applied)
        if digest in seen:
            continue
        seen.add(digest)
        out = tmp_path / f"s{n}"
        materialize(base_dir, files, out)
        problems = check_state(subject, out / subject.filename, bytes(2 * MiB), allowed)
        assert not [p for p in problems if p not in ("LEAKS-REPAIRED",)], problems
        shutil.rmtree(out)
    assert len(seen) >= 10


@pytest.mark.parametrize("name", ["qcow", "qed", "vmdk", "vmdk-2gb-sparse", "vhdx"])
def test_allocating_write_syncs_data_before_the_pointer(name: str, tmp_path: Path) -> None:
    """Regression for the ordering bugs the crash states found: after the data of an
    allocating write (appended to the file), the next in-place update of existing metadata of
    that file (the table entry that makes the new space reachable) comes only after a sync. A
    new table appended after the data is not reachable until such an update."""
    subject = SUBJECTS[name]
    subject.make(tmp_path, 2 * MiB)
    data = pattern(7, 8, 8)
    recorder = recording.Recorder()
    with recording.installed(recorder):
        disk = open_disk(str(tmp_path / subject.filename), subject.fmt)
        try:
            disk.write(4096, data)
        finally:
            disk.close()
    ops = recorder.ops
    at = next(i for i, op in enumerate(ops) if op.kind == recording.WRITE and data in op.data)
    path = ops[at].path
    later = [i for i in range(at + 1, len(ops)) if ops[i].path == path]
    pointer = next(
        i for i in later if ops[i].kind == recording.WRITE and ops[i].offset < ops[at].offset
    )
    assert any(ops[i].kind == recording.SYNC for i in later if i < pointer), (
        f"{name}: the write at {ops[pointer].offset} follows the data write without a sync"
    )
