"""qcow2 encryption: the legacy AES method (crypt_method 1) and LUKS (crypt_method 2).

* AES: AES-128-CBC, plain64 IVs from the *guest* sector number, the key the passphrase's
  first 16 bytes (QEMU's ``encrypt.format=aes``; QEMU's system emulators refuse it now).
* LUKS: a LUKS1 header stored in clusters of the image, located by the full-disk-encryption
  header extension (offset and length, big-endian u64 each); its payload offset is unused.
  Data clusters are encrypted with the master key and IVs from the *host* sector number (the
  cluster's offset in the file, or in the external data file), as QEMU does for LUKS in qcow2.

Only data clusters are encrypted; zero clusters and unallocated ranges read as zeros / backing
data, never through the cipher. Compressed clusters are not allowed in encrypted images.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from imgfs.crypto import SectorCipher, luks1, qcow_aes
from imgfs.crypto.cipher import CipherSpec
from imgfs.crypto.secret import Secret
from imgfs.errors import CorruptImage, InvalidRequest, KeyRequired, Unsupported
from imgfs.formats.qcow2 import layout as L

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
FDE_EXT = struct.Struct(">QQ")  # offset, length of the LUKS header area
MAX_LUKS_AREA = 64 * 1024 * 1024

ENCRYPT_OPTIONS: dict[str, str] = {
    "encrypt.format": "encrypt the image: luks or aes (legacy; QEMU's emulators refuse it)",
    "encryption": "on/off: the same as encrypt.format=aes (deprecated in QEMU)",
    "encrypt.cipher-alg": "LUKS cipher: aes-128, aes-192, aes-256 (default), cast5-128, sm4",
    "encrypt.cipher-mode": "LUKS cipher mode: xts (default), cbc, ecb, ctr",
    "encrypt.ivgen-alg": "LUKS IV generator: plain64 (default), plain, essiv",
    "encrypt.ivgen-hash-alg": "LUKS essiv hash: sha256 (default for essiv), sha1, ...",
    "encrypt.hash-alg": "LUKS PBKDF2 and anti-forensic hash: sha256 (default), sha1, sha512, ...",
    "encrypt.iter-time": "LUKS PBKDF2 time in milliseconds (default 2000)",
    "encrypt.key-secret": "accepted for qemu-img compatibility; the key comes from --key FILE",
    "key-file": "file holding the passphrase (its exact bytes); set by imgfs create --key FILE",
}


def create_key(options: Mapping[str, str], what: str) -> Secret:
    path = options.get("key-file")
    if not path:
        raise InvalidRequest(f"{what} needs a passphrase: imgfs create --key FILE")
    return Secret.from_file(path)


def describe(method: int) -> str:
    return {CRYPT_AES: "aes", CRYPT_LUKS: "luks"}.get(method, str(method))


class Encryption:
    """The open cipher of an encrypted qcow2 image."""

    def __init__(self, cipher: SectorCipher, physical: bool, method: int) -> None:
        self.cipher = cipher
        self.physical = physical  # IVs from host offsets (LUKS) or guest offsets (AES)
        self.method = method
        self.luks: luks1.LuksHeader | None = None

    def decrypt(self, data: bytes | bytearray | memoryview, host: int, guest: int) -> bytes:
        return self.cipher.decrypt(data, (host if self.physical else guest) >> 9)

    def encrypt(self, data: bytes | bytearray | memoryview, host: int, guest: int) -> bytes:
        return self.cipher.encrypt(data, (host if self.physical else guest) >> 9)

    def format_specific(self) -> dict[str, object]:
        if self.luks is None:
            return {"format": "aes"}
        return {"format": "luks"} | self.luks.format_specific()


def luks_area(h: L.Header, path: str, file_size: int) -> tuple[int, int]:
    ext = h.extension(L.EXT_CRYPTO)
    if ext is None or len(ext) < FDE_EXT.size:
        raise CorruptImage(f"{path}: qcow2 LUKS image without a full disk encryption extension")
    offset, length = FDE_EXT.unpack_from(ext)
    if offset % h.cluster_size or offset == 0 or length > MAX_LUKS_AREA or length < 592:
        raise CorruptImage(f"{path}: qcow2 LUKS header at {offset}, {length} bytes is invalid")
    if offset + length > file_size:
        raise CorruptImage(f"{path}: qcow2 LUKS header at {offset} is past the end of the file")
    return offset, length


def open_encryption(file: object, h: L.Header, key: Secret | None, file_size: int) -> Encryption:
    """The cipher of an encrypted image, unlocked with ``key``."""
    from imgfs.block.hostfile import HostFile

    assert isinstance(file, HostFile)
    path = file.path
    if h.crypt_method not in (CRYPT_AES, CRYPT_LUKS):
        raise Unsupported(f"{path}: qcow2 crypt_method {h.crypt_method} is unknown")
    area = luks_area(h, path, file_size) if h.crypt_method == CRYPT_LUKS else None
    if key is None:
        raise KeyRequired(f"{path}: encrypted ({describe(h.crypt_method)}); no key given (--key)")
    if area is None:
        return Encryption(qcow_aes(key), physical=False, method=CRYPT_AES)
    offset, length = area
    hdr = luks1.parse(bytes(file.pread(offset, min(length, 4096))), path, length)
    master = luks1.unlock(hdr, key, lambda o, n: bytes(file.pread(offset + o, n)), path)
    enc = Encryption(SectorCipher(hdr.spec, master), physical=True, method=CRYPT_LUKS)
    enc.luks = hdr
    return enc


def encryption_info(file: object, h: L.Header, file_size: int) -> dict[str, object]:
    """qemu-img info's ``encrypt`` block, readable without the key."""
    from imgfs.block.hostfile import HostFile

    assert isinstance(file, HostFile)
    if h.crypt_method != CRYPT_LUKS:
        return {"format": describe(h.crypt_method)}
    offset, length = luks_area(h, file.path, file_size)
    hdr = luks1.parse(bytes(file.pread(offset, min(length, 4096))), file.path, length)
    return {"format": "luks"} | hdr.format_specific()


