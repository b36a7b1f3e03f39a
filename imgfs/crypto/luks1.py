"""LUKS1 (the on-disk format of cryptsetup's version 1, which QEMU's ``luks`` format and qcow2's
``encrypt.format=luks`` store): the header, key slot unlocking and the anti-forensic splitter.

Layout (all integers big-endian): a 592-byte header, then eight key slots' key material, each
``key_bytes * stripes`` bytes at ``key_material_offset`` sectors from the header's start, then
the payload at ``payload_offset`` sectors. A key slot holds the master key split into
``stripes`` stripes (AF split), encrypted with a key derived from the passphrase by PBKDF2; the
master key is checked against ``mk_digest``, a PBKDF2 of the master key itself.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import constant_time

from imgfs.crypto.cipher import (
    CIPHER_KEY_BYTES,
    SECTOR,
    CipherSpec,
    SectorCipher,
    hash_digest_size,
)
from imgfs.crypto.secret import Secret
from imgfs.errors import CorruptImage, InvalidRequest, Unsupported, WrongKey

MAGIC = b"LUKS\xba\xbe"
HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
KEY_SLOT = struct.Struct(">II32sII")
NUM_SLOTS = 8
HEADER_SIZE = HEADER.size + NUM_SLOTS * KEY_SLOT.size
assert HEADER.size == 208 and KEY_SLOT.size == 48 and HEADER_SIZE == 592
SLOT_ACTIVE = 0x00AC71F3
SLOT_INACTIVE = 0x0000DEAD
DIGEST_SIZE = 20
SALT_SIZE = 32
STRIPES = 4000
ALIGN_SECTORS = 8  # QEMU aligns key material and payload to 4 KiB

# Hostile-input bounds: PBKDF2 cost and key material size. Real images use 1e3..1e7 iterations.
MAX_ITERATIONS = 20_000_000
MAX_KEY_MATERIAL = 16 * 1024 * 1024
MIN_ITERATIONS = 1000

# QEMU's LUKS hashes. hashlib (OpenSSL) has them all, ripemd160 included, which the
# cryptography package lacks; its pbkdf2_hmac is OpenSSL's PKCS5_PBKDF2_HMAC.
_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


@dataclass(slots=True)
class KeySlot:
    active: int
    iterations: int
    salt: bytes
    key_material_offset: int  # sectors from the header's start
    stripes: int


@dataclass(slots=True)
class LuksHeader:
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int  # sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    slots: list[KeySlot] = field(default_factory=list)

    @property
    def spec(self) -> CipherSpec:
        return cipher_spec(self.cipher_name, self.cipher_mode, self.key_bytes)

    def pack(self) -> bytes:
        out = HEADER.pack(
            MAGIC, 1, self.cipher_name.encode(), self.cipher_mode.encode(),
            self.hash_spec.encode(), self.payload_offset, self.key_bytes, self.mk_digest,
            self.mk_digest_salt, self.mk_digest_iter, self.uuid.encode(),
        )  # fmt: skip
        for s in self.slots:
            out += KEY_SLOT.pack(s.active, s.iterations, s.salt, s.key_material_offset, s.stripes)
        return out

    def format_specific(self) -> dict[str, object]:
        """The fields ``qemu-img info`` shows for a LUKS header."""
        spec = self.spec
        out: dict[str, object] = {
            "ivgen-alg": spec.ivgen,
            "hash-alg": self.hash_spec,
            "cipher-alg": spec.alg,
            "uuid": self.uuid,
            "cipher-mode": spec.mode,
            "slots": [
                {"active": s.active == SLOT_ACTIVE, "key-offset": s.key_material_offset * SECTOR}
                | ({"iters": s.iterations, "stripes": s.stripes} if s.active == SLOT_ACTIVE else {})
                for s in self.slots
            ],
            "payload-offset": self.payload_offset * SECTOR,
            "master-key-iters": self.mk_digest_iter,
        }
        if spec.ivgen_hash:
            out["ivgen-hash-alg"] = spec.ivgen_hash
        return out


def _cstr(raw: bytes, what: str, where: str) -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptImage(f"{where}: LUKS {what} {text!r} is not ASCII") from None


def cipher_spec(cipher_name: str, cipher_mode: str, key_bytes: int) -> CipherSpec:
    """A LUKS header's cipher (``aes``, ``xts-plain64``, 64) as QEMU's names."""
    mode, _, iv = cipher_mode.partition("-")
    ivgen, _, ivhash = iv.partition(":")
    size = key_bytes // 2 if mode == "xts" else key_bytes
    alg = None
    for name, (family, n) in CIPHER_KEY_BYTES.items():
        if family == cipher_name and n == size:
            alg = name
    if alg is None:
        raise Unsupported(
            f"LUKS cipher {cipher_name}-{cipher_mode} with a {key_bytes}-byte key is not supported"
        )
    spec = CipherSpec(alg, mode, ivgen or "plain64", ivhash or None)
    spec.validate()
    return spec


def luks_mode_string(spec: CipherSpec) -> str:
    iv = spec.ivgen + (f":{spec.ivgen_hash}" if spec.ivgen_hash else "")
    return f"{spec.mode}-{iv}"


def parse(buf: bytes, where: str, area_size: int | None = None) -> LuksHeader:
    """Parse and bound-check a LUKS1 header (``area_size``: bytes available for key material
    from the header's start, when the container bounds it)."""
    if len(buf) < HEADER_SIZE or buf[:6] != MAGIC:
        raise CorruptImage(f"{where}: not a LUKS header (magic {bytes(buf[:6])!r})")
    f = HEADER.unpack_from(buf)
    if f[1] != 1:
        raise Unsupported(f"{where}: LUKS version {f[1]} is not supported (1 is)")
    hdr = LuksHeader(
        cipher_name=_cstr(f[2], "cipher name", where),
        cipher_mode=_cstr(f[3], "cipher mode", where),
        hash_spec=_cstr(f[4], "hash spec", where),
        payload_offset=f[5],
        key_bytes=f[6],
        mk_digest=f[7],
        mk_digest_salt=f[8],
        mk_digest_iter=f[9],
        uuid=_cstr(f[10], "uuid", where),
    )
    if hdr.key_bytes not in (8, 16, 24, 32, 48, 64):
        raise CorruptImage(f"{where}: LUKS key_bytes {hdr.key_bytes} is invalid")
    if hdr.hash_spec not in _HASHES:
        raise Unsupported(f"{where}: LUKS hash {hdr.hash_spec!r} is not supported")
    if not 1 <= hdr.mk_digest_iter <= MAX_ITERATIONS:
        raise CorruptImage(f"{where}: LUKS mk_digest_iter {hdr.mk_digest_iter} is out of range")
    for i in range(NUM_SLOTS):
        active, iters, salt, km_offset, stripes = KEY_SLOT.unpack_from(
            buf, HEADER.size + i * KEY_SLOT.size
        )
        slot = KeySlot(active, iters, salt, km_offset, stripes)
        hdr.slots.append(slot)
        if active == SLOT_INACTIVE:
            continue
        if active != SLOT_ACTIVE:
            raise CorruptImage(f"{where}: LUKS key slot {i} state 0x{active:08x} is invalid")
        if not 1 <= iters <= MAX_ITERATIONS:
            raise CorruptImage(f"{where}: LUKS key slot {i} iterations {iters} out of range")
        size = hdr.key_bytes * stripes
        if stripes == 0 or size > MAX_KEY_MATERIAL:
            raise CorruptImage(f"{where}: LUKS key slot {i} stripes {stripes} is invalid")
        end = km_offset * SECTOR + size
        if km_offset * SECTOR < HEADER_SIZE or (area_size is not None and end > area_size):
            raise CorruptImage(
                f"{where}: LUKS key slot {i} key material at sector {km_offset} is outside "
                "the header area"
            )
        if hdr.payload_offset and end > hdr.payload_offset * SECTOR and area_size is None:
            raise CorruptImage(
                f"{where}: LUKS key slot {i} key material overlaps the payload at sector "
                f"{hdr.payload_offset}"
            )
    return hdr


def pbkdf2(hash_name: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    return hashlib.pbkdf2_hmac(hash_name, password, salt, iterations, length)


def _diffuse(block: bytes, hash_name: str) -> bytes:
    """LUKS's diffusion: each digest-sized piece i of the block is replaced by
    H(be32(i) || piece), truncated to the piece's length."""
    size = hash_digest_size(hash_name)
    out = bytearray()
    for i in range(0, len(block), size):
        piece = block[i : i + size]
        out += hashlib.new(hash_name, (i // size).to_bytes(4, "big") + piece).digest()[: len(piece)]
    return bytes(out)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    """Recover the key from its ``stripes`` anti-forensic stripes."""
    d = bytes(key_bytes)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, material[i * key_bytes : (i + 1) * key_bytes]), hash_name)
    return _xor(d, material[(stripes - 1) * key_bytes : stripes * key_bytes])


def af_split(key: bytes, stripes: int, hash_name: str) -> bytes:
    """Split ``key`` into ``stripes`` stripes, all but the last random."""
    n = len(key)
    randoms = os.urandom(n * (stripes - 1))
    d = bytes(n)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, randoms[i * n : (i + 1) * n]), hash_name)
    return randoms + _xor(d, key)


