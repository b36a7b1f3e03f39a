"""Sector ciphers as QEMU's block encryption uses them: a cipher algorithm, a chaining mode and
an IV generator, applied to 512-byte sectors that each start a fresh chain from the IV of their
sector number.

Names follow QEMU (``aes-256``, ``xts``, ``plain64``, ``sha256``), so ``-o encrypt.*`` values and
the names in a LUKS header (see :mod:`imgfs.crypto.luks1`) map onto one :class:`CipherSpec`.

Speed: a run of sectors is processed in a few whole-buffer calls, with no Python loop over
sectors or blocks: numpy makes the IVs, XTS tweaks and CTR counters of every sector at once
and does the XORs; OpenSSL does ECB over the whole run. XTS is two ECB calls (tweaks, data)
and two XORs; CBC decryption one ECB call and two XORs; CBC encryption, chained within a
sector, one ECB call per block position across all sectors (in block-major order; short runs
one CBC call per sector); CTR one ECB call over the counters and an XOR. Long runs go in
1 MiB pieces (cache-sized scratch).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherAlgorithm, algorithms, modes

from imgfs.errors import InvalidRequest, Unsupported

try:  # cryptography >= 43 keeps CAST5 among the "decrepit" ciphers
    from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5
except ImportError:  # pragma: no cover - older cryptography
    CAST5 = algorithms.CAST5  # type: ignore[attr-defined,misc]

SECTOR = 512  # LUKS1 and qcow encrypt 512-byte sectors, whatever the guest's
SECTOR_BITS = 9
assert SECTOR % 16 == 0  # whole cipher blocks: XTS never needs ciphertext stealing

# QEMU's cipher names -> (family, key bytes). Families the cryptography package lacks are still
# listed so the error names them as unsupported rather than unknown.
CIPHER_KEY_BYTES: dict[str, tuple[str, int]] = {
    "aes-128": ("aes", 16), "aes-192": ("aes", 24), "aes-256": ("aes", 32),
    "cast5-128": ("cast5", 16), "sm4": ("sm4", 16),
    "serpent-128": ("serpent", 16), "serpent-192": ("serpent", 24),
    "serpent-256": ("serpent", 32),
    "twofish-128": ("twofish", 16), "twofish-192": ("twofish", 24),
    "twofish-256": ("twofish", 32),
    "des": ("des", 8), "3des": ("3des", 24),
}  # fmt: skip
_FAMILIES: dict[str, Callable[[bytes], CipherAlgorithm]] = {
    "aes": algorithms.AES,
    "cast5": CAST5,
    "sm4": algorithms.SM4,
}
MODES = ("ecb", "cbc", "xts", "ctr")
IVGENS = ("plain", "plain64", "essiv")
HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


def cipher_name(family: str, key_bytes: int) -> str:
    """QEMU's name of a cipher family at a key size (``aes``, 32 -> ``aes-256``)."""
    for name, (fam, size) in CIPHER_KEY_BYTES.items():
        if fam == family and size == key_bytes:
            return name
    raise Unsupported(f"cipher {family} with a {key_bytes * 8}-bit key is not supported")


def hash_digest_size(name: str) -> int:
    if name not in HASHES:
        raise Unsupported(f"hash {name!r} is not supported")
    try:
        return hashlib.new(name).digest_size
    except ValueError:
        raise Unsupported(f"hash {name!r} is not available in this OpenSSL") from None


