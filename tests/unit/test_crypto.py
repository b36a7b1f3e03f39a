"""imgfs.crypto against independent constructions: the batched/vectorised sector modes (XTS,
CBC, CTR, ECB with every IV generator) against one cryptography call per sector (or a plain
per-block construction where OpenSSL lacks the mode), AF split/merge, Secret hygiene."""

from __future__ import annotations

import hashlib
import os
import pickle
import threading

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfs.crypto import Secret, luks1
from imgfs.crypto.cipher import (
    CAST5,
    CBC_ROWS_MIN_SECTORS,
    CIPHER_KEY_BYTES,
    RUN_SECTORS,
    XTS_NARROW_MIN_SECTORS,
    CipherSpec,
    SectorCipher,
    essiv_alg,
)
from imgfs.errors import InvalidRequest, Unsupported


def per_sector(spec: CipherSpec, key: bytes, data: bytes, first: int) -> bytes:
    """The obvious construction: one library call per sector."""
    c = SectorCipher(spec, key)
    out = b""
    for i in range(len(data) // 512):
        iv = c.ivs(first + i, 1)
        if spec.mode == "xts":
            mode = modes.XTS(iv)
            alg = algorithms.AES(key)
        else:
            mode = modes.CBC(iv)
            alg = algorithms.AES(key)
        out += Cipher(alg, mode).encryptor().update(data[i * 512 : (i + 1) * 512])
    return out


@pytest.mark.parametrize(
    "spec,key_bytes",
    [
        (CipherSpec("aes-256", "xts", "plain64"), 64),
        (CipherSpec("aes-128", "xts", "plain"), 32),
        (CipherSpec("aes-256", "cbc", "essiv", "sha256"), 32),
        (CipherSpec("aes-128", "cbc", "plain64"), 16),
    ],
    ids=lambda v: v.describe() if isinstance(v, CipherSpec) else "",
)
def test_batched_equals_per_sector(spec: CipherSpec, key_bytes: int) -> None:
    key = os.urandom(key_bytes)
    data = os.urandom(512 * 37)
    first = (1 << 32) - 5  # plain wraps at 32 bits, plain64 does not
    expected = per_sector(spec, key, data, first)
    c = SectorCipher(spec, key)
    assert c.encrypt(data, first) == expected
    assert c.decrypt(expected, first) == data


def test_xts_tweaks_for_essiv_and_sm4_round_trip() -> None:
    for spec, n in ((CipherSpec("sm4", "xts", "plain64"), 32),
                    (CipherSpec("aes-256", "xts", "essiv", "sha256"), 64),
                    (CipherSpec("cast5-128", "ctr", "plain"), 16),
                    (CipherSpec("cast5-128", "cbc", "plain64"), 16)):  # fmt: skip
        c = SectorCipher(spec, os.urandom(n))
        data = os.urandom(4096)
        assert c.decrypt(c.encrypt(data, 99), 99) == data
        assert c.encrypt(data, 99) != c.encrypt(data, 100)


def test_spec_errors_name_the_combination() -> None:
    with pytest.raises(Unsupported, match="twofish-256-xts-plain64"):
        CipherSpec("twofish-256").validate()
    with pytest.raises(InvalidRequest, match="XTS needs a 128-bit block"):
        CipherSpec("cast5-128", "xts").validate()
    with pytest.raises(Unsupported, match="essiv with sha1"):
        CipherSpec("aes-128", "cbc", "essiv", "sha1").validate()
    with pytest.raises(InvalidRequest, match="whole sectors"):
        SectorCipher(CipherSpec("aes-128", "cbc"), bytes(16)).decrypt(bytes(100), 0)


@pytest.mark.parametrize("hash_name", ["sha256", "sha1", "sha512", "ripemd160"])
def test_af_split_merge(hash_name: str) -> None:
    key = os.urandom(64)
    split = luks1.af_split(key, 400, hash_name)
    assert len(split) == 64 * 400
    assert luks1.af_merge(split, 64, 400, hash_name) == key
    broken = bytearray(split)
    broken[5] ^= 1
    assert luks1.af_merge(bytes(broken), 64, 400, hash_name) != key


def test_secret_never_shows() -> None:
    s = Secret(b"hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s!r}"
    with pytest.raises(TypeError):
        pickle.dumps(s)
    assert s.reveal() == b"hunter2"


# -- every supported cipher/mode/IV generator against a per-sector reference ---------------------

FAMILY = {"aes": algorithms.AES, "sm4": algorithms.SM4, "cast5": CAST5}
MASK64 = (1 << 64) - 1


def supported_specs() -> list[CipherSpec]:
    specs = []
    for alg in ("aes-128", "aes-192", "aes-256", "sm4", "cast5-128"):
        for mode in ("ecb", "cbc", "xts", "ctr"):
            for ivgen, hash_name in (("plain", None), ("plain64", None), ("essiv", "sha256"),
                                     ("essiv", "md5")):  # fmt: skip
                spec = CipherSpec(alg, mode, ivgen, hash_name)
                try:
                    spec.validate()
                except Exception:
                    continue
                specs.append(spec)
    return specs


SPECS = supported_specs()


def test_spec_matrix_covers_every_family_and_mode() -> None:
    seen = {(s.family, s.mode, s.ivgen) for s in SPECS}
    for fam in ("aes", "sm4"):
        for mode in ("ecb", "cbc", "xts", "ctr"):
            for ivgen in ("plain", "plain64", "essiv"):
                assert (fam, mode, ivgen) in seen
    assert ("cast5", "cbc", "essiv") in seen and ("cast5", "ctr", "plain") in seen


def ref_iv(spec: CipherSpec, key: bytes, sector: int, block: int) -> bytes:
    """The IV written out from its definition: the little-endian sector number (32 bits for
    plain) zero-padded to a block, or for essiv that encrypted with the key's hash."""
    if spec.ivgen == "plain":
        raw = (sector & 0xFFFFFFFF).to_bytes(4, "little")
    else:
        raw = (sector & MASK64).to_bytes(8, "little")
    raw = raw[:block].ljust(block, b"\0")
    if spec.ivgen == "essiv":
        assert spec.ivgen_hash is not None
        salt = hashlib.new(spec.ivgen_hash, key).digest()
        alg = FAMILY[CIPHER_KEY_BYTES[essiv_alg(spec.alg, spec.ivgen_hash)][0]](salt)
        raw = Cipher(alg, modes.ECB()).encryptor().update(raw)
    return raw


def ecb(fam: str, key: bytes, data: bytes) -> bytes:
    return Cipher(FAMILY[fam](key), modes.ECB()).encryptor().update(data)


def xts_by_blocks(fam: str, key: bytes, iv: bytes, sector: bytes) -> bytes:
    """IEEE 1619 XTS one block at a time with Python integers (for SM4, which OpenSSL's XTS
    in cryptography does not take, nor AES-192)."""
    k1, k2 = key[: len(key) // 2], key[len(key) // 2 :]
    t = int.from_bytes(ecb(fam, k2, iv), "little")
    out = b""
    for j in range(0, len(sector), 16):
        p = int.from_bytes(sector[j : j + 16], "little") ^ t
        c = int.from_bytes(ecb(fam, k1, p.to_bytes(16, "little")), "little") ^ t
        out += c.to_bytes(16, "little")
        t <<= 1
        if t >> 128:
            t ^= (1 << 128) | 0x87
    return out


def ctr_by_blocks(fam: str, key: bytes, iv: bytes, sector: bytes) -> bytes:
    """CTR with the IV counted up as one big-endian integer per block."""
    b = len(iv)
    counter = int.from_bytes(iv, "big")
    stream = b"".join(
        ((counter + k) % (1 << (8 * b))).to_bytes(b, "big") for k in range(len(sector) // b)
    )
    ks = ecb(fam, key, stream)
    return bytes(x ^ y for x, y in zip(sector, ks, strict=True))


def ref_encrypt(spec: CipherSpec, key: bytes, data: bytes, first: int) -> bytes:
    fam = spec.family
    block = 8 if fam == "cast5" else 16
    out = []
    for i in range(len(data) // 512):
        sector = data[i * 512 : (i + 1) * 512]
        iv = ref_iv(spec, key, first + i, block)
        if spec.mode == "ecb":
            out.append(ecb(fam, key, sector))
        elif spec.mode == "cbc":
            out.append(Cipher(FAMILY[fam](key), modes.CBC(iv)).encryptor().update(sector))
        elif spec.mode == "xts" and fam == "aes" and len(key) != 48:  # no XTS-AES-192
            out.append(Cipher(algorithms.AES(key), modes.XTS(iv)).encryptor().update(sector))
        elif spec.mode == "xts":
            out.append(xts_by_blocks(fam, key, iv, sector))
        elif fam == "cast5":  # OpenSSL has no CAST5-CTR
            out.append(ctr_by_blocks(fam, key, iv, sector))
        else:
            out.append(Cipher(FAMILY[fam](key), modes.CTR(iv)).encryptor().update(sector))
    return b"".join(out)


sector_numbers = st.one_of(
    st.integers(0, 1 << 20),
    st.integers((1 << 32) - 70, (1 << 32) + 70),  # plain wraps at 32 bits
    st.integers((1 << 63) - 70, (1 << 63) + 70),
    st.integers((1 << 64) - 70, MASK64),  # plain64 wraps at 64 bits
    st.integers(0, MASK64),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.sampled_from(SPECS),
    first=sector_numbers,
    count=st.integers(1, 64),
    offset=st.integers(0, 15),
    kind=st.sampled_from(["bytes", "bytearray", "memoryview"]),
    seed=st.binary(min_size=16, max_size=16),
)
def test_every_mode_equals_per_sector_reference(
    spec: CipherSpec, first: int, count: int, offset: int, kind: str, seed: bytes
) -> None:
    key = hashlib.shake_256(seed + b"key").digest(spec.key_bytes)
    data = hashlib.shake_256(seed).digest(512 * count)
    expected = ref_encrypt(spec, key, data, first)
    c = SectorCipher(spec, key)

    def as_kind(b: bytes) -> bytes | bytearray | memoryview:
        padded = bytes(offset) + b  # misaligned views must work too
        if kind == "bytes":
            return padded[offset:]
        if kind == "bytearray":
            return bytearray(padded)[offset:]
        return memoryview(padded)[offset:]

    plain_in = as_kind(data)
    assert bytes(c.encrypt(plain_in, first)) == expected
    assert bytes(plain_in) == data  # the input is never touched
    cipher_in = as_kind(expected)
    assert bytes(c.decrypt(cipher_in, first)) == data
    assert bytes(cipher_in) == expected


def test_ivs_wrap_like_the_counters() -> None:
    c64 = SectorCipher(CipherSpec("aes-128", "cbc", "plain64"), bytes(16))
    ivs = c64.ivs(MASK64 - 1, 3)
    assert [int.from_bytes(ivs[i * 16 : i * 16 + 8], "little") for i in range(3)] == [
        MASK64 - 1, MASK64, 0,
    ]  # fmt: skip
    assert all(ivs[i * 16 + 8 : i * 16 + 16] == bytes(8) for i in range(3))
    c32 = SectorCipher(CipherSpec("aes-128", "cbc", "plain"), bytes(16))
    ivs = c32.ivs((5 << 32) + 0xFFFFFFFF, 2)
    assert ivs == (0xFFFFFFFF).to_bytes(16, "little") + bytes(16)


def test_threads_share_one_cipher() -> None:
    """Per-thread scratch buffers: concurrent calls of different sizes stay correct."""
    spec = CipherSpec("aes-256", "xts", "plain64")
    key = os.urandom(64)
    c = SectorCipher(spec, key)
    errors: list[str] = []

    def worker(count: int) -> None:
        data = os.urandom(512 * count)
        expected = ref_encrypt(spec, key, data, 1000 + count)
        for _ in range(30):
            if c.encrypt(data, 1000 + count) != expected:
                errors.append(f"encrypt {count}")
            if c.decrypt(expected, 1000 + count) != data:
                errors.append(f"decrypt {count}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 7, 64, 300)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize(
    "spec",
    [
        CipherSpec("aes-256", "xts", "plain64"),
        CipherSpec("aes-128", "xts", "essiv", "sha256"),
        CipherSpec("aes-256", "cbc", "essiv", "sha256"),
        CipherSpec("aes-256", "ctr", "essiv", "sha256"),
    ],
    ids=CipherSpec.describe,
)
def test_long_runs_equal_per_sector_reference(spec: CipherSpec) -> None:
    """Runs long enough to be cut into pieces (a full one, with the 8-at-a-time XTS tweaks,
    and a short tail that CBC encrypts sector by sector), crossing the 32-bit sector
    boundary."""
    key = os.urandom(spec.key_bytes)
    count = RUN_SECTORS + 7
    assert RUN_SECTORS >= XTS_NARROW_MIN_SECTORS and 7 < CBC_ROWS_MIN_SECTORS
    data = os.urandom(512 * count)
    first = (1 << 32) - 500
    expected = ref_encrypt(spec, key, data, first)
    c = SectorCipher(spec, key)
    assert c.encrypt(data, first) == expected
    assert c.decrypt(expected, first) == data
