"""One error hierarchy for the whole package.

Every error that imgfs raises on purpose is an :class:`ImgfsError`. Each class carries the errno
that the FUSE layer answers with, so the mapping lives here and not in every handler. The message
is one line meant for a person: it names the image and quotes the offending value.
"""

from __future__ import annotations

import errno


class ImgfsError(Exception):
    """Base class; ``errno`` is what a FUSE request failing with this error returns."""

    errno: int = errno.EIO


class CorruptImage(ImgfsError):
    """The image's metadata is inconsistent or out of the limits we accept."""

    errno = errno.EIO


class Unsupported(ImgfsError):
    """A feature of the image (or a request) that imgfs does not implement."""

    errno = errno.EOPNOTSUPP


class NeedsKey(ImgfsError):
    """The image is encrypted and no (or a wrong) key was given."""

    errno = errno.EACCES


class ReadOnly(ImgfsError):
    """A write to an image that is open read-only."""

    errno = errno.EROFS


class InvalidRequest(ImgfsError):
    """A request outside the image or with bad arguments."""

    errno = errno.EINVAL


class NoSpace(ImgfsError):
    """A write starting at or past the end of the disk, as a block device answers it."""

    errno = errno.ENOSPC


class NotPermitted(ImgfsError):
    """A write that imgfs refuses on purpose (for example one that would change a probed raw
    image into another format)."""

    errno = errno.EPERM


class HostIOError(ImgfsError):
    """The host file system failed a read, write or sync; ``errno`` is the host's."""

    def __init__(self, message: str, host_errno: int) -> None:
        super().__init__(message)
        self.errno = host_errno


class UsageError(ImgfsError):
    """Bad command-line input (a missing directory, a busy mountpoint, ...)."""

    errno = errno.EINVAL


class KeyRequired(NeedsKey):
    """The image is encrypted and no key was given for it."""


class WrongKey(NeedsKey):
    """The key given for an encrypted image does not open it."""