@dataclass(frozen=True, slots=True)
class CipherSpec:
    """A cipher as ``-o encrypt.cipher-alg/cipher-mode/ivgen-alg/ivgen-hash-alg`` name it."""

    alg: str = "aes-256"
    mode: str = "xts"
    ivgen: str = "plain64"
    ivgen_hash: str | None = None  # essiv only

    @property
    def family(self) -> str:
        return CIPHER_KEY_BYTES[self.alg][0]

    @property
    def key_bytes(self) -> int:
        """Bytes of key material the mode needs (twice the cipher's key for XTS)."""
        return CIPHER_KEY_BYTES[self.alg][1] * (2 if self.mode == "xts" else 1)

    def describe(self) -> str:
        iv = self.ivgen + (f":{self.ivgen_hash}" if self.ivgen_hash else "")
        return f"{self.alg}-{self.mode}-{iv}"

    def validate(self) -> None:
        """Unsupported naming the combination when the cryptography package cannot do it;
        InvalidRequest for names QEMU does not know either."""
        if self.alg not in CIPHER_KEY_BYTES:
            raise InvalidRequest(f"unknown cipher algorithm {self.alg!r}")
        if self.mode not in MODES:
            raise InvalidRequest(f"unknown cipher mode {self.mode!r}")
        if self.ivgen not in IVGENS:
            raise InvalidRequest(f"unknown IV generator {self.ivgen!r}")
        if self.family not in _FAMILIES:
            raise Unsupported(
                f"cipher {self.describe()} is not supported: the cryptography package has no "
                f"{self.family}"
            )
        block = _algorithm(self.alg, bytes(CIPHER_KEY_BYTES[self.alg][1])).block_size // 8
        if self.mode == "xts" and block != 16:
            raise InvalidRequest(f"cipher {self.describe()}: XTS needs a 128-bit block cipher")
        if self.ivgen == "essiv":
            if not self.ivgen_hash:
                raise InvalidRequest(f"cipher {self.describe()}: essiv needs a hash")
            essiv_alg(self.alg, self.ivgen_hash)
        elif self.ivgen_hash:
            raise InvalidRequest(f"cipher {self.describe()}: an IV hash is only used with essiv")


def _algorithm(alg: str, key: bytes) -> CipherAlgorithm:
    family = CIPHER_KEY_BYTES[alg][0]
    factory = _FAMILIES.get(family)
    if factory is None:
        raise Unsupported(
            f"cipher {alg} is not supported: the cryptography package has no {family}"
        )
    return factory(key)


def essiv_alg(alg: str, ivgen_hash: str) -> str:
    """The cipher ESSIV encrypts sector numbers with: the same family keyed by the hash of the
    key, so its key size is the hash's digest size (QEMU's rule)."""
    size = hash_digest_size(ivgen_hash)
    family = CIPHER_KEY_BYTES[alg][0]
    try:
        return cipher_name(family, size)
    except Unsupported:
        raise Unsupported(
            f"essiv with {ivgen_hash} needs a {size * 8}-bit {family} key, which {family} "
            "does not have"
        ) from None


class _EcbContexts(threading.local):
    """One thread's ECB contexts of a :class:`SectorCipher`, made on its first use there and
    then reused: ECB keeps no state between whole-block updates, and a new context costs
    ~2 us, a good part of a 4 KiB request."""

    def __init__(
        self, data: Cipher[modes.ECB], tweak: Cipher[modes.ECB] | None,
        essiv: Cipher[modes.ECB] | None,
    ) -> None:  # fmt: skip
        self.encrypt = data.encryptor()
        self.decrypt = data.decryptor()
        self.tweak = tweak.encryptor() if tweak is not None else None
        self.essiv = essiv.encryptor() if essiv is not None else None


