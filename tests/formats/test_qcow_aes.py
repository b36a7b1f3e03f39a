"""qcow (version 1) with AES encryption: qemu-img 7.2 still creates it (-o encrypt.format=aes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgfs.create import create_image
from imgfs.errors import KeyRequired, Unsupported
from tests.formats.crypto_util import (
    key_file,
    open_keyed,
    qemu_compare,
    qemu_create,
    qemu_io,
    qemu_raw,
    read_all,
)
from tests.formats.test_qcow2_crypto import scribble

MiB = 1024 * 1024


@pytest.mark.parametrize("backing", [False, True], ids=["plain", "over-backing"])
def test_qemu_qcow_aes(tmp_path: Path, backing: bool) -> None:
    pw = key_file(tmp_path)
    image = tmp_path / "d.qcow"
    options = "encrypt.format=aes"
    if backing:
        (tmp_path / "base.raw").write_bytes(b"\x77" * (3 * MiB))
        options += ",backing_file=base.raw,backing_fmt=raw"
    qemu_create(image, "qcow", "3M", pw, options)
    qemu_io(image, "qcow", pw, "write -P 0x5a 1000 70000", "write -P 0x33 2M 4096")
    ref = qemu_raw(image, "qcow", pw, tmp_path / "ref.raw")
    disk = open_keyed(image, pw)
    try:
        got = read_all(disk)
        assert got == ref.read_bytes()
        expected = bytearray(got)
        scribble(disk, expected, 9)
        disk.write_zeroes(5000, 70000)
        expected[5000:75000] = bytes(70000)
        assert read_all(disk) == expected
        with pytest.raises(Unsupported):
            disk.write_compressed(0, bytes(disk.compressed_write_unit()))
    finally:
        disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu_compare(image, "qcow", pw, tmp_path / "expected.raw")


def test_imgfs_created_opens_in_qemu(tmp_path: Path) -> None:
    pw = key_file(tmp_path)
    image = tmp_path / "new.qcow"
    create_image(str(image), "qcow", 2 * MiB, {"encrypt.format": "aes", "key-file": str(pw)})
    with pytest.raises(KeyRequired, match="new.qcow"):
        open_keyed(image, tmp_path / "no-such-key")
    disk = open_keyed(image, pw)
    expected = bytearray(2 * MiB)
    try:
        assert read_all(disk) == expected
        scribble(disk, expected, 10)
        assert disk.top.info().encrypted
    finally:
        disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu_compare(image, "qcow", pw, tmp_path / "expected.raw")
