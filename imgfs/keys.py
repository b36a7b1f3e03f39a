"""Passphrases for encrypted images, looked up per image file.

``imgfs mount --key NAME=FILE`` (repeatable) names the passphrase file of the image file NAME
(its name in IMAGES_DIR, or of a backing file anywhere down a chain); ``--key-dir DIR`` supplies
``DIR/NAME.key`` for every image NAME that has no ``--key``. A passphrase is the file's exact
bytes, as QEMU's ``--object secret,file=`` reads it (no newline is stripped). Files are read
when an image opens, so a key file may be added or fixed while mounted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from imgfs.crypto.secret import Secret
from imgfs.errors import KeyRequired, UsageError

KEY_SUFFIX = ".key"


@dataclass(slots=True)
class KeyRing:
    """Where the passphrase of each image comes from (file paths, never the bytes)."""

    files: dict[str, str] = field(default_factory=dict)  # image file name -> key file
    key_dir: str | None = None

    @classmethod
    def from_args(cls, keys: Iterable[str] = (), key_dir: str | None = None) -> KeyRing:
        ring = cls(key_dir=os.path.abspath(key_dir) if key_dir else None)
        for item in keys:
            name, sep, path = item.partition("=")
            if not sep or not name or not path or "/" in name:
                raise UsageError(f"--key {item!r}: expected NAME=FILE (NAME an image file name)")
            ring.files[name] = os.path.abspath(path)
        if ring.key_dir is not None and not os.path.isdir(ring.key_dir):
            raise UsageError(f"--key-dir {key_dir}: not a directory")
        return ring

    @classmethod
    def single(cls, image: str, key_file: str) -> KeyRing:
        """One key for one image (``imgfs info/check/create --key FILE``)."""
        return cls(files={os.path.basename(image): os.path.abspath(key_file)})

    def key_file(self, image_path: str) -> str | None:
        name = os.path.basename(image_path)
        path = self.files.get(name)
        if path is None and self.key_dir is not None:
            candidate = os.path.join(self.key_dir, name + KEY_SUFFIX)
            if os.path.isfile(candidate):
                path = candidate
        return path

    def lookup(self, image_path: str) -> Secret | None:
        """The passphrase for the image file at ``image_path``, or None when none is given."""
        path = self.key_file(image_path)
        if path is None:
            return None
        try:
            return Secret.from_file(path)
        except UsageError as e:
            raise KeyRequired(f"{image_path}: {e}") from None
