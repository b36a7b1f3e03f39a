"""Encrypted qcow2 (LUKS and legacy AES): reads against qemu-img convert, writes checked with
qemu-img check and compare, images imgfs creates opened by qemu, keys per backing layer."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.convert import convert
from imgfs.create import create_image
from imgfs.errors import CorruptImage, InvalidRequest, KeyRequired, Unsupported, WrongKey
from imgfs.keys import KeyRing
from tests.formats.crypto_util import (
    OTHER_PASSPHRASE,
    PASSPHRASE,
    key_file,
    open_keyed,
    qemu_check_clean,
    qemu_compare,
    qemu_create,
    qemu_io,
    qemu_raw,
    read_all,
)

MiB = 1024 * 1024

# (cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg) that qemu-img 7.2 creates.
FAST_LUKS = [
    ("aes-256", "xts", "plain64", None, "sha256"),
    ("aes-128", "cbc", "essiv", "sha256", "sha1"),
]
SLOW_LUKS = [
    ("aes-128", "xts", "plain64", None, "sha256"),
    ("aes-256", "cbc", "plain64", None, "sha512"),
    ("aes-256", "cbc", "plain", None, "sha256"),
    ("aes-256", "cbc", "essiv", "sha256", "sha256"),
    ("aes-128", "ecb", "plain64", None, "sha256"),
    ("aes-256", "ctr", "plain64", None, "sha384"),
    ("aes-128", "xts", "plain", None, "sha224"),
    ("cast5-128", "cbc", "plain64", None, "sha256"),
    ("cast5-128", "ctr", "plain", None, "md5"),
    ("aes-256", "xts", "essiv", "sha256", "ripemd160"),
]


def luks_options(alg: str, mode: str, ivgen: str, ivhash: str | None, hash_alg: str) -> str:
    o = (
        f"encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg={alg},"
        f"encrypt.cipher-mode={mode},encrypt.ivgen-alg={ivgen},encrypt.hash-alg={hash_alg}"
    )
    return o + (f",encrypt.ivgen-hash-alg={ivhash}" if ivhash else "")


def scribble(disk, expected: bytearray, seed: int, count: int = 25) -> None:
    """Writes at odd offsets and sizes (sector edges, cluster edges, runs of clusters)."""
    rng = random.Random(seed)
    size = len(expected)
    for _ in range(count):
        off = rng.randrange(size)
        n = min(rng.choice([1, 511, 513, 4096, 65537, 200_000]), size - off)
        data = rng.randbytes(n)
        disk.write(off, data)
        expected[off : off + n] = data


def check_qcow2(tmp_path: Path, image: Path, pw: Path, seed: int) -> None:
    """Read equals qemu's; writes through the driver pass qemu-img check and compare."""
    ref = qemu_raw(image, "qcow2", pw, tmp_path / "ref.raw")
    disk = open_keyed(image, pw)
    try:
        assert not disk.top.cheap_reads
        got = read_all(disk)
        assert got == ref.read_bytes()
        expected = bytearray(got)
        scribble(disk, expected, seed)
        assert read_all(disk) == expected
    finally:
        disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu_check_clean(image, "qcow2", pw)
    qemu_compare(image, "qcow2", pw, tmp_path / "expected.raw")


def qemu_image(tmp_path: Path, pw: Path, options: str, size: str = "4M") -> Path:
    image = tmp_path / "q.qcow2"
    qemu_create(image, "qcow2", size, pw, options)
    qemu_io(image, "qcow2", pw, "write -P 0x5a 1000 70000", "write -P 0xa5 3M 300k")
    return image


@pytest.mark.parametrize("combo", FAST_LUKS, ids=lambda c: "-".join(x for x in c if x))
def test_qemu_luks_read_write(tmp_path: Path, combo: tuple) -> None:
    pw = key_file(tmp_path)
    check_qcow2(tmp_path, qemu_image(tmp_path, pw, luks_options(*combo)), pw, 1)


@pytest.mark.slow
@pytest.mark.parametrize("combo", SLOW_LUKS, ids=lambda c: "-".join(x for x in c if x))
def test_qemu_luks_matrix(tmp_path: Path, combo: tuple) -> None:
    pw = key_file(tmp_path)
    check_qcow2(tmp_path, qemu_image(tmp_path, pw, luks_options(*combo)), pw, 2)


