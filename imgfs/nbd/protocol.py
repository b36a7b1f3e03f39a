"""NBD protocol constants and wire structures, shared by the client and the server.

From the NBD protocol document (NetworkBlockDevice/nbd, doc/proto.md): fixed newstyle
handshake, the INFO/GO, STRUCTURED_REPLY and metadata-context extensions, WRITE_ZEROES with
NO_HOLE/FAST_ZERO. Everything is big-endian ("network byte order").
"""

from __future__ import annotations

import errno
import struct
from typing import Final

# -- handshake --------------------------------------------------------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT": newstyle, and the magic of every option
CLISERV_MAGIC: Final = 0x00420281861253  # oldstyle (refused)
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9

# server greeting: NBDMAGIC, IHAVEOPT, handshake flags
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
# option request header: IHAVEOPT, option, data length
OPTION_HEADER = struct.Struct(">QII")
# option reply header: magic, option, reply type, data length
OPTION_REPLY = struct.Struct(">QIII")
# the answer to NBD_OPT_EXPORT_NAME: size, transmission flags (then 124 zero bytes unless
# NO_ZEROES was negotiated)
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124

# handshake flags (server)
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
# client flags
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1
KNOWN_CLIENT_FLAGS: Final = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# transmission flags
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_RESIZE: Final = 1 << 9
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11

# options
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10

# option replies
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9

REP_ERROR_NAMES: Final = {
    REP_ERR_UNSUP: "unsupported option",
    REP_ERR_POLICY: "refused by server policy",
    REP_ERR_INVALID: "invalid option",
    REP_ERR_PLATFORM: "not supported on the server's platform",
    REP_ERR_TLS_REQD: "the server requires TLS",
    REP_ERR_UNKNOWN: "no such export",
    REP_ERR_SHUTDOWN: "the server is shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    REP_ERR_TOO_BIG: "request too big",
}

# NBD_REP_INFO information types
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3
INFO_TYPE = struct.Struct(">H")
INFO_EXPORT_BODY = struct.Struct(">HQH")  # type, size, transmission flags
INFO_BLOCK_SIZE_BODY = struct.Struct(">HIII")  # type, minimum, preferred, maximum payload

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# -- transmission ------------------------------------------------------------------------------

REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# request: magic, command flags, type, handle (cookie), offset, length
REQUEST = struct.Struct(">IHHQQI")
# simple reply: magic, error, handle
SIMPLE_REPLY = struct.Struct(">IIQ")
# structured reply chunk: magic, flags, type, handle, payload length
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# what both reply kinds share: the magic
REPLY_MAGIC = struct.Struct(">I")

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

CMD_NAMES: Final = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write-zeroes",
    CMD_BLOCK_STATUS: "block-status",
}

# command flags
CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# structured reply flags and types
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_ERROR_BIT: Final = 1 << 15
REPLY_TYPE_ERROR: Final = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET: Final = REPLY_TYPE_ERROR_BIT | 2

OFFSET = U64  # the offset that starts OFFSET_DATA and OFFSET_HOLE payloads
OFFSET_HOLE_BODY = struct.Struct(">QI")  # offset, hole size
ERROR_BODY = struct.Struct(">IH")  # error, message length (then the message)
BLOCK_DESCRIPTOR = struct.Struct(">II")  # length, status flags

# base:allocation status flags
CONTEXT_BASE_ALLOCATION: Final = "base:allocation"
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1

# error values on the wire (not the host's errno, although they mostly agree)
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

_TO_HOST_ERRNO: Final = {
    NBD_EPERM: errno.EPERM,
    NBD_EIO: errno.EIO,
    NBD_ENOMEM: errno.ENOMEM,
    NBD_EINVAL: errno.EINVAL,
    NBD_ENOSPC: errno.ENOSPC,
    NBD_EOVERFLOW: errno.EOVERFLOW,
    NBD_ENOTSUP: errno.EOPNOTSUPP,
    NBD_ESHUTDOWN: errno.ESHUTDOWN,
}


def host_errno(nbd_error: int) -> int:
    """The host errno for an NBD error value (unknown values count as EINVAL, as the spec
    tells clients to treat them)."""
    return _TO_HOST_ERRNO.get(nbd_error, errno.EINVAL)


def nbd_error(host: int) -> int:
    """The NBD error value for a host errno: EROFS becomes EPERM, EDQUOT/EFBIG become ENOSPC,
    anything without an NBD equivalent EIO."""
    if host in (errno.EPERM, errno.EROFS, errno.EACCES):
        return NBD_EPERM
    if host in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NBD_ENOSPC
    if host == errno.EINVAL:
        return NBD_EINVAL
    if host == errno.ENOMEM:
        return NBD_ENOMEM
    if host == errno.EOVERFLOW:
        return NBD_EOVERFLOW
    if host in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return NBD_ENOTSUP
    if host == errno.ESHUTDOWN:
        return NBD_ESHUTDOWN
    return NBD_EIO


# -- limits -----------------------------------------------------------------------------------

DEFAULT_PORT: Final = 10809
#: The largest read or write payload either side accepts (the spec's interoperable maximum).
MAX_PAYLOAD: Final = 32 * 1024 * 1024
#: Strings (export names, context names, messages) are at most 4096 bytes.
MAX_STRING: Final = 4096
#: The largest option data the server reads during the handshake.
MAX_OPTION_DATA: Final = 64 * 1024
