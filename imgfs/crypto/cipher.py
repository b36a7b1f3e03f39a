"""Sector ciphers as QEMU's block encryption uses them: a cipher algorithm, a chaining mode and
an IV generator, applied to 512-byte sectors that each start a fresh chain from the IV of their
sector number.

Names follow QEMU (``aes-256``, ``xts``, ``plain64``, ``sha256``), so ``-o encrypt.*`` values and
the names in a LUKS header (see :mod:`imgfs.crypto.luks1`) map onto one :class:`CipherSpec`.

Speed: runs of sectors are processed with as few library calls as the mode allows. ECB is one
call; CBC decryption is one ECB call plus one XOR with the shifted ciphertext; XTS is done by
hand from two ECB calls (the tweaks of every sector at once, then the data) and two XORs, which
is 2-3x faster here than one library XTS call per sector. CBC encryption and CTR are chained
per sector, one call each.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers import Cipher, CipherAlgorithm, algorithms, modes

from imgfs.errors import InvalidRequest, Unsupported

try:  # cryptography >= 43 keeps CAST5 among the "decrepit" ciphers
    from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5
except ImportError:  # pragma: no cover - older cryptography
    CAST5 = algorithms.CAST5  # type: ignore[attr-defined,misc]

SECTOR = 512
SECTOR_BITS = 9

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


def _has_ctr(alg: CipherAlgorithm) -> bool:
    try:
        Cipher(alg, modes.CTR(bytes(alg.block_size // 8))).encryptor()
    except UnsupportedAlgorithm:
        return False
    return True


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


def _xor(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


class SectorCipher:
    """Encrypts and decrypts runs of whole 512-byte sectors, sector ``s`` chained from the IV
    of sector number ``s``. Thread-safe: every call makes its own cipher contexts."""

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
        self._native_ctr = spec.mode != "ctr" or _has_ctr(self._alg)
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

    # -- IVs ------------------------------------------------------------------------------------

    def ivs(self, sector: int, count: int) -> bytes:
        """The IVs of ``count`` sectors from ``sector``, one cipher block each."""
        block = self.block
        if self.spec.ivgen == "plain":
            width, mask = 4, 0xFFFFFFFF
        else:
            width, mask = 8, 0xFFFFFFFFFFFFFFFF
        pad = bytes(block - width) if block > width else b""
        if block < width:  # 64-bit block ciphers take the low bytes
            width = block
            mask = (1 << (8 * block)) - 1
        first, last = sector & mask, (sector + count - 1) & mask
        if last - first == count - 1:
            # No wrap-around: every block is first + k, little-endian, made as one integer
            # (lanes of ``block`` bytes) instead of one small bytes object per sector.
            ramp, ones = _ramp(count, block)
            out = (first * ones + ramp).to_bytes(block * count, "little")
        else:
            out = b"".join(
                ((s & mask).to_bytes(width, "little") + pad) for s in range(sector, sector + count)
            )
        if self._essiv_ecb is not None:
            out = self._essiv_ecb.encryptor().update(out)
        return out

    # -- data -----------------------------------------------------------------------------------

    def decrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes:
        return self._run(data, sector, encrypt=False)

    def encrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytes:
        return self._run(data, sector, encrypt=True)

    def _run(self, data: bytes | bytearray | memoryview, sector: int, encrypt: bool) -> bytes:
        n = len(data)
        if n % SECTOR:
            raise InvalidRequest(f"encrypted I/O of {n} bytes is not whole sectors")
        if n == 0:
            return b""
        mode = self.spec.mode
        if mode == "ecb":
            ctx = self._ecb.encryptor() if encrypt else self._ecb.decryptor()
            return ctx.update(data)
        count = n >> SECTOR_BITS
        ivs = self.ivs(sector, count)
        if mode == "xts":
            return self._xts(data, ivs, count, encrypt)
        if mode == "cbc" and not encrypt:
            return self._cbc_decrypt(data, ivs, count)
        if mode == "ctr" and not self._native_ctr:
            return self._ctr_by_hand(data, ivs, count)
        # CBC encryption and CTR chain through each sector: one call per sector.
        out = bytearray(n)
        view = memoryview(data)
        b = self.block
        make = modes.CBC if mode == "cbc" else modes.CTR
        for i in range(count):
            c = Cipher(self._alg, make(ivs[i * b : (i + 1) * b]))
            ctx = c.encryptor() if encrypt else c.decryptor()
            out[i * SECTOR : (i + 1) * SECTOR] = ctx.update(view[i * SECTOR : (i + 1) * SECTOR])
        return bytes(out)

    def _cbc_decrypt(
        self, data: bytes | bytearray | memoryview, ivs: bytes, count: int
    ) -> bytearray:
        """One CBC decryption of the whole run, as if it were one chain: right everywhere but
        in the first block of each sector after the first, which was XORed with the previous
        sector's last ciphertext block instead of its IV. Those blocks are then fixed at once
        (gathered, XORed with both, scattered back)."""
        b = self.block
        n = len(data)
        out = bytearray(n + b)
        Cipher(self._alg, modes.CBC(ivs[:b])).decryptor().update_into(data, out)
        del out[n:]
        if count == 1:
            return out
        w = b // 8  # 64-bit words per block
        per = SECTOR // 8  # words per sector
        oq = memoryview(out).cast("Q")
        dq = memoryview(data).cast("B").cast("Q")
        firsts = bytearray(b * (count - 1))
        prevs = bytearray(b * (count - 1))
        fq, pq = memoryview(firsts).cast("Q"), memoryview(prevs).cast("Q")
        for k in range(w):
            fq[k::w] = oq[per + k :: per]
            pq[k::w] = dq[per - w + k : n // 8 - w : per]
        fixed = int.from_bytes(firsts, "little") ^ int.from_bytes(prevs, "little")
        fixed ^= int.from_bytes(ivs[b:], "little")
        xq = memoryview(fixed.to_bytes(len(firsts), "little")).cast("Q")
        for k in range(w):
            oq[per + k :: per] = xq[k::w]
        return out

    def _ctr_by_hand(self, data: bytes | bytearray | memoryview, ivs: bytes, count: int) -> bytes:
        """CTR for ciphers OpenSSL has no CTR mode of (CAST5): the keystream is the ECB
        encryption of each sector's IV counted up as a big-endian integer per block."""
        b = self.block
        mask = (1 << (8 * b)) - 1
        per_sector = SECTOR // b
        counters = b"".join(
            ((base + j) & mask).to_bytes(b, "big")
            for i in range(count)
            for base in (int.from_bytes(ivs[i * b : (i + 1) * b], "big"),)
            for j in range(per_sector)
        )
        stream = self._ecb.encryptor().update(counters)
        return _xor(data, stream)

    def _xts(
        self, data: bytes | bytearray | memoryview, ivs: bytes, count: int, encrypt: bool
    ) -> bytearray:
        """IEEE 1619 XTS over 512-byte data units (32 blocks, so no ciphertext stealing):
        block j of a sector is E(P xor T_j) xor T_j with T_j = T_0 * alpha^j in GF(2^128),
        T_0 the encrypted IV.

        Done in a few whole-buffer OpenSSL calls, because one library call per sector costs
        ~9 us of Python overhead. The XORs with the tweaks are CBC decryptions: decrypting the
        block pair (T, E(X)) yields D(E(X)) xor T = X xor T in its second block. So the
        tweaks are laid out in the even blocks of a buffer of pairs, the data (encrypted once
        more) in the odd blocks, and CBC decryption XORs them; a second pass with the data
        key does "decrypt, then XOR" in one go."""
        assert self._tweak_ecb is not None
        n = len(data)
        ecb = self._ecb
        # Per-thread scratch buffers: fresh multi-MiB buffers cost more in page faults than
        # the AES work. +16: update_into wants a block of slack.
        pairs, scratch, work = _scratch(2 * n + 16, 2 * n + 16, n + 16)
        pq = memoryview(pairs)[: 2 * n].cast("Q")  # (T, X) pairs
        xts_tweaks(self._tweak_ecb.encryptor().update(ivs), count, pq, 4)
        sq = memoryview(scratch)[: 2 * n].cast("Q")
        sv = memoryview(scratch)[: 2 * n]
        wq = memoryview(work)[:n].cast("Q")
        ecb.encryptor().update_into(data, work)  # E(X): its CBC decryption is X again
        pq[2::4] = wq[0::2]
        pq[3::4] = wq[1::2]
        cbc = Cipher(self._alg, modes.CBC(bytes(16)))
        cbc.decryptor().update_into(memoryview(pairs)[: 2 * n], scratch)  # odd: X xor T
        out = bytearray(n)
        oq = memoryview(out).cast("Q")
        if encrypt:
            # C = E(V) xor T with V = P xor T: pair T with E(E(V)).
            wq[0::2] = sq[2::4]
            wq[1::2] = sq[3::4]
            ctx = ecb.encryptor()
            ctx.update_into(memoryview(work)[:n], work)  # in place: ECB allows it
            ctx.update_into(memoryview(work)[:n], work)
            pq[2::4] = wq[0::2]
            pq[3::4] = wq[1::2]
            cbc.decryptor().update_into(memoryview(pairs)[: 2 * n], scratch)
        else:
            # P = D(W) xor T with W = C xor T: CBC decryption of the pairs (T, W).
            sq[0::4] = pq[0::4]
            sq[1::4] = pq[1::4]
            cbc.decryptor().update_into(sv, pairs)
            sq = pq
        oq[0::2] = sq[2::4]
        oq[1::2] = sq[3::4]
        return out


