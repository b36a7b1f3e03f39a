"""imgfs.crypto against independent constructions: the batched CBC decryption and the
hand-made XTS against one cryptography call per sector, AF split/merge, Secret hygiene."""

from __future__ import annotations

import os
import pickle

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from imgfs.crypto import Secret, luks1
from imgfs.crypto.cipher import CipherSpec, SectorCipher
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
