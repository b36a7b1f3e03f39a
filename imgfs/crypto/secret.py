"""Passphrases held so that they do not leak: ``repr``/``str`` never show the bytes (so a
traceback, a log line or an f-string cannot print them), and they are read from files only,
never from the command line."""

from __future__ import annotations

from imgfs.errors import UsageError


class Secret:
    """Bytes of a passphrase; :meth:`reveal` is the one way to get them."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self) -> object:  # never pickled into another process's arguments
        raise TypeError("a Secret cannot be pickled")

    @classmethod
    def from_file(cls, path: str) -> Secret:
        """The file's exact bytes, as QEMU's ``--object secret,id=...,file=PATH`` reads it:
        a trailing newline is part of the passphrase (write the file with ``printf``)."""
        try:
            with open(path, "rb") as f:
                data = f.read(64 * 1024 + 1)
        except OSError as e:
            raise UsageError(f"key file {path}: {e.strerror or e}") from None
        if len(data) > 64 * 1024:
            raise UsageError(f"key file {path}: larger than 64 KiB")
        return cls(data)