class SectorCipher:
    """Encrypts and decrypts runs of whole 512-byte sectors, sector ``s`` chained from the IV
    of sector number ``s``. Thread-safe: cipher contexts and scratch buffers are per thread."""

    def __init__(self, spec: CipherSpec, key: bytes) -> None:
        spec.validate()
        if len(key) != spec.key_bytes:
            raise InvalidRequest(f"cipher {spec.describe()} needs a {spec.key_bytes}-byte key")
        self.spec = spec
        half = len(key) // 2
        self._key = key[:half] if spec.mode == "xts" else key
        self._alg = _algorithm(spec.alg, self._key)
        self.block = self._alg.block_size // 8
        self._ecb = Cipher(self._alg, modes.ECB())
        # XTS: the second half of the key encrypts the tweaks.
        self._tweak_ecb = (
            Cipher(_algorithm(spec.alg, key[half:]), modes.ECB()) if spec.mode == "xts" else None
        )
        self._essiv_ecb: Cipher[modes.ECB] | None = None
        if spec.ivgen == "essiv":
            assert spec.ivgen_hash is not None
            salt = hashlib.new(spec.ivgen_hash, key).digest()
            self._essiv_ecb = Cipher(
                _algorithm(essiv_alg(spec.alg, spec.ivgen_hash), salt), modes.ECB()
            )
        self._ctx = _EcbContexts(self._ecb, self._tweak_ecb, self._essiv_ecb)

    # -- IVs ------------------------------------------------------------------------------------

    def ivs(self, sector: int, count: int) -> bytes:
        """The IVs of ``count`` sectors from ``sector``, one cipher block each."""
        return self._iv_words(sector, count).tobytes()

    def _iv_words(self, sector: int, count: int) -> np.ndarray:
        """The IVs as a (count, block / 8) array of little-endian 64-bit words: the sector
        number (its low 32 bits for ``plain``) zero-padded to a block, or its ESSIV
        encryption. 64-bit block ciphers take the number's low 8 bytes."""
        numbers = np.arange(count, dtype=U64)
        numbers += np.uint64(sector & MASK64)  # array arithmetic wraps modulo 2^64
        if self.spec.ivgen == "plain":
            numbers &= np.uint64(0xFFFFFFFF)
        words = self.block // 8
        if words == 1:
            ivs = numbers.reshape(count, 1)
        else:
            ivs = np.zeros((count, words), U64)
            ivs[:, 0] = numbers
        essiv = self._ctx.essiv
        if essiv is not None:
            encrypted = essiv.update(ivs.view(np.uint8))
            ivs = np.frombuffer(encrypted, U64).reshape(count, words)
        return ivs

    # -- data -----------------------------------------------------------------------------------

    def decrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes | bytearray:
        return self._run(data, sector, encrypt=False)

    def encrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes | bytearray:
        return self._run(data, sector, encrypt=True)

    def _run(
        self, data: bytes | bytearray | memoryview, sector: int, encrypt: bool
    ) -> bytes | bytearray:
        n = len(data)
        if n % SECTOR:
            raise InvalidRequest(f"encrypted I/O of {n} bytes is not whole sectors")
        if n == 0:
            return b""
        mode = self.spec.mode
        if mode == "ecb":
            ctx = self._ctx.encrypt if encrypt else self._ctx.decrypt
            return ctx.update(data)
        # update_into wants a block of slack after the output; it is cut off once every
        # numpy view of the buffer is gone (a bytearray with exports cannot shrink).
        out = bytearray(n + 16)
        self._run_into(data, out, sector, n >> SECTOR_BITS, encrypt)
        del out[n:]
        return out

    def _run_into(
        self, data: bytes | bytearray | memoryview, out: bytearray, sector: int, count: int,
        encrypt: bool,
    ) -> None:  # fmt: skip
        """The run in pieces of at most RUN_SECTORS: their scratch buffers stay in the CPU's
        caches (bigger pieces cost more per byte) and bounded."""
        mode = self.spec.mode
        if mode == "xts":
            piece = self._xts
        elif mode == "ctr":
            piece = self._ctr
        else:
            piece = self._cbc_encrypt if encrypt else self._cbc_decrypt
        src = memoryview(data).cast("B")
        dst = memoryview(out)
        for first in range(0, count, RUN_SECTORS):
            k = min(RUN_SECTORS, count - first)
            start, end = first * SECTOR, (first + k) * SECTOR
            piece(src[start:end], dst[start : end + 16], sector + first, k, encrypt)

    def _views(
        self, data: memoryview, out: memoryview, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``data`` and ``out`` as (sector, block, word) arrays of 64-bit words."""
        shape = (count, SECTOR // self.block, self.block // 8)
        src = np.frombuffer(data, U64, count=count * SECTOR_WORDS).reshape(shape)
        dst = np.frombuffer(out, U64, count=count * SECTOR_WORDS).reshape(shape)
        return src, dst

    def _xts(
        self, data: memoryview, out: memoryview, sector: int, count: int, encrypt: bool
    ) -> None:
        """IEEE 1619 XTS over 512-byte data units (32 blocks, so no ciphertext stealing):
        block j of a sector is E(P xor T_j) xor T_j with T_j = T_0 * alpha^j in GF(2^128),
        T_0 the IV encrypted with the second key. All sectors at once: one ECB call makes
        every T_0, numpy the 32 multiples of each (:func:`xts_tweaks`) and the two XORs, one
        ECB call with the data key does the whole piece in place."""
        contexts = self._ctx
        assert contexts.tweak is not None
        n = count * SECTOR
        src, dst = self._views(data, out, count)
        t0 = contexts.tweak.update(self._iv_words(sector, count).view(np.uint8))
        tweaks = _scratch_words(count * SECTOR_WORDS).reshape(src.shape)
        xts_tweaks(np.frombuffer(t0, U64).reshape(count, 2), tweaks)
        np.bitwise_xor(src, tweaks, out=dst)
        ctx = contexts.encrypt if encrypt else contexts.decrypt
        ctx.update_into(out[:n], out)  # in place: ECB allows it
        dst ^= tweaks

    def _cbc_decrypt(
        self, data: memoryview, out: memoryview, sector: int, count: int, encrypt: bool
    ) -> None:
        """CBC decryption has no chain: one ECB decryption of the run, then every block XORed
        with the ciphertext block before it, or its sector's IV for a sector's first."""
        src, dst = self._views(data, out, count)
        self._ctx.decrypt.update_into(data, out)
        dst[:, 1:] ^= src[:, :-1]
        dst[:, 0] ^= self._iv_words(sector, count)

    def _cbc_encrypt(
        self, data: memoryview, out: memoryview, sector: int, count: int, encrypt: bool
    ) -> None:
        """CBC encryption chains through a sector, but sectors are independent: the run is
        transposed to block-major order (all sectors' first blocks, then all second blocks...)
        and each row is one ECB call after XORing it with the row before (the IVs for the
        first). Short runs, where those per-row calls cost more, are chained instead."""
        b = self.block
        per = SECTOR // b
        if count < CBC_ROWS_MIN_SECTORS * per // 32:
            self._cbc_encrypt_chained(data, out, sector, count)
            return
        src, dst = self._views(data, out, count)
        work = _scratch_words(count * SECTOR_WORDS + 2)  # +16 bytes: update_into's slack
        rows = work[: count * SECTOR_WORDS].reshape(per, count, b // 8)
        rows[...] = src.transpose(1, 0, 2)
        rows[0] ^= self._iv_words(sector, count)
        raw = memoryview(work.view(np.uint8))
        row_bytes = count * b
        ctx = self._ctx.encrypt
        for j in range(per):
            if j:
                rows[j] ^= rows[j - 1]
            ctx.update_into(raw[j * row_bytes : (j + 1) * row_bytes], raw[j * row_bytes :])
        dst[...] = rows.transpose(1, 0, 2)

    def _cbc_encrypt_chained(
        self, data: memoryview, out: memoryview, sector: int, count: int
    ) -> None:
        """Short runs as one CBC chain through every sector: a sector's first block is XORed
        with its IV and with the previous sector's last ciphertext block, which undoes the
        chaining across the boundary (one context instead of one per sector)."""
        b = self.block
        ivs = self.ivs(sector, count)
        ctx = Cipher(self._alg, modes.CBC(ivs[:b])).encryptor()
        block = bytearray(b)
        for i in range(count):
            start = i * SECTOR
            if i:
                fix = int.from_bytes(ivs[i * b : (i + 1) * b], "little")
                fix ^= int.from_bytes(out[start - b : start], "little")
                fix ^= int.from_bytes(data[start : start + b], "little")
                block[:] = fix.to_bytes(b, "little")
                ctx.update_into(block, out[start:])
                ctx.update_into(data[start + b : start + SECTOR], out[start + b :])
            else:
                ctx.update_into(data[:SECTOR], out)

    def _ctr(
        self, data: memoryview, out: memoryview, sector: int, count: int, encrypt: bool
    ) -> None:
        """CTR: block j of a sector is XORed with the encryption of its IV plus j, the IV
        counted as one big-endian integer of a block's width (as OpenSSL and nettle count).
        All counters of the run are made at once, encrypted in one ECB call."""
        b = self.block
        per = SECTOR // b
        src, dst = self._views(data, out, count)
        counters = _scratch_words(count * SECTOR_WORDS).reshape(src.shape).view(">u8")
        start = self._iv_words(sector, count).byteswap()  # the IVs' big-endian words
        steps = np.arange(per, dtype=U64)
        low = start[:, -1:] + steps  # wraps modulo 2^64
        counters[:, :, -1] = low
        if b == 16:
            high = start[:, :1] + (low < start[:, -1:])  # carry into the high word
            counters[:, :, 0] = high
        self._ctx.encrypt.update_into(counters.view(np.uint8), out)
        dst ^= src


SECTOR_WORDS = SECTOR // 8
RUN_SECTORS = 2048  # 1 MiB pieces
MASK64 = (1 << 64) - 1
U64 = np.dtype("<u8")
# Below this many sectors, one CBC chain through the run (a few small calls per sector) costs
# less than one ECB call per block position (32 of them for AES) in block-major order.
CBC_ROWS_MIN_SECTORS = 20  # for 32 blocks a sector; twice that for 64-bit blocks

_LOCAL = threading.local()


def _scratch_words(count: int) -> np.ndarray:
    """A buffer of ``count`` 64-bit words (contents undefined), kept per thread: a fresh
    buffer of a MiB costs more in page faults than the AES work. Runs are cut into pieces of
    RUN_SECTORS, so it never grows past one piece (and a block)."""
    buf: np.ndarray | None = getattr(_LOCAL, "words", None)
    if buf is None or buf.size < count:
        buf = _LOCAL.words = np.empty(count, U64)
    return buf[:count]


_1, _2, _7 = np.uint64(1), np.uint64(2), np.uint64(7)
# Shift counts 0..w-1 (as a row to broadcast against a column of sectors) and 63 - those.
_SHIFTS = {w: np.arange(w, dtype=U64).reshape(1, w) for w in (8, 32)}
_RSHIFTS = {w: np.uint64(63) - shifts for w, shifts in _SHIFTS.items()}
# From this many sectors, tweaks are made 8 at a time and multiplied by alpha^8 thrice: fewer
# element operations than 32 at once, but more numpy calls.
XTS_NARROW_MIN_SECTORS = 1024


def _fold_into(h: np.ndarray, tmp: np.ndarray, low: np.ndarray) -> None:
    """low ^= h * (x^7 + x^2 + x + 1) carry-less: bits h shifted past x^127 fold back so, as
    x^128 = x^7 + x^2 + x + 1 in GF(2^128). ``tmp`` is scratch of h's shape."""
    low ^= h
    for k in (_1, _2, _7):
        np.left_shift(h, k, out=tmp)
        low ^= tmp


def xts_tweaks(t0: np.ndarray, out: np.ndarray) -> None:
    """The 32 tweaks T_j = T_0 * alpha^j of each sector: ``t0`` is (count, 2) words (low,
    high) of little-endian GF(2^128) elements, ``out`` a (count, 32, 2) array.

    T_0 * alpha^j is T_0 shifted left by j bits with the j bits pushed out of the top folded
    back into the low word. That is done for w block positions at once (broadcasting a column
    of sectors against a row of shift counts), then, for w = 8, repeated on the result with
    shifts by 8 for the next 8 positions."""
    w = 8 if t0.shape[0] >= XTS_NARROW_MIN_SECTORS else 32
    shifts, rshifts = _SHIFTS[w], _RSHIFTS[w]
    lo, hi = t0[:, 0:1], t0[:, 1:2]
    # (x >> 1) >> (63 - j) is x >> (64 - j), also for j = 0 where a shift by 64 is undefined.
    low = lo << shifts
    high = hi << shifts
    tmp = (lo >> _1) >> rshifts
    high |= tmp
    pushed = (hi >> _1) >> rshifts
    _fold_into(pushed, tmp, low)
    out[:, 0:w, 0] = low
    out[:, 0:w, 1] = high
    by, rest = np.uint64(w), np.uint64(64 - w)
    for j in range(w, 32, w):
        np.right_shift(high, rest, out=pushed)
        high <<= by
        np.right_shift(low, rest, out=tmp)
        high |= tmp
        low <<= by
        _fold_into(pushed, tmp, low)
        out[:, j : j + w, 0] = low
        out[:, j : j + w, 1] = high
