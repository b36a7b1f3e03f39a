"""Block encryption shared by the qcow2, qcow and luks drivers: sector ciphers with QEMU's
cipher/mode/IV-generator names (:mod:`.cipher`), LUKS1 headers and key slots (:mod:`.luks1`),
passphrases that do not leak (:mod:`.secret`), and the legacy qcow AES key (:func:`qcow_aes`)."""

from __future__ import annotations

from imgfs.crypto.cipher import CipherSpec, SectorCipher
from imgfs.crypto.secret import Secret

__all__ = ["CipherSpec", "SectorCipher", "Secret", "qcow_aes"]


def qcow_aes(passphrase: Secret) -> SectorCipher:
    """qcow/qcow2's legacy encryption (crypt_method 1): AES-128-CBC with plain64 IVs, keyed by
    the passphrase's first 16 bytes, zero-padded."""
    key = passphrase.reveal()[:16].ljust(16, b"\0")
    return SectorCipher(CipherSpec("aes-128", "cbc", "plain64"), key)