def test_qemu_aes_read_write(tmp_path: Path) -> None:
    pw = key_file(tmp_path)
    check_qcow2(tmp_path, qemu_image(tmp_path, pw, "encrypt.format=aes"), pw, 3)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param("cluster_size=4096", marks=pytest.mark.slow),
        pytest.param("compat=0.10", marks=pytest.mark.slow),
        "extended_l2=on,cluster_size=16k",
    ],
)
def test_qemu_luks_layouts(tmp_path: Path, options: str) -> None:
    pw = key_file(tmp_path)
    image = qemu_image(tmp_path, pw, "encrypt.format=luks,encrypt.iter-time=10," + options)
    check_qcow2(tmp_path, image, pw, 4)


@pytest.mark.parametrize(
    "options",
    [
        {"encrypt.format": "luks", "encrypt.iter-time": "10"},
        {"encrypt.format": "aes"},
        {"encryption": "on", "compat": "0.10"},
        {
            "encrypt.format": "luks",
            "encrypt.iter-time": "10",
            "encrypt.cipher-alg": "aes-128",
            "encrypt.cipher-mode": "cbc",
            "encrypt.ivgen-alg": "essiv",
            "encrypt.hash-alg": "sha512",
            "cluster_size": "16k",
        },
    ],
    ids=["luks", "aes", "aes-v2", "luks-cbc-essiv"],
)
def test_imgfs_created_opens_in_qemu(tmp_path: Path, options: dict[str, str]) -> None:
    pw = key_file(tmp_path)
    image = tmp_path / "new.qcow2"
    create_image(str(image), "qcow2", 3 * MiB, {**options, "key-file": str(pw)})
    qemu_check_clean(image, "qcow2", pw)
    disk = open_keyed(image, pw)
    expected = bytearray(3 * MiB)
    try:
        assert read_all(disk) == expected
        scribble(disk, expected, 5)
    finally:
        disk.close()
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu_check_clean(image, "qcow2", pw)
    qemu_compare(image, "qcow2", pw, tmp_path / "expected.raw")


def test_backing_files_have_their_own_keys(tmp_path: Path) -> None:
    """An encrypted overlay over an encrypted base with another passphrase; qemu reads the
    chain with both secrets, imgfs with a KeyRing naming both files."""
    pw_base = key_file(tmp_path, PASSPHRASE, "base.key")
    pw_top = key_file(tmp_path, OTHER_PASSPHRASE, "top.key")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create_image(
        str(base),
        "qcow2",
        2 * MiB,
        {"encrypt.format": "luks", "encrypt.iter-time": "10", "key-file": str(pw_base)},
    )
    disk = open_keyed(base, pw_base)
    disk.write(0, b"B" * (2 * MiB))
    disk.close()
    create_image(
        str(top),
        "qcow2",
        2 * MiB,
        {
            "encrypt.format": "luks",
            "encrypt.iter-time": "10",
            "key-file": str(pw_top),
            "backing_file": "base.qcow2",
            "backing_fmt": "qcow2",
        },
    )
    ring = KeyRing(files={"base.qcow2": str(pw_base), "top.qcow2": str(pw_top)})
    disk = open_disk(str(top), keys=ring)
    disk.write(1000, b"T" * 3000)
    disk.close()
    ref = qemu_raw(
        top, "qcow2", pw_top, tmp_path / "ref.raw", "backing.encrypt.key-secret=s1", pw_base
    )
    disk = open_disk(str(top), keys=ring, read_only=True)
    try:
        assert read_all(disk) == ref.read_bytes()
        assert read_all(disk)[:4000] == b"B" * 1000 + b"T" * 3000
    finally:
        disk.close()
    with pytest.raises(KeyRequired, match="base.qcow2"):
        open_disk(str(top), keys=KeyRing(files={"top.qcow2": str(pw_top)}))


def test_missing_and_wrong_key(tmp_path: Path) -> None:
    pw = key_file(tmp_path)
    image = qemu_image(tmp_path, pw, luks_options(*FAST_LUKS[0]))
    with pytest.raises(KeyRequired) as missing:
        open_disk(str(image))
    wrong = key_file(tmp_path, PASSPHRASE.rstrip(b"\n"), "wrong")  # the newline matters
    with pytest.raises(WrongKey) as bad:
        open_keyed(image, wrong)
    for e in (missing.value, bad.value):
        assert "q.qcow2" in str(e)
        assert b"horse" not in str(e).encode() and b"horse" not in repr(e).encode()