_LOCAL = threading.local()
SCRATCH_CACHE_MAX = 8 * 1024 * 1024  # bigger requests get fresh buffers


def _scratch(*sizes: int) -> list[bytearray]:
    """Buffers of at least ``sizes`` bytes (contents undefined), kept per thread."""
    if sum(sizes) > 3 * SCRATCH_CACHE_MAX:
        return [bytearray(n) for n in sizes]
    bufs: list[bytearray] | None = getattr(_LOCAL, "bufs", None)
    if bufs is None or len(bufs) != len(sizes):
        bufs = _LOCAL.bufs = [bytearray() for _ in sizes]
    for i, n in enumerate(sizes):
        if len(bufs[i]) < n:
            bufs[i] = bytearray(n)
    return bufs


_RAMPS: dict[tuple[int, int], tuple[int, int]] = {}


def _ramp(count: int, block: int) -> tuple[int, int]:
    """(sum of k << (8 * block * k), sum of 1 << (8 * block * k)) for k < count: lane k of
    ``first * ones + ramp`` is first + k."""
    key = (count, block)
    found = _RAMPS.get(key)
    if found is None:
        step = 8 * block
        ones = int.from_bytes((b"\1" + bytes(block - 1)) * count, "little")
        ramp = sum(k << (step * k) for k in range(count))
        found = (ramp, ones)
        if len(_RAMPS) > 64:
            _RAMPS.clear()
        _RAMPS[key] = found
    return found


