"""QEMU's ``luks`` format: a LUKS1 volume used as a disk image (also what cryptsetup makes with
``luksFormat --type luks1``). The guest disk is the payload, from ``payload_offset`` sectors to
the end of the file, encrypted per 512-byte sector with IVs from the sector's number inside the
payload (dm-crypt's convention). A fresh image's payload is unwritten, so it reads as whatever
the zeros on the host decrypt to, exactly as in QEMU and dm-crypt.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Self

from imgfs.block.driver import BlockDriver, ImageInfo, OpenOptions, ProbeInput
from imgfs.block.hostfile import HostFile
from imgfs.block.registry import register
from imgfs.crypto import SectorCipher, luks1
from imgfs.crypto.cipher import SECTOR
from imgfs.errors import CorruptImage, InvalidRequest, KeyRequired, Unsupported
from imgfs.formats.qcow2.encryption import create_key, luks_params

ZERO_CHUNK = 1024 * 1024


class LuksDriver(BlockDriver):
    format_name = "luks"
    supports_write = True
    cheap_reads = False  # every read decrypts
    zero_init = False  # the unwritten payload decrypts to noise

    create_options = {
        "cipher-alg": "cipher: aes-128, aes-192, aes-256 (default), cast5-128, sm4",
        "cipher-mode": "cipher mode: xts (default), cbc, ecb, ctr",
        "ivgen-alg": "IV generator: plain64 (default), plain, essiv",
        "ivgen-hash-alg": "essiv hash: sha256 (default for essiv), sha1, ...",
        "hash-alg": "PBKDF2 and anti-forensic hash: sha256 (default), sha1, sha512, ...",
        "iter-time": "PBKDF2 time in milliseconds (default 2000)",
        "key-secret": "accepted for qemu-img compatibility; the key comes from --key FILE",
        "key-file": "file holding the passphrase (its exact bytes); set by imgfs create --key",
        "preallocation": "off only (the payload is left unwritten, as qemu-img leaves it)",
    }

    def __init__(
        self, file: HostFile, options: OpenOptions, hdr: luks1.LuksHeader, cipher: SectorCipher
    ) -> None:
        super().__init__(file, options)
        self.hdr = hdr
        self.cipher = cipher
        self.payload = hdr.payload_offset * SECTOR
        self._size = file.size() - self.payload

    @classmethod
    def probe(cls, probe: ProbeInput) -> int:
        return 100 if probe.head[:6] == luks1.MAGIC else 0

    @classmethod
    def open(cls, file: HostFile, options: OpenOptions) -> Self:
        path = file.path
        head = bytes(file.pread(0, luks1.HEADER_SIZE))
        hdr = luks1.parse(head, path)
        payload = hdr.payload_offset * SECTOR
        if payload < luks1.HEADER_SIZE or payload > file.size():
            raise CorruptImage(
                f"{path}: LUKS payload_offset {hdr.payload_offset} is outside the file "
                f"({file.size()} bytes)"
            )
        hdr.spec  # noqa: B018 -- Unsupported naming the cipher before asking for a key
        if options.key is None:
            raise KeyRequired(f"{path}: encrypted (luks); no key given (--key)")
        master = luks1.unlock(hdr, options.key, lambda o, n: bytes(file.pread(o, n)), path)
        return cls(file, options, hdr, SectorCipher(hdr.spec, master))

    @property
    def virtual_size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        start, end = offset & ~511, (offset + length + 511) & ~511
        raw = self.file.pread(self.payload + start, end - start)
        if len(raw) < end - start:  # an odd-sized file's last partial sector
            raw = bytes(raw) + bytes(end - start - len(raw))
        plain = self.cipher.decrypt(raw, start >> 9)
        if start == offset and end == offset + length:
            return plain
        return memoryview(plain)[offset - start : offset - start + length]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.check_writable()
        start, end = offset & ~511, (offset + len(data) + 511) & ~511
        if start != offset or end != offset + len(data):
            # Whole sectors: complete the edges from their current content. Two writers of
            # one sector race here as they would on any block device with partial sectors.
            buf = bytearray(self.read(start, end - start))
            buf[offset - start : offset - start + len(data)] = data
            data = buf
        out = self.cipher.encrypt(data, start >> 9)
        keep = min(len(out), self._size - start)  # never grow an odd-sized file
        self.file.pwrite(self.payload + start, memoryview(out)[:keep])

    def resize(self, new_size: int) -> None:
        """Shrinking cuts the file; growing writes encrypted zeros (the host's zeros would
        decrypt to noise)."""
        self.check_writable()
        if new_size % SECTOR or new_size < 0:
            raise InvalidRequest(f"{self.file.path}: size {new_size} is not a multiple of 512")
        old = self._size
        self.file.truncate(self.payload + new_size)
        self._size = new_size
        pos = old & ~511
        while pos < new_size:
            n = min(ZERO_CHUNK, new_size - pos)
            self.write(pos, bytes(n))
            pos += n
        self.file.sync()

    def info(self) -> ImageInfo:
        info = super().info()
        info.encrypted = True
        info.format_specific = self.hdr.format_specific()
        return info

    @classmethod
    def create(cls, path: str, size: int, options: Mapping[str, str]) -> None:
        unknown = sorted(set(options) - set(cls.create_options))
        if unknown:
            raise InvalidRequest(f"luks: unknown option(s) {', '.join(unknown)}")
        if (options.get("preallocation") or "off") != "off":
            raise Unsupported("luks: only preallocation=off")
        size = -(-size // SECTOR) * SECTOR
        spec, hash_alg, iter_time = luks_params(options, "")
        key = create_key(options, "a luks image")
        _, area, _ = luks1.build(spec, hash_alg, key, iter_time)
        with open(path, "wb") as f:
            f.write(area)
            f.truncate(len(area) + size)
            f.flush()
            os.fsync(f.fileno())


register(LuksDriver)