def test_aes_wrong_key_is_not_detected_but_never_writes(tmp_path: Path) -> None:
    """Legacy AES has no key check (as in QEMU): a wrong key reads noise. Nothing to test
    beyond that the right key still reads what qemu wrote."""
    pw = key_file(tmp_path)
    image = qemu_image(tmp_path, pw, "encrypt.format=aes")
    other = key_file(tmp_path, OTHER_PASSPHRASE, "other")
    disk = open_keyed(image, other, read_only=True)
    try:
        assert read_all(disk)[1000:1004] != b"\x5a" * 4
    finally:
        disk.close()


def test_compressed_writes_refused(tmp_path: Path) -> None:
    pw = key_file(tmp_path)
    image = tmp_path / "c.qcow2"
    create_image(str(image), "qcow2", MiB, {"encrypt.format": "aes", "key-file": str(pw)})
    disk = open_keyed(image, pw)
    try:
        with pytest.raises(Unsupported, match="compressed"):
            disk.write_compressed(0, bytes(65536))
    finally:
        disk.close()
    src = tmp_path / "src.raw"
    src.write_bytes(b"x" * MiB)
    with pytest.raises(Unsupported, match="compressed"):
        convert(
            str(src),
            str(tmp_path / "out.qcow2"),
            src_fmt="raw",
            dst_fmt="qcow2",
            options={"encrypt.format": "aes", "key-file": str(pw)},
            compress=True,
        )
    assert not (tmp_path / "out.qcow2").exists()


def test_convert_into_encrypted_qcow2(tmp_path: Path) -> None:
    pw = key_file(tmp_path)
    src = tmp_path / "src.raw"
    data = os.urandom(MiB) + bytes(MiB) + os.urandom(4096)
    src.write_bytes(data)
    out = tmp_path / "out.qcow2"
    convert(
        str(src),
        str(out),
        src_fmt="raw",
        dst_fmt="qcow2",
        options={"encrypt.format": "luks", "encrypt.iter-time": "10", "key-file": str(pw)},
    )
    qemu_check_clean(out, "qcow2", pw)
    qemu_compare(out, "qcow2", pw, src)


def test_unsupported_ciphers_are_named(tmp_path: Path) -> None:
    pw = key_file(tmp_path)
    image = tmp_path / "s.qcow2"
    create_image(
        str(image),
        "qcow2",
        MiB,
        {"encrypt.format": "luks", "encrypt.iter-time": "10", "key-file": str(pw)},
    )
    raw = bytearray(image.read_bytes())
    at = raw.find(b"LUKS\xba\xbe") + 8
    raw[at : at + 32] = b"twofish".ljust(32, b"\0")  # as qemu-img writes cipher-alg=twofish-256
    image.write_bytes(raw)
    with pytest.raises(Unsupported, match="twofish-256-xts-plain64"):
        open_keyed(image, pw)
    with pytest.raises(Unsupported, match="serpent"):
        create_image(
            str(tmp_path / "x.qcow2"),
            "qcow2",
            MiB,
            {"encrypt.format": "luks", "encrypt.cipher-alg": "serpent-256", "key-file": str(pw)},
        )
    with pytest.raises(InvalidRequest, match="passphrase"):
        create_image(str(tmp_path / "y.qcow2"), "qcow2", MiB, {"encrypt.format": "luks"})


def test_hostile_luks_header(tmp_path: Path) -> None:
    """Key slot iterations, key material offsets and the FDE extension out of bounds are
    CorruptImage before any PBKDF2 runs."""
    pw = key_file(tmp_path)
    image = tmp_path / "h.qcow2"
    create_image(
        str(image),
        "qcow2",
        MiB,
        {"encrypt.format": "luks", "encrypt.iter-time": "10", "key-file": str(pw)},
    )
    raw = bytearray(image.read_bytes())
    ext = raw.find(bytes.fromhex("0537be77"))
    luks_at = int.from_bytes(raw[ext + 8 : ext + 16], "big")
    slot0 = luks_at + 208
    cases = {
        "iterations": (slot0 + 4, (0xFFFFFFFF).to_bytes(4, "big")),
        "key material": (slot0 + 40, (0x7FFFFFFF).to_bytes(4, "big")),
        "stripes": (slot0 + 44, (0xFFFFFFFF).to_bytes(4, "big")),
        "LUKS header at": (ext + 8, (12345).to_bytes(8, "big")),
    }
    for what, (at, value) in cases.items():
        bad = bytearray(raw)
        bad[at : at + len(value)] = value
        path = tmp_path / "bad.qcow2"
        path.write_bytes(bad)
        with pytest.raises(CorruptImage, match=what):
            open_keyed(path, pw)