_TOP_MASKS: dict[int, tuple[int, int]] = {}


def _lane_masks(count: int) -> tuple[int, int]:
    masks = _TOP_MASKS.get(count)
    if masks is None:
        top = int.from_bytes((bytes(15) + b"\x80") * count, "little")
        masks = (top, ~top & ((1 << (128 * count)) - 1))
        if len(_TOP_MASKS) > 64:
            _TOP_MASKS.clear()
        _TOP_MASKS[count] = masks
    return masks


def xts_tweaks(t0: bytes, count: int, out: memoryview, stride: int) -> None:
    """Write the 32 tweaks of each of ``count`` sectors into ``out`` (a view of 64-bit words;
    block b of the run at words ``b * stride`` and ``b * stride + 1``), from the sectors' first
    tweaks ``t0`` (``count`` x 16 bytes, little-endian GF(2^128) elements). Made block position
    by block position over all sectors at once, as big integers holding every sector's lane."""
    lanes = int.from_bytes(t0, "little")
    top, rest = _lane_masks(count)
    per_sector = SECTOR // 16 * stride
    for j in range(SECTOR // 16):
        words = memoryview(lanes.to_bytes(16 * count, "little")).cast("Q")
        out[j * stride :: per_sector] = words[0::2]
        out[j * stride + 1 :: per_sector] = words[1::2]
        # Multiply every lane by alpha: shift left one bit, folding bit 127 back as 0x87.
        high = lanes & top
        lanes = ((lanes & rest) << 1) ^ ((high >> 127) * 0x87)
