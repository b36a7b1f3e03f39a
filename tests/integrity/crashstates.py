"""Crash states from a host-I/O log, and the checks every crash state must pass.

A workload runs against an image through :func:`imgfs.block.disk.open_disk` with every host file
opened through :mod:`imgfs.block.recording`, so the log holds each completed host ``pwrite``
(offset and data), ``punch_hole``/``zero_range``/``truncate`` and ``sync`` of the image file and
its companion files, interleaved with marks for the guest's writes and flushes.

A crash at log position ``k`` leaves on disk, per host file, every modification that completed
before that file's last completed ``sync`` before ``k`` (durable), plus any subset of the later
ones (pending: the page cache or the disk's write cache may have written back any of them, in any
order). :func:`crash_states` builds, for chosen ``k``: nothing pending; all pending; every prefix;
random subsets; and random subsets with torn writes. A torn write keeps a random subset of its
4 KiB pieces, cut at 4 KiB boundaries of the host file (the page-cache writeback unit and the
atomic write unit of the disks we trust); a 512-byte sector is never torn inside itself, so
guest sectors, which every format here stores 512-aligned, read back whole or not at all.

Each state is applied to a copy of the pre-workload files and checked (:func:`check_state`):

* ``qemu-img check`` reports no corruption (exit 0; exit 3, leaks only, is then repaired with
  imgfs's own ``check -r leaks`` and must then check clean); formats qemu cannot check (exit 63)
  or read at all (UML cow) are checked with imgfs's check;
* every guest sector reads back, through imgfs and through ``qemu-img convert``, as a version the
  guest may see: the one a completed guest flush acknowledged, or one written after it (old or
  new, never garbage). Guest writes are sector-aligned and every sector's content is unique
  (a stamp of write id and sector number), so a sector names the version it holds.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from imgfs.block import recording
from imgfs.block.disk import Disk, open_disk
from imgfs.block.driver import CheckResult, RepairMode
from imgfs.block.hostfile import CacheMode
from imgfs.block.recording import MARK, MODIFYING, PUNCH, SYNC, TRUNCATE, WRITE, ZERO, HostOp
from imgfs.errors import ImgfsError, Unsupported
from imgfs.keys import KeyRing

SECTOR = 512
PAGE = 4096
KiB = 1024
MiB = 1024 * KiB
BASE = -1  # the sector's content before the workload
ZEROS = 0  # all zeros (write_zeroes, or never written)
STAMP = struct.Struct("<8sQQ")
MAGIC = b"IMGFSCRS"


def sector_pattern(version: int, sector: int) -> bytes:
    stamp = STAMP.pack(MAGIC, version, sector)
    return (stamp * (SECTOR // len(stamp) + 1))[:SECTOR]


def pattern(version: int, first_sector: int, count: int) -> bytes:
    return b"".join(sector_pattern(version, s) for s in range(first_sector, first_sector + count))


def versions_of(sector_data: bytes, sector: int, base: bytes) -> set[int]:
    """Which versions this sector's content could be (empty: garbage)."""
    found = set()
    if sector_data == base:
        found.add(BASE)
    if sector_data.count(0) == SECTOR:
        found.add(ZEROS)
    magic, version, number = STAMP.unpack_from(sector_data)
    if magic == MAGIC and number == sector and sector_data == sector_pattern(version, sector):
        found.add(version)
    return found


# -- the workload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestOp:
    kind: str  # "write", "zero" or "flush"
    version: int = 0
    sector: int = 0
    count: int = 0