def _sectors(n: int) -> int:
    return -(-n // SECTOR)


# Master keys already unlocked in this process, by a digest of everything that determines them
# (header, key material, passphrase): PBKDF2 is made to cost seconds, and an image is opened
# again by every directory scan and first FUSE open. Bounded; a changed header or key slot misses.
_UNLOCKED: OrderedDict[bytes, bytes] = OrderedDict()
_UNLOCKED_MAX = 256
_UNLOCKED_LOCK = threading.Lock()


def unlock(
    hdr: LuksHeader, passphrase: Secret, read: Callable[[int, int], bytes], where: str
) -> bytes:
    """The master key, from the first active key slot the passphrase opens. ``read(offset,
    length)`` reads the header area (offsets from the header's start). Raises WrongKey."""
    spec = hdr.spec
    active = [slot for slot in hdr.slots if slot.active == SLOT_ACTIVE]
    if not active:
        raise CorruptImage(f"{where}: LUKS header has no active key slot")
    materials = []
    fingerprint = hashlib.sha256(hdr.pack())
    for slot in active:
        size = hdr.key_bytes * slot.stripes
        raw = read(slot.key_material_offset * SECTOR, _sectors(size) * SECTOR)
        if len(raw) < size:
            raise CorruptImage(f"{where}: LUKS key material is truncated")
        materials.append(raw)
        fingerprint.update(raw)
    fingerprint.update(hashlib.sha256(passphrase.reveal()).digest())
    cache_key = fingerprint.digest()
    with _UNLOCKED_LOCK:
        cached = _UNLOCKED.get(cache_key)
        if cached is not None:
            _UNLOCKED.move_to_end(cache_key)
            return cached
    for slot, raw in zip(active, materials, strict=True):
        slot_key = pbkdf2(
            hdr.hash_spec, passphrase.reveal(), slot.salt, slot.iterations, hdr.key_bytes
        )
        material = SectorCipher(spec, slot_key).decrypt(raw, 0)
        candidate = af_merge(material, hdr.key_bytes, slot.stripes, hdr.hash_spec)
        digest = pbkdf2(
            hdr.hash_spec, candidate, hdr.mk_digest_salt, hdr.mk_digest_iter, DIGEST_SIZE
        )
        if constant_time.bytes_eq(digest, hdr.mk_digest):
            with _UNLOCKED_LOCK:
                _UNLOCKED[cache_key] = candidate
                while len(_UNLOCKED) > _UNLOCKED_MAX:
                    _UNLOCKED.popitem(last=False)
            return candidate
    raise WrongKey(
        f"{where}: the passphrase opens none of the {len(active)} active LUKS key slot(s)"
    )


def iterations_for(hash_name: str, iter_time_ms: int) -> int:
    """PBKDF2 iterations that take about ``iter_time_ms`` here (at least 1000)."""
    probe = 1 << 12
    start = time.perf_counter()
    pbkdf2(hash_name, b"imgfs calibration", bytes(SALT_SIZE), probe, 32)
    elapsed = max(time.perf_counter() - start, 1e-6)
    return max(MIN_ITERATIONS, min(MAX_ITERATIONS, int(probe * iter_time_ms / 1000 / elapsed)))


def build(
    spec: CipherSpec, hash_name: str, passphrase: Secret, iter_time_ms: int
) -> tuple[LuksHeader, bytes, bytes]:
    """A new LUKS1 header with key slot 0 holding a fresh master key: (header, the header
    area up to the payload as bytes, the master key). Key material is laid out as QEMU lays
    it out (4 KiB aligned slots, payload right after the last one)."""
    spec.validate()
    if hash_name not in _HASHES:
        raise Unsupported(f"LUKS hash {hash_name!r} is not supported")
    if spec.mode != "ecb" and spec.ivgen not in ("plain", "plain64", "essiv"):
        raise InvalidRequest(f"unknown IV generator {spec.ivgen!r}")
    key_bytes = spec.key_bytes
    master = os.urandom(key_bytes)
    iters = iterations_for(hash_name, iter_time_ms)
    mk_salt = os.urandom(SALT_SIZE)
    mk_iter = max(MIN_ITERATIONS, iters // 8)
    mk_digest = pbkdf2(hash_name, master, mk_salt, mk_iter, DIGEST_SIZE)
    slot_sectors = -(-_sectors(key_bytes * STRIPES) // ALIGN_SECTORS) * ALIGN_SECTORS
    first = -(-_sectors(HEADER_SIZE) // ALIGN_SECTORS) * ALIGN_SECTORS
    hdr = LuksHeader(
        cipher_name=CIPHER_KEY_BYTES[spec.alg][0],
        cipher_mode=luks_mode_string(spec),
        hash_spec=hash_name,
        payload_offset=first + NUM_SLOTS * slot_sectors,
        key_bytes=key_bytes,
        mk_digest=mk_digest,
        mk_digest_salt=mk_salt,
        mk_digest_iter=mk_iter,
        uuid=str(uuid.uuid4()),
    )
    area = bytearray(hdr.payload_offset * SECTOR)
    for i in range(NUM_SLOTS):
        offset = first + i * slot_sectors
        if i == 0:
            salt = os.urandom(SALT_SIZE)
            slot_key = pbkdf2(hash_name, passphrase.reveal(), salt, iters, key_bytes)
            split = af_split(master, STRIPES, hash_name)
            padded = split + bytes(-len(split) % SECTOR)
            enc = SectorCipher(spec, slot_key).encrypt(padded, 0)
            area[offset * SECTOR : offset * SECTOR + len(enc)] = enc
            hdr.slots.append(KeySlot(SLOT_ACTIVE, iters, salt, offset, STRIPES))
        else:
            hdr.slots.append(KeySlot(SLOT_INACTIVE, 0, bytes(SALT_SIZE), offset, STRIPES))
    area[:HEADER_SIZE] = hdr.pack()
    return hdr, bytes(area), master
