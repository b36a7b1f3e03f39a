"""The persistent hash index of ``imgfs dedup``: one SQLite file in the images directory.

For every image it keeps the file's identity when it was hashed (inode, size, mtime) and the
content hash of each non-zero guest block. A later run re-hashes only the images whose identity
changed. Each image's hashes are replaced in one transaction, so an interrupted run leaves the
index as it was before that image (never half an image).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from imgfs.errors import HostIOError, InvalidRequest

log = logging.getLogger(__name__)

INDEX_NAME = ".imgfs-dedup.sqlite"
SCHEMA_VERSION = "1"
HASH_NAME = "sha256"


@dataclass(frozen=True, slots=True)
class FileKey:
    """What says a file is unchanged since it was hashed."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str) -> FileKey:
        st = os.stat(path)
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)

    def text(self) -> str:
        return f"{self.inode}:{self.size}:{self.mtime_ns}"


class DedupIndex:
    def __init__(self, directory: str, block_size: int) -> None:
        self.path = os.path.join(directory, INDEX_NAME)
        self.block_size = block_size
        # One run per directory at a time: a second one would take the first one's temporary
        # files for leftovers. (flock is separate from SQLite's own fcntl locks.)
        self._lock_fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise InvalidRequest(f"{directory}: another imgfs dedup is running there") from None
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            # The index is a cache: one that SQLite cannot read is started afresh.
            log.warning("%s: unreadable index (%s); starting a new one", self.path, e)
            with contextlib.suppress(Exception):
                self.db.close()
            os.ftruncate(self._lock_fd, 0)
            for suffix in ("-journal", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)
            try:
                self._open()
            except sqlite3.DatabaseError as e2:
                os.close(self._lock_fd)
                raise HostIOError(f"{self.path}: cannot write the index: {e2}", errno.EIO) from None

    def _open(self) -> None:
        block_size = self.block_size
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS images (
                name TEXT PRIMARY KEY, key TEXT NOT NULL, format TEXT NOT NULL,
                virtual_size INTEGER NOT NULL, dedupe_key TEXT);
            CREATE TABLE IF NOT EXISTS blocks (
                name TEXT NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
                PRIMARY KEY (name, idx)) WITHOUT ROWID;
            """
        )
        wanted = {"schema": SCHEMA_VERSION, "block-size": str(block_size), "hash": HASH_NAME}
        have = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        if have != wanted:
            # Another block size or hash: every stored hash is useless; start again.
            with self.transaction():
                self.db.execute("DELETE FROM blocks")
                self.db.execute("DELETE FROM images")
                self.db.execute("DELETE FROM meta")
                self.db.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())

    def transaction(self) -> _Transaction:
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()
        os.close(self._lock_fd)

    def is_current(self, name: str, key: FileKey) -> bool:
        row = self.db.execute("SELECT key FROM images WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] == key.text()

    def hashes(self, name: str) -> dict[int, bytes]:
        rows = self.db.execute("SELECT idx, hash FROM blocks WHERE name = ?", (name,))
        return {idx: bytes(h) for idx, h in rows}

    def replace(
        self, name: str, key: FileKey, fmt: str, virtual_size: int, hashes: dict[int, bytes]
    ) -> None:
        """Store an image's hashes (all of them, in one transaction)."""
        with self.transaction():
            self.db.execute("DELETE FROM blocks WHERE name = ?", (name,))
            self.db.execute(
                "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, NULL)",
                (name, key.text(), fmt, virtual_size),
            )
            self.db.executemany(
                "INSERT INTO blocks VALUES (?, ?, ?)", ((name, i, h) for i, h in hashes.items())
            )

    def touch(self, name: str, key: FileKey, fmt: str | None = None) -> None:
        """The file changed but its guest content did not (imgfs rewrote it)."""
        with self.transaction():
            self.db.execute("UPDATE images SET key = ? WHERE name = ?", (key.text(), name))
            if fmt is not None:
                self.db.execute("UPDATE images SET format = ? WHERE name = ?", (fmt, name))

    def dedupe_done(self, name: str, key: FileKey) -> bool:
        row = self.db.execute("SELECT dedupe_key FROM images WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] == key.text()

    def set_dedupe_done(self, name: str, key: FileKey) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE images SET key = ?, dedupe_key = ? WHERE name = ?",
                (key.text(), key.text(), name),
            )

    def forget_except(self, names: Iterable[str]) -> None:
        """Drop the images no longer in the directory."""
        keep = set(names)
        stored = [r[0] for r in self.db.execute("SELECT name FROM images").fetchall()]
        gone = [n for n in stored if n not in keep]
        if gone:
            with self.transaction():
                for name in gone:
                    self.db.execute("DELETE FROM blocks WHERE name = ?", (name,))
                    self.db.execute("DELETE FROM images WHERE name = ?", (name,))


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
