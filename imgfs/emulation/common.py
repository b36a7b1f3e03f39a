"""What every device model shares: the completion record and the request-level errors."""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

#: Kinds of request, for the replay summary and the verify model.
READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES, VERIFY, OTHER = (
    "read",
    "write",
    "flush",
    "discard",
    "write_zeroes",
    "verify",
    "other",
)


class Completion(NamedTuple):
    """The device's answer to one request.

    ``status`` holds the bus's status fields, ready for a JSON result record (SCSI: status,
    sense_key, asc, ascq, sense; ATA: ata_status, ata_error; virtio: virtio_status). ``ok`` is
    the bus's success status. ``data`` is the data-in buffer (empty when there is none).
    """

    kind: str
    ok: bool
    status: dict[str, Any]
    data: bytes | bytearray | memoryview
    nbytes: int


class BadRequest(Exception):
    """The trace cannot be executed as written (a truncated CDB or FIS, a data-out buffer that
    does not match the command). Not a device status: the replay reports it as a trace error
    for that request."""


def serial_for(name: str) -> str:
    """A stable 20-character serial number for a disk, derived from its name (every bus
    reports the same one for the same disk)."""
    return hashlib.sha256(name.encode()).hexdigest()[:20].upper()
