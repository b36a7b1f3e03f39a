"""Encrypted images in a real FUSE mount: keys per image (--key NAME=FILE, --key-dir), wrong
and missing keys leave only that image out (one log line each), passphrases never logged;
imgfs info/create/convert with --key."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from imgfs.create import create_image
from tests.formats.crypto_util import (
    OTHER_PASSPHRASE,
    PASSPHRASE,
    key_file,
    qemu_check_clean,
    qemu_compare,
    qemu_create,
    qemu_io,
    qemu_raw,
)
from tests.mountutil import run_imgfs
from tests.oracle import assert_same_bytes

MiB = 1024 * 1024


def luks_qcow2(path: Path, pw: Path, size: int = 2 * MiB) -> None:
    create_image(
        str(path),
        "qcow2",
        size,
        {"encrypt.format": "luks", "encrypt.iter-time": "10", "key-file": str(pw)},
    )


def test_mount_with_keys(images: Path, mount, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    key_dir = tmp_path / "keys"
    secrets.mkdir()
    key_dir.mkdir()
    pw = key_file(secrets, PASSPHRASE, "a")
    other = key_file(secrets, OTHER_PASSPHRASE, "b")
    wrong = key_file(secrets, b"not it", "wrong")
    # qemu's own LUKS qcow2, with data.
    qemu_create(
        images / "qemu.qcow2", "qcow2", "2M", pw, "encrypt.format=luks,encrypt.iter-time=10"
    )
    qemu_io(images / "qemu.qcow2", "qcow2", pw, "write -P 0x5a 1000 70000")
    luks_qcow2(images / "enc.qcow2", pw)
    create_image(
        str(images / "enc.luks"), "luks", 2 * MiB, {"iter-time": "10", "key-file": str(other)}
    )
    key_file(key_dir, OTHER_PASSPHRASE, "enc.luks.key")
    create_image(
        str(images / "aes.qcow"), "qcow", 2 * MiB, {"encrypt.format": "aes", "key-file": str(pw)}
    )
    luks_qcow2(images / "wrong.qcow2", pw)
    luks_qcow2(images / "nokey.qcow2", pw)
    (images / "plain.raw").write_bytes(b"p" * MiB)

    m = mount(
        images,
        "--key",
        f"enc.qcow2={pw}",
        "--key",
        f"qemu.qcow2={pw}",
        "--key",
        f"aes.qcow={pw}",
        "--key",
        f"wrong.qcow2={wrong}",
        "--key-dir",
        str(key_dir),
    )
    m.expected_log_errors = ["wrong.qcow2: not exported", "nokey.qcow2: not exported"]
    names = sorted(os.listdir(m.path))
    assert names == [
        "aes.qcow.raw",
        "enc.luks.raw",
        "enc.qcow2.raw",
        "plain.raw.raw",
        "qemu.qcow2.raw",
    ]
    assert_same_bytes(
        m.file("qemu.qcow2"), qemu_raw(images / "qemu.qcow2", "qcow2", pw, tmp_path / "ref.raw")
    )
    rng = random.Random(11)
    expected: dict[str, bytearray] = {}
    for name in ("enc.qcow2", "enc.luks", "aes.qcow", "qemu.qcow2"):
        path = m.file(name)
        data = bytearray(path.read_bytes())
        with open(path, "r+b") as f:
            for _ in range(12):
                off = rng.randrange(len(data))
                piece = rng.randbytes(min(rng.choice([1, 700, 4096, 100_000]), len(data) - off))
                f.seek(off)
                f.write(piece)
                data[off : off + len(piece)] = piece
            f.flush()
            os.fsync(f.fileno())
        assert path.read_bytes() == data
        expected[name] = data
    # A key file added while mounted makes the image appear at the next rescan.
    key_file(key_dir, PASSPHRASE, "nokey.qcow2.key")
    deadline = time.monotonic() + 10
    while "nokey.qcow2.raw" not in os.listdir(m.path) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert m.file("nokey.qcow2").read_bytes() == bytes(2 * MiB)
    log = m.log_text()
    m.umount()
    for secret in (PASSPHRASE, OTHER_PASSPHRASE, b"not it"):
        assert secret.strip() not in log.encode()
    for name in ("wrong.qcow2", "nokey.qcow2"):
        assert sum(f"{name}: not exported" in line for line in log.splitlines()) == 1
    assert "no key given" in log and "opens none of" in log
    for name, fmt, key in (
        ("enc.qcow2", "qcow2", pw),
        ("enc.luks", "luks", other),
        ("aes.qcow", "qcow", pw),
        ("qemu.qcow2", "qcow2", pw),
    ):
        (tmp_path / "exp.raw").write_bytes(expected[name])
        if fmt == "qcow2":
            qemu_check_clean(images / name, fmt, key)
        qemu_compare(images / name, fmt, key, tmp_path / "exp.raw")


def test_cli_create_info_convert(tmp_path: Path) -> None:
    pw = key_file(tmp_path)
    image = tmp_path / "c.qcow2"
    r = run_imgfs(
        "create",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.iter-time=10",
        "--key",
        str(pw),
        str(image),
        "1M",
    )
    assert r.returncode == 0, r.stderr
    assert "horse" not in r.stdout + r.stderr
    r = run_imgfs("info", str(image))
    assert r.returncode == 0 and "encrypted: yes" in r.stdout and "no key given" in r.stdout
    r = run_imgfs("info", "--key", str(pw), str(image))
    assert r.returncode == 0 and "virtual size: 1 MiB" in r.stdout, r.stderr
    r = run_imgfs("info", "--key", str(key_file(tmp_path, b"nope", "bad")), str(image))
    assert r.returncode == 1 and "opens none of" in r.stdout
    r = run_imgfs("check", "--key", str(pw), str(image))
    assert r.returncode == 0, r.stdout + r.stderr
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(MiB))
    out = tmp_path / "out.luks"
    r = run_imgfs(
        "convert", "-O", "luks", "-o", "iter-time=10", "--target-key", str(pw), str(src), str(out)
    )
    assert r.returncode == 0, r.stderr
    qemu_compare(out, "luks", pw, src)
    back = tmp_path / "back.raw"
    r = run_imgfs("convert", "--key", f"out.luks={pw}", "-f", "luks", str(out), str(back))
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()