def create_params(options: Mapping[str, str]) -> tuple[int, CipherSpec | None, str, int]:
    """(crypt_method, LUKS cipher, LUKS hash, iter-time ms) from ``-o encrypt.*`` options."""
    fmt = options.get("encrypt.format") or None
    legacy = options.get("encryption")
    if legacy is not None and legacy.lower() in ("on", "yes", "true", "1"):
        if fmt not in (None, "aes"):
            raise InvalidRequest("qcow2 options encryption=on and encrypt.format conflict")
        fmt = "aes"
    luks_keys = [
        k
        for k in options
        if k.startswith("encrypt.") and k not in ("encrypt.format", "encrypt.key-secret")
    ]
    if fmt is None:
        if luks_keys:
            raise InvalidRequest(f"qcow2 option {luks_keys[0]} needs encrypt.format")
        return CRYPT_NONE, None, "", 0
    if fmt == "aes":
        if luks_keys:
            raise InvalidRequest(f"qcow2 option {luks_keys[0]} is for encrypt.format=luks")
        return CRYPT_AES, None, "", 0
    if fmt != "luks":
        raise InvalidRequest(f"qcow2 encrypt.format={fmt!r}: luks or aes")
    spec, hash_alg, iter_time = luks_params(options, "encrypt.")
    return CRYPT_LUKS, spec, hash_alg, iter_time


def luks_params(options: Mapping[str, str], prefix: str) -> tuple[CipherSpec, str, int]:
    """A LUKS cipher, hash and iter-time from ``-o`` options named ``PREFIX cipher-alg``..."""
    alg = options.get(prefix + "cipher-alg") or "aes-256"
    mode = options.get(prefix + "cipher-mode") or "xts"
    ivgen = options.get(prefix + "ivgen-alg") or "plain64"
    ivhash = options.get(prefix + "ivgen-hash-alg") or None
    if ivgen == "essiv" and ivhash is None:
        ivhash = "sha256"
    hash_alg = options.get(prefix + "hash-alg") or "sha256"
    try:
        iter_time = int(options.get(prefix + "iter-time") or "2000")
    except ValueError:
        raise InvalidRequest(f"option {prefix}iter-time: not a number") from None
    if not 1 <= iter_time <= 3_600_000:
        raise InvalidRequest(f"option {prefix}iter-time={iter_time}: 1 to 3600000 ms")
    spec = CipherSpec(alg, mode, ivgen, ivhash)
    spec.validate()
    return spec, hash_alg, iter_time
