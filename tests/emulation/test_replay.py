"""Trace replay end to end: real guest traces (../shared/vmkit, recorded from a Linux guest
under QEMU) imported and replayed with --verify against raw images (through the driver and
through a real imgfs FUSE mount) and qcow2 (through qemu-storage-daemon's FUSE export), under
every cache mode; bad traces; the importers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from imgfs.block.hostfile import CacheMode
from imgfs.emulation import importers
from imgfs.emulation.cli import main
from imgfs.emulation.replay import Replayer
from imgfs.emulation.target import DiskTarget, FileTarget
from tests.conftest import SHARED
from tests.emulation.helpers import MiB, raw_file
from tests.mountutil import is_mounted
from tests.oracle import assert_qemu_check_clean

TRACES = SHARED / "vmkit" / "traces"
GUEST_DISK = 256 * MiB
CACHE_MODES = [m.value for m in CacheMode]


def imported(tmp_path: Path, name: str) -> Path:
    out = tmp_path / f"{name}.jsonl"
    lines, _ = importers.from_qemu((TRACES / f"{name}.log").read_text())
    out.write_text("\n".join(lines) + "\n")
    return out


def replay(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["replay", *args, "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def summary_value(out: str, key: str) -> str:
    for line in out.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {key} in {out}")


def results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- importing the real guest traces ---------------------------------------------------------

# Request counts per bus for the fstrim workload, from vmkit/traces/RESULTS.md (device level).
FSTRIM_COUNTS = {
    "virtio": {"read": 65, "write": 47, "flush": 26, "discard": 4, "write_zeroes": 4},
    "scsi": {"read": 65, "write": 48, "flush": 27, "discard": 4, "write_zeroes": 4, "other": 38},
    "ide": {"read": 65, "write": 82, "flush": 25, "discard": 4},
    "ahci": {"read": 68, "write": 293, "flush": 25, "discard": 4},
}


@pytest.mark.parametrize("bus", sorted(FSTRIM_COUNTS))
def test_import_qemu_counts_match_vmkit(tmp_path: Path, bus: str) -> None:
    lines, notes = importers.from_qemu((TRACES / f"{bus}-fstrim.log").read_text())
    header = json.loads(lines[0])
    assert header["imgfs_trace"] == 1
    counts: dict[str, int] = {}
    for line in lines[1:]:
        req = json.loads(line)
        kind = req_kind(req)
        counts[kind] = counts.get(kind, 0) + 1
    expected = FSTRIM_COUNTS[bus]
    for kind, n in expected.items():
        assert counts.get(kind, 0) == n, (kind, counts)
    assert any(
        "no range" in n or "no ranges" in n or "left out" in n or "imported" in n for n in notes
    )


def req_kind(req: dict) -> str:
    cmd = bytes.fromhex(req["cmd"])
    if req["bus"] == "virtio":
        return {0: "read", 1: "write", 4: "flush", 11: "discard", 13: "write_zeroes"}.get(
            cmd[0], "other"
        )
    if req["bus"] == "scsi":
        return {
            0x28: "read",
            0x88: "read",
            0x2A: "write",
            0x8A: "write",
            0x35: "flush",
            0x42: "discard",
            0x93: "write_zeroes",
        }.get(cmd[0], "other")
    return {
        0x25: "read",
        0x60: "read",
        0x35: "write",
        0x61: "write",
        0xEA: "flush",
        0x06: "discard",
    }.get(cmd[2], "other")


def test_import_rebuilds_commands_as_the_bus_encodes_them() -> None:
    lines, _ = importers.from_qemu((TRACES / "scsi-fstrim.log").read_text())
    reqs = [json.loads(x) for x in lines[1:]]
    # the log: "scsi_req_parsed ... command 42 dir 2 length 147456" + "..._lba ... lba 0"
    first_write = next(r for r in reqs if r["cmd"].startswith("2a"))
    assert first_write["cmd"] == "2a000000000000012000"  # WRITE(10), LBA 0, 288 blocks
    assert first_write["data"] == {"pattern": "prng", "seed": first_write["seq"]}
    assert first_write["sg"] == [147456]
    assert first_write["expect"] == {"status": 0}
    # WRITE SAME(10) at LBA 524160 became WRITE SAME(16) with the byte range qemu zeroed
    ws = next(r for r in reqs if r["cmd"].startswith("93"))
    assert int(ws["cmd"][4:20], 16) == 268369920 // 512
    assert int(ws["cmd"][20:28], 16) == 65536 // 512


# -- replaying against raw, through the driver, every cache mode -------------------------------


# Every cache mode once in the default tier (each with another bus); the full matrix is slow.
_FAST = {
    ("virtio", "writeback"),
    ("scsi", "none"),
    ("ide", "writethrough"),
    ("ahci", "directsync"),
    ("scsi", "unsafe"),
}
_MATRIX = [
    pytest.param(bus, cache, marks=() if (bus, cache) in _FAST else pytest.mark.slow)
    for bus in ("virtio", "scsi", "ide", "ahci")
    for cache in CACHE_MODES
]


@pytest.mark.parametrize("bus,cache", _MATRIX)
def test_replay_guest_trace_raw_image(tmp_path: Path, capsys, bus: str, cache: str) -> None:
    trace = imported(tmp_path, f"{bus}-mkfs-files")
    image = raw_file(tmp_path / "disk.img", GUEST_DISK)
    res = tmp_path / "results.jsonl"
    rc, out, err = replay(
        capsys,
        str(trace),
        "--image",
        str(image),
        "-f",
        "raw",
        "--cache",
        cache,
        "--verify",
        "--verify-initial",
        "zero",
        "--results",
        str(res),
    )
    assert rc == 0, out + err
    assert ", trace 0, verify 0" in summary_value(out, "errors")
    checked = int(summary_value(out, "errors").split("(")[1].split()[0])
    assert checked > 2000  # the guest read back what it wrote: those reads were checked
    records = results(res)
    assert len(records) == len(trace.read_text().splitlines()) - 1
    assert all("error" not in r and "verify" not in r for r in records)
    # Device errors only for commands outside the list that the guest probes with
    # (MAINTENANCE IN, IDENTIFY PACKET DEVICE, STANDBY IMMEDIATE): never for data commands.
    failed = [
        r
        for r in records
        if r.get("status", 0) or r.get("ata_status", 0x50) & 1 or r.get("virtio_status", 0)
    ]
    assert all(r["kind"] == "other" for r in failed), failed
    assert len(failed) <= 2


def test_replay_fstrim_with_queue_depth(tmp_path: Path, capsys) -> None:
    trace = imported(tmp_path, "scsi-fstrim")
    image = raw_file(tmp_path / "disk.img", GUEST_DISK)
    rc, out, _ = replay(
        capsys,
        str(trace),
        "--image",
        str(image),
        "--queue-depth",
        "8",
        "--verify",
        "--verify-initial",
        "zero",
    )
    assert rc == 0, out
    # QEMU's statuses for the media commands are in the trace: ours must agree
    assert "expect 0" in summary_value(out, "errors")
    # the same trace at depth 1 into another image gives the same bytes (overlapping requests
    # keep their trace order at any depth)
    other = raw_file(tmp_path / "other.img", GUEST_DISK)
    rc, out, _ = replay(capsys, str(trace), "--image", str(other))
    assert rc == 0
    assert image.read_bytes() == other.read_bytes()


# -- through a real imgfs FUSE mount ---------------------------------------------------------


@pytest.mark.parametrize("cache", ["writeback", "none", "writethrough"])
def test_replay_on_fuse_export(images: Path, mount, tmp_path: Path, capsys, cache: str) -> None:
    trace = imported(tmp_path, "virtio-mkfs-files")
    raw_file(images / "guest.img", GUEST_DISK)
    m = mount(images)
    rc, out, err = replay(
        capsys,
        str(trace),
        "--file",
        str(m.file("guest.img")),
        "--cache",
        cache,
        "--queue-depth",
        "4",
        "--verify",
        "--verify-initial",
        "zero",
    )
    assert rc == 0, out + err
    assert summary_value(out, "errors").startswith("device 0, trace 0, verify 0")
    # the image behind the mount holds what the same replay writes into a plain file
    m.umount()
    plain = raw_file(tmp_path / "plain.raw", GUEST_DISK)
    rc, out, _ = replay(capsys, str(trace), "--file", str(plain))
    assert rc == 0
    assert (images / "guest.img").read_bytes() == plain.read_bytes()


# -- qcow2, through qemu-storage-daemon's FUSE export -----------------------------------------


def qsd_fuse_export(image: Path, fmt: str, point: Path) -> subprocess.Popen:
    point.touch()
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file,filename={image}",
            "--blockdev",
            f"driver={fmt},node-name=fmt,file=file,discard=unmap",
            "--export",
            f"type=fuse,id=exp,node-name=fmt,mountpoint={point},writable=on",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not is_mounted(point):
        assert proc.poll() is None, "qemu-storage-daemon exited"
        assert time.monotonic() < deadline, "qemu-storage-daemon did not export"
        time.sleep(0.05)
    return proc


def stop_qsd(proc: subprocess.Popen, point: Path) -> None:
    # PITFALLS: fusermount3 -u leaves the daemon spinning; SIGTERM makes it unmount itself.
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    assert not is_mounted(point)


# Not none/directsync: qemu-storage-daemon 7.2's FUSE export corrupts O_DIRECT writes over
# 1 MiB (the last 256 KiB of a 1.25 MiB pwritev lands at its start; reproduced without imgfs).
@pytest.mark.parametrize("cache", ["writeback", "writethrough", "unsafe"])
def test_replay_guest_trace_qcow2(tmp_path: Path, capsys, cache: str) -> None:
    trace = imported(tmp_path, "scsi-fstrim")
    image = tmp_path / "guest.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(GUEST_DISK)], check=True
    )
    point = tmp_path / "export"
    proc = qsd_fuse_export(image, "qcow2", point)
    try:
        rc, out, err = replay(
            capsys,
            str(trace),
            "--file",
            str(point),
            "--cache",
            cache,
            "--verify",
            "--verify-initial",
            "zero",
        )
    finally:
        stop_qsd(proc, point)
    assert rc == 0, out + err
    assert summary_value(out, "errors").startswith("device 1, trace 0, verify 0")  # 0xA3
    assert_qemu_check_clean(image, "qcow2")
    # qemu-img reads back exactly what the same replay writes into a raw file
    plain = raw_file(tmp_path / "plain.raw", GUEST_DISK)
    assert replay(capsys, str(trace), "--file", str(plain))[0] == 0
    subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image), str(plain)],
        check=True,
    )


# -- bad traces ------------------------------------------------------------------------------


def test_bad_traces_give_per_request_statuses(tmp_path: Path, capsys) -> None:
    image = raw_file(tmp_path / "disk.img", 8 * MiB)
    blocks = 8 * MiB // 512
    lines = [
        '{"bus":"scsi","cmd":"280000000000"}',  # truncated READ(10)
        '{"bus":"scsi","cmd":"c00000000000000000000000"}',  # unknown opcode
        '{"bus":"scsi","cmd":"2800%08x00000200"}' % (blocks - 1),  # READ(10) past the end
        '{"bus":"scsi","cmd":"88000000000000000000000100010000"}',  # 65537 blocks: too long
        '{"bus":"scsi","cmd": "2a00',  # broken JSON
        '{"bus":"ata","cmd":"278025000000400000000000010000000000000"}',  # odd hex
        '{"bus":"ata","cmd":"2780250000000040000000000100000000000000"}',  # READ DMA EXT ok
        '{"bus":"ata","cmd":"27802500ff0f40ff00000000010000000000000000"}',  # IDNF
        '{"bus":"virtio","cmd":"0e000000000000000000000000000000"}',  # SECURE_ERASE: UNSUPP
        '{"bus":"virtio","cmd":"00000000000000000000000000000000"}',  # IN without sg
        '{"bus":"nvme","cmd":"00"}',  # unknown bus
        '{"bus":"virtio","cmd":"01000000000000000000000000000000","data":{"pattern":"x"},'
        '"sg":[512]}',
        "[1,2]",
    ]
    trace = tmp_path / "bad.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    res = tmp_path / "res.jsonl"
    rc, out, err = replay(capsys, str(trace), "--image", str(image), "--results", str(res))
    assert rc == 1  # the trace has errors
    assert "Traceback" not in out + err
    recs = {r["line"]: r for r in results(res)}
    assert len(recs) == len(lines)
    assert "CDB for opcode 0x28 needs 10 bytes, got 6" in recs[1]["error"]
    assert (recs[2]["status"], recs[2]["sense_key"], recs[2]["asc"]) == (2, 5, 0x20)
    assert (recs[3]["sense_key"], recs[3]["asc"], recs[3]["ascq"]) == (5, 0x21, 0)
    assert (recs[4]["sense_key"], recs[4]["asc"]) == (5, 0x24)
    assert recs[4]["sense"][30:36] == "c0000a"  # field pointer: TRANSFER LENGTH at byte 10
    assert "broken JSON" in recs[5]["error"]
    assert "not hex" in recs[6]["error"]
    assert recs[7]["ata_status"] == 0x50
    assert (recs[8]["ata_status"], recs[8]["ata_error"]) == (0x51, 0x10)
    assert recs[9]["virtio_status"] == 2
    assert "needs its data-in sg lengths" in recs[10]["error"]
    assert "bus 'nvme'" in recs[11]["error"]
    assert "unknown data pattern 'x'" in recs[12]["error"]
    assert "JSON object" in recs[13]["error"]
    assert summary_value(out, "errors").startswith("device 5, trace 7")


def test_expected_results_are_checked(tmp_path: Path, capsys) -> None:
    image = raw_file(tmp_path / "disk.img", 1 * MiB)
    payload = bytes(range(256)) * 2
    import hashlib

    digest = hashlib.sha256(payload).hexdigest()
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"imgfs_trace":1,"block_size":512}\n'
        f'{{"bus":"virtio","cmd":"01000000000000000500000000000000","data":"{payload.hex()}"}}\n'
        f'{{"bus":"virtio","cmd":"00000000000000000500000000000000","sg":[512],'
        f'"expect":{{"virtio_status":0,"digest":"{digest}"}}}}\n'
        '{"bus":"virtio","cmd":"00000000000000000600000000000000","sg":[512],'
        f'"expect":{{"digest":"{digest}"}}}}\n'
    )
    res = tmp_path / "r.jsonl"
    rc, out, _ = replay(capsys, str(trace), "--file", str(image), "--results", str(res))
    assert rc == 1
    recs = results(res)
    assert recs[1]["digest"] == digest and "expect_mismatch" not in recs[1]
    assert recs[2]["expect_mismatch"] == {"digest": digest}
    assert "expect 1" in summary_value(out, "errors")


def test_verify_catches_a_changed_block(tmp_path: Path) -> None:
    """The model notices when the target does not hold what was written."""
    path = raw_file(tmp_path / "disk.raw", 1 * MiB)
    target = FileTarget(str(path))
    lines = [
        '{"bus":"virtio","cmd":"01000000000000000000000000000000",'
        '"data":{"pattern":"prng","seed":1},"sg":[4096]}',
        '{"bus":"virtio","cmd":"00000000000000000000000000000000","sg":[4096]}',
    ]
    r = Replayer(target, verify=True)
    assert r.run(lines[:1]).verify_mismatches == 0
    with open(path, "r+b") as f:  # someone else changes block 3 behind the device's back
        f.seek(3 * 512)
        old = f.read(1)
        f.seek(3 * 512)
        f.write(bytes([old[0] ^ 0xFF]))
    s = r.run(lines[1:])
    assert s.verify_mismatches == 1
    assert "block 3 (byte 1536) differs" in s.first_problems[0]
    target.close()


def test_recorded_timing(tmp_path: Path, capsys) -> None:
    image = raw_file(tmp_path / "disk.img", 1 * MiB)
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"t":0.0,"bus":"virtio","cmd":"04000000000000000000000000000000"}\n'
        '{"t":0.3,"bus":"virtio","cmd":"04000000000000000000000000000000"}\n'
    )
    start = time.monotonic()
    rc, out, _ = replay(capsys, str(trace), "--file", str(image), "--timing", "recorded")
    assert rc == 0 and time.monotonic() - start >= 0.3


def test_missing_files_give_one_line_errors(tmp_path: Path, capsys) -> None:
    rc = main(["replay", str(tmp_path / "nope.jsonl"), "--image", "x"])
    _, err = capsys.readouterr()
    assert rc == 2 and err.strip() == f"imgfs: error: {tmp_path / 'nope.jsonl'}: no such trace file"
    trace = tmp_path / "t.jsonl"
    trace.write_text("")
    rc = main(["replay", str(trace), "--image", str(tmp_path / "missing.qcow2")])
    _, err = capsys.readouterr()
    assert rc == 2 and "missing.qcow2: no such image" in err and "\n" not in err.strip()


# -- importers: blkparse and fio ---------------------------------------------------------------

# blkparse's default output format: "%D %2c %8s %5T.%9t %5p %2a %3d " then the action's text
# ("sector + count [process]"); written by hand from blkparse(1), as blktrace is not installed.
BLKPARSE = """\
  8,0    1        1     0.000000000  4242  Q   W 2048 + 8 [dd]
  8,0    1        2     0.000001000  4242  G   W 2048 + 8 [dd]
  8,0    1        3     0.000002000  4242  D   W 2048 + 8 [dd]
  8,0    1        4     0.000300000     0  C   W 2048 + 8 [0]
  8,0    1        5     0.001000000  4242  D   R 2048 + 8 [dd]
  8,0    1        6     0.001200000     0  C   R 2048 + 8 [0]
  8,0    1        7     0.002000000  4242  D  FN [dd]
  8,0    1        8     0.003000000  4242  D  WFS 4096 + 16 [jbd2/sda-8]
  8,0    1        9     0.004000000  4242  D   D 8192 + 64 [fstrim]
  8,0    1       10     0.005000000  4242  D  FWS 100 + 8 [kworker/0:1]
  8,0    1       11     0.006000000  4242  D  RA 2048 + 8 [dd]