def plan_workload(size: int, ops: int, seed: int, first_version: int = 1) -> list[GuestOp]:
    """Sector-aligned writes of 1 sector to 256 KiB (some across cluster and block edges), some
    write_zeroes, and a guest flush now and then (not at the end: the last writes stay
    unacknowledged)."""
    rng = random.Random(seed)
    sectors = size // SECTOR
    plan: list[GuestOp] = []
    version = first_version
    for _ in range(ops):
        roll = rng.random()
        if roll < 0.2 and plan and plan[-1].kind != "flush":
            plan.append(GuestOp("flush"))
            continue
        count = rng.choice([1, 3, 8, 16, 64, 127, 128, 200, 512])
        if rng.random() < 0.3:  # around a 64 KiB boundary
            start = max(0, rng.randrange(1, sectors // 128) * 128 - rng.randrange(1, count + 1))
        else:
            start = rng.randrange(0, sectors)
        count = min(count, sectors - start)
        if roll < 0.3:
            plan.append(GuestOp("zero", ZEROS, start, count))
        else:
            plan.append(GuestOp("write", version, start, count))
            version += 1
    return plan


def run_workload(disk: Disk, plan: list[GuestOp], recorder: recording.Recorder | None) -> None:
    """Apply the plan, marking each guest operation's start and end in the log."""

    def mark(label: tuple) -> None:
        if recorder is not None:
            recorder.mark(label)

    for i, op in enumerate(plan):
        mark(("start", i))
        if op.kind == "flush":
            disk.flush()
        elif op.kind == "zero":
            disk.write_zeroes(op.sector * SECTOR, op.count * SECTOR, may_unmap=True)
        else:
            disk.write(op.sector * SECTOR, pattern(op.version, op.sector, op.count))
        mark(("done", i))


class GuestModel:
    """What each sector may read back after a crash at some point of the log."""

    def __init__(self, plan: list[GuestOp], sectors: int) -> None:
        self.plan = plan
        self.sectors = sectors

    def allowed(self, marks: list[tuple]) -> list[set[int]]:
        """Per sector, the versions a crash after ``marks`` (the marks logged so far) allows."""
        durable: list[int] = [BASE] * self.sectors
        since_flush: list[GuestOp] = []  # written (or being written) after the last acked flush
        flush_covers: list[GuestOp] = []
        for what, i in marks:
            op = self.plan[i]
            if what == "start":
                if op.kind == "flush":
                    flush_covers = list(since_flush)  # every issued write has completed
                else:
                    since_flush.append(op)
            elif op.kind == "flush":  # acknowledged: its writes are promised
                for w in flush_covers:
                    durable[w.sector : w.sector + w.count] = [w.version] * w.count
                since_flush = since_flush[len(flush_covers) :]
                flush_covers = []
        allowed = [{v} for v in durable]
        for w in since_flush:
            for s in range(w.sector, w.sector + w.count):
                allowed[s].add(w.version)
        return allowed


# -- crash states ----------------------------------------------------------------------------


@dataclass
class CrashState:
    point: int  # ops[:point] had been issued
    applied: list[HostOp]  # in order (torn writes already cut)
    strategy: str


def _pieces(op: HostOp) -> list[HostOp]:
    """A write cut at the host file's 4 KiB boundaries."""
    pieces = []
    pos = op.offset
    end = op.offset + op.length
    while pos < end:
        nxt = min(end, (pos // PAGE + 1) * PAGE)
        rel = pos - op.offset
        pieces.append(HostOp(WRITE, op.path, pos, nxt - pos, op.data[rel : rel + nxt - pos]))
        pos = nxt
    return pieces


def split_at(ops: list[HostOp], point: int) -> tuple[list[HostOp], list[HostOp]]:
    """The modifications in ops[:point] that are durable (before their file's last sync) and
    those still pending."""
    last_sync: dict[str, int] = {}
    for i in range(point):
        if ops[i].kind == SYNC:
            last_sync[ops[i].path] = i
    durable, pending = [], []
    for i in range(point):
        op = ops[i]
        if op.kind in MODIFYING:
            (durable if i < last_sync.get(op.path, -1) else pending).append(op)
    return durable, pending


def crash_states(ops: list[HostOp], rng: random.Random, wanted: int) -> Iterator[CrashState]:
    """Crash states over the whole log: at every host sync and a spread of other points, the
    synced-only and all-pending states and every prefix of the pending writes, then random
    subsets (some torn) at random points until ``wanted`` have been produced (the caller skips
    duplicates)."""
    host_points = [i + 1 for i, op in enumerate(ops) if op.kind != MARK]
    if not host_points:
        return
    produced = 0
    sync_points = [i for i in host_points if ops[i - 1].kind == SYNC]
    systematic = sorted(set(sync_points + [host_points[-1]]))
    for point in systematic:
        durable, pending = split_at(ops, point)
        for j in range(len(pending) + 1):
            yield CrashState(point, durable + pending[:j], f"prefix {j}/{len(pending)}")
            produced += 1
    while produced < wanted * 10:
        point = rng.choice(host_points)
        durable, pending = split_at(ops, point)
        strategy = rng.choice(["subset", "torn", "torn"])
        chosen: list[HostOp] = []
        for op in pending:
            if rng.random() < 0.5:
                continue
            if strategy == "torn" and op.kind == WRITE and op.length > SECTOR:
                chosen.extend(p for p in _pieces(op) if rng.random() < 0.5)
            else:
                chosen.append(op)
        yield CrashState(point, durable + chosen, strategy)
        produced += 1


class _Overlay:
    """One host file as the base file plus the 4 KiB pages the applied operations changed."""

    def __init__(self, base: bytes) -> None:
        self.base = base
        self.size = len(base)
        self.floor = len(base)  # base bytes at or past this were truncated away
        self.pages: dict[int, bytearray] = {}

    def _page(self, n: int) -> bytearray:
        page = self.pages.get(n)
        if page is None:
            lo = n * PAGE
            page = bytearray(self.base[lo : min(lo + PAGE, self.floor)].ljust(PAGE, b"\0"))
            self.pages[n] = page
        return page

    def put(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            n, within = divmod(offset + pos, PAGE)
            k = min(PAGE - within, len(data) - pos)
            self._page(n)[within : within + k] = data[pos : pos + k]
            pos += k

    def zero(self, offset: int, length: int) -> None:
        end = min(self.size, offset + length)
        while offset < end:
            n, within = divmod(offset, PAGE)
            k = min(PAGE - within, end - offset)
            self._page(n)[within : within + k] = bytes(k)
            offset += k

    def truncate(self, size: int) -> None:
        if size < self.size:
            self.floor = min(self.floor, size)
            for n in [n for n in self.pages if n * PAGE >= size]:
                del self.pages[n]
            if size % PAGE and size // PAGE in self.pages:
                page = self.pages[size // PAGE]
                page[size % PAGE :] = bytes(PAGE - size % PAGE)
        self.size = size


def apply(base: dict[str, bytes], applied: list[HostOp]) -> tuple[dict[str, _Overlay], str]:
    """The files after ``applied``, as overlays on ``base``, and a digest of their contents."""
    files: dict[str, _Overlay] = {}
    for op in applied:
        name = os.path.basename(op.path)
        f = files.get(name)
        if f is None:
            f = files[name] = _Overlay(base.get(name, b""))
        if op.kind == WRITE:
            f.put(op.offset, op.data)
            f.size = max(f.size, op.offset + op.length)
        elif op.kind in (PUNCH, ZERO):
            f.zero(op.offset, op.length)
        elif op.kind == TRUNCATE:
            f.truncate(op.offset)
    digest = hashlib.sha256()
    for name in sorted(files):
        f = files[name]
        digest.update(f"{name}\0{f.size}\0{f.floor}\0".encode())
        for n in sorted(f.pages):
            if n * PAGE < f.size:
                digest.update(n.to_bytes(8, "little") + f.pages[n])
    return files, digest.hexdigest()


def materialize(
    base_dir: Path, files: dict[str, _Overlay], out: Path, shared: tuple[str, ...] = ()
) -> None:
    """Copy the base files into ``out`` (hard-link the ``shared`` read-only ones) and apply the
    overlays."""
    out.mkdir(parents=True, exist_ok=True)
    for src in base_dir.iterdir():
        if src.name in shared:
            os.link(src, out / src.name)
        else:
            shutil.copyfile(src, out / src.name)
    for name, f in files.items():
        with open(out / name, "r+b" if (out / name).exists() else "w+b") as h:
            h.truncate(f.floor)
            h.truncate(f.size)
            for n in sorted(f.pages):
                if n * PAGE < f.size:
                    h.seek(n * PAGE)
                    h.write(f.pages[n][: min(PAGE, f.size - n * PAGE)])


# -- checking one state ----------------------------------------------------------------------


@dataclass
class Subject:
    """One image variant under test: how to make it and which tools can judge it."""

    name: str
    filename: str
    fmt: str  # imgfs's format name
    make: Callable[[Path, int], None]  # (images dir, virtual size)
    qemu_fmt: str | None  # None: qemu cannot read it
    # The format's own dirty state, which its recovery (``check -r all``) repairs: given the
    # ERROR lines of qemu-img check, whether they are only that (a VDI header counting a block
    # the map does not name yet, a Parallels in-use flag).
    dirty_state: Callable[[list[str]], bool] | None = None
    leaks_repairable: bool = True  # qed: neither qemu nor imgfs can reclaim leaked clusters
    extra_files: tuple[str, ...] = ()  # read-only files beside it (a backing file)
    # Run on the image directory after the prefill, before the recorded workload (e.g. take an
    # internal snapshot, so the workload's writes copy clusters shared with it).
    after_prefill: Callable[[Path], None] | None = None
    # An internal snapshot taken by after_prefill: in every crash state it must still read as
    # the prefilled image did, through imgfs and through qemu.
    snapshot: str | None = None
    # The passphrase of an encrypted image (written to KEY_NAME beside the image directories).
    key: bytes | None = None


@dataclass
class Outcome:
    checked: int = 0
    duplicates: int = 0
    leaks_repaired: int = 0
    leaks_left: int = 0
    recovered: int = 0
    failures: list[str] = field(default_factory=list)


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


KEY_NAME = "passphrase"


def key_file_for(image: Path) -> Path:
    """Where the passphrase of an encrypted subject lies: beside the directory of its image
    (``work/``, ``base/`` and every ``stateN/`` share one)."""
    return image.parent.parent / KEY_NAME


def open_subject(subject: Subject, image: Path, **kwargs: object) -> Disk:
    """open_disk of a subject's image, with its key when it is encrypted."""
    keys = None
    if subject.key is not None:
        keys = KeyRing.single(str(image), str(key_file_for(image)))
    return open_disk(str(image), subject.fmt, keys=keys, **kwargs)  # type: ignore[arg-type]


def qemu_image(subject: Subject, image: Path, *extra: str) -> list[str]:
    """qemu-img arguments naming the image (``extra`` goes before it): ``-f FMT IMAGE``, or
    a secret object and ``--image-opts`` for an encrypted one."""
    assert subject.qemu_fmt is not None
    if subject.key is None:
        return ["-f", subject.qemu_fmt, *extra, str(image)]
    key_opt = "key-secret" if subject.qemu_fmt == "luks" else "encrypt.key-secret"
    return [
        "--object", f"secret,id=s0,file={key_file_for(image)}", *extra, "--image-opts",
        f"driver={subject.qemu_fmt},file.filename={image},{key_opt}=s0",
    ]  # fmt: skip


def classify(data: bytes, base: bytes, allowed: list[set[int]]) -> str | None:
    """None when every sector holds an allowed version, else what is wrong with the first bad
    sector."""
    for s, ok in enumerate(allowed):
        chunk = data[s * SECTOR : (s + 1) * SECTOR]
        found = versions_of(chunk, s, base[s * SECTOR : (s + 1) * SECTOR])
        if not found & ok:
            what = f"versions {sorted(found)}" if found else "garbage"
            return f"sector {s} holds {what}, allowed {sorted(ok)}"
    return None


def check_state(
    subject: Subject, image: Path, base_raw: bytes, allowed: list[set[int]], qemu_read: bool = True
) -> list[str]:
    """The problems with one crash state (empty when it passes)."""
    problems: list[str] = []
    try:
        disk = open_subject(subject, image, read_only=True)
        try:
            data = bytes(disk.read(0, len(base_raw)))
            try:
                imgfs_check: CheckResult | None = disk.check(RepairMode.NONE)
            except Unsupported:  # raw: nothing to check but the data
                imgfs_check = None
        finally:
            disk.close()
    except ImgfsError as e:
        return [f"imgfs cannot read the crash state: {e}"]
    bad = classify(data, base_raw, allowed)
    if bad:
        problems.append(f"read through imgfs: {bad}")
    if subject.snapshot is not None:
        problems += _check_snapshot(subject, image, base_raw, qemu_read)
    if subject.qemu_fmt is None:
        if imgfs_check is not None and (imgfs_check.corruptions or imgfs_check.check_errors):
            problems.append(f"imgfs check: {imgfs_check.messages[:3]}")
        return problems
    if qemu_read:
        problems += _check_qemu_read(subject, image, data, base_raw, allowed)
    check = qemu_img("check", *qemu_image(subject, image))
    if check.returncode == 2 and subject.dirty_state is not None:
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("ERROR")]
        if subject.dirty_state(errors):
            disk = open_subject(subject, image)
            try:
                disk.check(RepairMode.ALL)
            finally:
                disk.close()
            problems.append("RECOVERED")
            check = qemu_img("check", *qemu_image(subject, image))
    if check.returncode == 63:  # qemu has no check for it: imgfs's
        if imgfs_check is not None and (imgfs_check.corruptions or imgfs_check.check_errors):
            problems.append(f"imgfs check: {imgfs_check.messages[:3]}")
    elif check.returncode == 3:
        disk = open_subject(subject, image)
        try:
            disk.check(RepairMode.LEAKS)
        finally:
            disk.close()
        again = qemu_img("check", *qemu_image(subject, image))
        if again.returncode == 3 and not subject.leaks_repairable:
            problems.append("LEAKS-LEFT")
        elif again.returncode != 0:
            problems.append(
                f"still not clean after imgfs check -r leaks (exit {again.returncode}): "
                f"{(again.stdout + again.stderr)[-400:]}"
            )
        else:
            problems.append("LEAKS-REPAIRED")  # not a failure: counted by the caller
    elif check.returncode != 0:
        problems.append(
            f"qemu-img check exit {check.returncode}: {(check.stdout + check.stderr)[-600:]}"
        )
    return problems


def _check_snapshot(subject: Subject, image: Path, base_raw: bytes, qemu_read: bool) -> list[str]:
    """The snapshot taken before the workload still holds exactly the prefilled image."""
    assert subject.snapshot is not None
    try:
        view = open_subject(subject, image, read_only=True, snapshot=subject.snapshot)
        try:
            data = bytes(view.read(0, len(base_raw)))
        finally:
            view.close()
    except ImgfsError as e:
        return [f"imgfs cannot open snapshot {subject.snapshot!r}: {e}"]
    if data != base_raw:
        return [f"snapshot {subject.snapshot!r} changed (read through imgfs)"]
    if qemu_read and subject.qemu_fmt is not None:
        raw = image.with_name(image.name + ".snap.raw")
        snap = ("-l", f"snapshot.name={subject.snapshot}")
        conv = qemu_img("convert", *qemu_image(subject, image, *snap), "-O", "raw", str(raw))
        if conv.returncode != 0:
            return [f"qemu-img convert of the snapshot failed: {conv.stderr.strip()}"]
        changed = raw.read_bytes() != base_raw
        raw.unlink()
        if changed:
            return [f"snapshot {subject.snapshot!r} changed (read through qemu)"]
    return []


def _check_qemu_read(
    subject: Subject, image: Path, data: bytes, base_raw: bytes, allowed: list[set[int]]
) -> list[str]:
    """qemu-img convert's view: allowed per sector, and the same bytes imgfs read."""
    assert subject.qemu_fmt is not None
    raw = image.with_name(image.name + ".qemu.raw")
    conv = qemu_img("convert", *qemu_image(subject, image), "-O", "raw", str(raw))
    if conv.returncode != 0:
        return [f"qemu-img convert failed: {conv.stderr.strip()}"]
    qdata = raw.read_bytes()
    raw.unlink()
    bad = classify(qdata, base_raw, allowed)
    if bad:
        return [f"read through qemu: {bad}"]
    if qdata != data:
        return ["imgfs and qemu read different (allowed) data"]
    return []


def image_files(images: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(images.iterdir()) if p.is_file()}


def run_crash_test(
    subject: Subject,
    tmp: Path,
    *,
    cache: CacheMode,
    size: int,
    states: int,
    seed: int,
    ops: int = 40,
    workers: int = 2,
    qemu_read_every: int = 1,
) -> Outcome:
    """Make the image, prefill it, record a workload, and check ``states`` distinct crash
    states (fewer only if the log cannot produce that many)."""
    work = tmp / "work"
    work.mkdir(parents=True)
    if subject.key is not None:
        (tmp / KEY_NAME).write_bytes(subject.key)
    subject.make(work, size)
    prefill = plan_workload(size, 12, seed + 1000, first_version=1_000_000)
    disk = open_subject(subject, work / subject.filename, cache=cache)
    try:
        run_workload(disk, [op for op in prefill if op.kind != "flush"], None)
    finally:
        disk.close()
    if subject.after_prefill is not None:
        subject.after_prefill(work)
    base_files = image_files(work)
    base_dir = tmp / "base"
    shutil.copytree(work, base_dir)
    base_disk = open_subject(subject, work / subject.filename, read_only=True)
    try:
        base_raw = bytes(base_disk.read(0, size))
    finally:
        base_disk.close()

    plan = plan_workload(size, ops, seed)
    recorder = recording.Recorder()
    with recording.installed(recorder):
        disk = open_subject(subject, work / subject.filename, cache=cache)
        try:
            run_workload(disk, plan, recorder)
        finally:
            recorder.mark(("start", len(plan)))  # close = a final flush
            disk.close()
            recorder.mark(("done", len(plan)))
    plan = plan + [GuestOp("flush")]
    log = recorder.ops
    model = GuestModel(plan, size // SECTOR)

    outcome = Outcome()
    seen: set[str] = set()
    rng = random.Random(seed)

    def job(index: int, state: CrashState) -> tuple[int, CrashState, list[str]]:
        marks = [op.label for op in log[: state.point] if op.kind == MARK]
        allowed = model.allowed(marks)  # type: ignore[arg-type]
        image = tmp / f"state{index}" / subject.filename
        try:
            qemu_read = index % qemu_read_every == 0
            return index, state, check_state(subject, image, base_raw, allowed, qemu_read)
        finally:
            shutil.rmtree(image.parent, ignore_errors=True)

    # Materialize serially (cheap), check in parallel (qemu-img runs as child processes).
    with ThreadPoolExecutor(workers) as pool:
        futures = []
        index = 0
        for state in crash_states(log, rng, states):
            if index >= states:
                break
            if len(futures) >= workers * 3:
                _collect(futures.pop(0).result(), outcome)
            files, digest = apply(base_files, state.applied)
            if digest in seen:
                outcome.duplicates += 1
                continue
            seen.add(digest)
            materialize(base_dir, files, tmp / f"state{index}", subject.extra_files)
            futures.append(pool.submit(job, index, state))
            index += 1
        for f in futures:
            _collect(f.result(), outcome)
    return outcome


def _collect(result: tuple[int, CrashState, list[str]], outcome: Outcome) -> None:
    index, state, problems = result
    outcome.checked += 1
    notes = {"LEAKS-REPAIRED", "LEAKS-LEFT", "RECOVERED"}
    outcome.leaks_repaired += "LEAKS-REPAIRED" in problems
    outcome.leaks_left += "LEAKS-LEFT" in problems
    outcome.recovered += "RECOVERED" in problems
    problems = [p for p in problems if p not in notes]
    if problems:
        outcome.failures.append(
            f"state {index} (crash after log entry {state.point}, {state.strategy}): "
            + "; ".join(problems)
        )