CPU1 (sda):
 Reads Queued:           0,        0KiB  Writes Queued:           1,        4KiB
"""


@pytest.mark.parametrize("bus", ["virtio", "scsi", "ata"])
def test_import_blkparse(tmp_path: Path, capsys, bus: str) -> None:
    lines, _ = importers.from_blkparse(BLKPARSE, bus=bus)
    reqs = [json.loads(x) for x in lines[1:]]
    kinds = [req_kind(r) for r in reqs]
    # D events only: W, R, flush (FN), W+FUA (+flush without FUA), D, flush + W (FWS), R
    if bus == "scsi":
        assert kinds == ["write", "read", "flush", "write", "discard", "flush", "write", "read"]
        assert reqs[3]["cmd"] == "2a080000100000001000"  # FUA bit, LBA 4096, 16 blocks
    else:
        assert kinds == [
            "write",
            "read",
            "flush",
            "write",
            "flush",
            "discard",
            "flush",
            "write",
            "read",
        ]
    assert reqs[0]["t"] == 0.0 and reqs[1]["t"] == 0.001 - 0.000002
    trace = tmp_path / "b.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    image = raw_file(tmp_path / "disk.img", 8 * MiB)
    rc, out, _ = replay(capsys, str(trace), "--file", str(image), "--verify")
    assert rc == 0, out
    assert summary_value(out, "errors").startswith("device 0, trace 0, verify 0 (16 blocks")


def test_import_fio_iolog(tmp_path: Path, capsys) -> None:
    data = raw_file(tmp_path / "fio.dat", 4 * MiB)
    log = tmp_path / "fio.iolog"
    subprocess.run(
        [
            "fio",
            "--name=t",
            f"--filename={data}",
            "--size=4M",
            "--rw=randrw",
            "--bs=4k",
            "--io_size=256k",
            "--fsync=8",
            "--ioengine=psync",
            "--thread",
            f"--write_iolog={log}",
            "--output=/dev/null",
            "--randseed=7",
        ],
        check=True,
        timeout=60,
    )
    text = log.read_text()
    assert text.startswith("fio version 3 iolog")
    lines, notes = importers.from_fio(text, bus="scsi")
    reqs = [json.loads(x) for x in lines[1:]]
    rw = [r for r in reqs if req_kind(r) in ("read", "write")]
    assert len(rw) == 64
    assert any(req_kind(r) == "flush" for r in reqs)
    assert all(r["t"] >= 0 for r in reqs)
    trace = tmp_path / "fio.jsonl"
    trace.write_text("\n".join(lines) + "\n")
    image = raw_file(tmp_path / "disk.img", 4 * MiB)
    rc, out, _ = replay(capsys, str(trace), "--file", str(image), "--verify", "--queue-depth", "4")
    assert rc == 0, out
    assert summary_value(out, "errors").startswith("device 0, trace 0, verify 0")


def test_import_fio_v2(tmp_path: Path) -> None:
    text = (
        "fio version 2 iolog\n/dev/x add\n/dev/x open\n/dev/x write 0 4096\n"
        "/dev/x read 0 4096\n/dev/x trim 4096 8192\n/dev/x sync 0 0\n/dev/x close\n"
    )
    lines, _ = importers.from_fio(text, bus="ata")
    kinds = [req_kind(json.loads(x)) for x in lines[1:]]
    assert kinds == ["write", "read", "discard", "flush"]


def test_trace_import_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "v.jsonl"
    assert (
        main(["trace", "import", "--from", "qemu", str(TRACES / "virtio-verify.log"), str(out)])
        == 0
    )
    _, err = capsys.readouterr()
    assert "imported" in err
    assert json.loads(out.read_text().splitlines()[0])["source"] == "qemu virtio-blk"
    assert (
        main(["trace", "import", "--from", "fio", str(TRACES / "virtio-verify.log"), str(out)]) == 2
    )
    _, err = capsys.readouterr()
    assert err.startswith("imgfs: error: not a fio iolog")


def test_decode_rate_smoke() -> None:
    """Decoding alone is cheap (the bench target is 200k requests/s; here only a sanity floor
    so a loaded CI machine does not fail it)."""
    from imgfs.emulation import ata, scsi, virtio

    cdb = bytes.fromhex("2a000000100000000800")
    fis = ata.build_fis(0x61, 4096, 8)
    hdr = virtio.build_header(1, 4096)
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        scsi.decode(cdb)
        ata.decode(fis)
        virtio.decode(hdr)
    rate = 3 * n / (time.perf_counter() - start)
    assert rate > 50_000, rate


def test_no_emulation_imports_in_block_or_formats() -> None:
    root = Path(__file__).resolve().parents[2] / "imgfs"
    for sub in ("block", "formats"):
        for path in (root / sub).rglob("*.py"):
            text = path.read_text()
            assert "imgfs.emulation" not in text and "from . import emulation" not in text, path
    assert os.path.isdir(root / "emulation")


@pytest.mark.parametrize("bus", ["virtio", "scsi", "ide", "ahci"])
def test_import_qemu_with_strace_gives_discard_ranges(tmp_path: Path, capsys, bus: str) -> None:
    trace = tmp_path / "t.jsonl"
    assert (
        main(
            [
                "trace",
                "import",
                "--from",
                "qemu",
                "--strace",
                str(TRACES / f"{bus}-fstrim.strace.txt"),
                str(TRACES / f"{bus}-fstrim.log"),
                str(trace),
            ]
        )
        == 0
    )
    capsys.readouterr()
    image = raw_file(tmp_path / "disk.img", GUEST_DISK)
    with open(image, "r+b") as f:  # something for the discards to remove
        f.write(b"\xee" * (1 * MiB))
        f.seek(16953344)
        f.write(b"\xee" * (1 * MiB))
    res = tmp_path / "r.jsonl"
    rc, out, _ = replay(
        capsys, str(trace), "--image", str(image), "--results", str(res), "--verify"
    )
    assert rc == 0, out
    discarded = sum(r["bytes"] for r in results(res) if r.get("kind") == "discard")
    # what the guest's fstrim reported: "/mnt: 224428032 bytes trimmed" (vmkit RESULTS.md)
    assert discarded == 224428032
    with open(image, "rb") as f:
        f.seek(16953344)  # the first free extent ext4 trims (vmkit README)
        assert f.read(1 * MiB) == bytes(1 * MiB)


def _writable_formats() -> list[str]:
    """Formats with a writable driver on this branch that qemu-img can create (qcow2, vmdk...
    join as their drivers land)."""
    from imgfs.block.registry import get_driver
    from imgfs.errors import ImgfsError

    found = ["raw"]
    for fmt in ("qcow2", "qed", "vmdk", "vdi", "vpc", "vhdx"):
        try:
            if get_driver(fmt).supports_write:
                found.append(fmt)
        except ImgfsError:
            pass
    return found


@pytest.mark.parametrize("cache", ["writeback", "none"])
@pytest.mark.parametrize("fmt", _writable_formats())
def test_replay_through_each_driver(tmp_path: Path, capsys, fmt: str, cache: str) -> None:
    image = tmp_path / f"guest.{fmt}"
    # vpc rounds the size to a CHS geometry unless forced: the guest's disk was 256 MiB exactly
    opts = ["-o", "force_size=on"] if fmt == "vpc" else []
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, *opts, str(image), str(GUEST_DISK)], check=True
    )
    target = DiskTarget.open(str(image), fmt, CacheMode.WRITEBACK)
    can_discard = target.can_discard
    target.close()
    # With discard, the discard ranges come from the strace log. A driver that cannot
    # deallocate gets no discard offered: its 4 discards are answered UNSUPP (QEMU answered
    # OK, hence 4 expect mismatches), and the trace without ranges keeps both copies equal.
    strace = ["--strace", str(TRACES / "virtio-fstrim.strace.txt")] if can_discard else []
    trace = tmp_path / "t.jsonl"
    log = str(TRACES / "virtio-fstrim.log")
    assert main(["trace", "import", "--from", "qemu", *strace, log, str(trace)]) == 0
    capsys.readouterr()
    args = ["--image", str(image), "-f", fmt, "--cache", cache, "--queue-depth", "4"]
    rc, out, err = replay(capsys, str(trace), *args, "--verify", "--verify-initial", "zero")
    errors = summary_value(out, "errors")
    if can_discard:
        assert rc == 0, out + err
        assert errors.startswith("device 0, trace 0, verify 0") and errors.endswith("expect 0")
    else:
        assert rc == 1, out + err
        assert errors.startswith("device 4, trace 0, verify 0") and errors.endswith("expect 4")
    plain = raw_file(tmp_path / "plain.raw", GUEST_DISK)
    assert replay(capsys, str(trace), "--file", str(plain))[0] == 0
    if fmt != "raw":
        assert_qemu_check_clean(image, fmt)
    subprocess.run(
        ["qemu-img", "compare", "-q", "-f", fmt, "-F", "raw", str(image), str(plain)], check=True
    )


def test_progress_line_on_stderr(tmp_path: Path, capsys) -> None:
    target = FileTarget(str(raw_file(tmp_path / "d.raw", 1 * MiB)))
    lines = ['{"bus":"virtio","cmd":"04000000000000000000000000000000"}'] * 50
    r = Replayer(target, progress=True, total=50)
    r.run(lines)
    target.close()
    err = capsys.readouterr().err
    assert "/50 (" in err and "req/s" in err
    assert err.endswith("\r\x1b[K")  # the line is cleared at the end
