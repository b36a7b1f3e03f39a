"""The VMDK text descriptor ("# Disk DescriptorFile"): header keys, extent lines, DDB.

Layout (VMware "Virtual Disk Format 5.0", section "The Descriptor File"): ``key=value`` lines
(``version``, ``CID``, ``parentCID``, ``createType``, ``parentFileNameHint``), then one line per
extent ``ACCESS SECTORS TYPE "FILENAME" [OFFSET]``, then ``ddb.*`` keys. Comments start with #.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from imgfs.errors import CorruptImage, Unsupported

# A descriptor is a few hundred bytes; anything this big is not one.
MAX_DESCRIPTOR_SIZE = 1024 * 1024
# Enough for a 4 TiB twoGbMaxExtent disk (2048 extents) with room to spare.
MAX_EXTENTS = 16384

ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")
EXTENT_TYPES = ("FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE")

_EXTENT_LINE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)")?(?:\s+(\d+))?\s*$'
)
_KEY_LINE = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True, slots=True)
class ExtentLine:
    access: str
    sectors: int
    kind: str
    filename: str | None
    offset: int  # in sectors, FLAT/VMFS only


@dataclass(slots=True)
class Descriptor:
    text: str
    keys: dict[str, str] = field(default_factory=dict)
    extents: list[ExtentLine] = field(default_factory=list)

    @property
    def create_type(self) -> str:
        return self.keys.get("createType", "")

    @property
    def cid(self) -> int | None:
        return _hex_or_none(self.keys.get("CID"))

    @property
    def parent_cid(self) -> int | None:
        return _hex_or_none(self.keys.get("parentCID"))

    @property
    def parent_hint(self) -> str | None:
        return self.keys.get("parentFileNameHint") or None

    def with_extent_sectors(self, index: int, sectors: int) -> str:
        """The descriptor text with extent line ``index`` given a new size."""
        return _replace_extent_sectors(self.text, index, sectors)

    def with_cid(self, cid: int) -> str:
        """The descriptor text with its CID line replaced (or added after version=)."""
        lines = self.text.split("\n")
        for i, line in enumerate(lines):
            m = _KEY_LINE.match(line)
            if m and m.group(1) == "CID":
                lines[i] = f"CID={cid:08x}" + ("\r" if line.endswith("\r") else "")
                return "\n".join(lines)
        for i, line in enumerate(lines):
            m = _KEY_LINE.match(line)
            if m and m.group(1) == "version":
                lines.insert(i + 1, f"CID={cid:08x}")
                return "\n".join(lines)
        raise CorruptImage("descriptor has no version line to put a CID after")


def _replace_extent_sectors(text: str, index: int, sectors: int) -> str:
    lines = text.split("\n")
    seen = 0
    for i, line in enumerate(lines):
        m = _EXTENT_LINE.match(line.strip())
        if m:
            if seen == index:
                access, _, rest = line.strip().split(None, 2)
                lines[i] = f"{access} {sectors} {rest}" + ("\r" if line.endswith("\r") else "")
                return "\n".join(lines)
            seen += 1
    raise CorruptImage(f"descriptor has no extent line {index}")


def _hex_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 16) & 0xFFFFFFFF
    except ValueError:
        return None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def looks_like_descriptor(head: bytes) -> bool:
    """Whether a file's first bytes are a VMDK text descriptor (for probing; never raises)."""
    text = head[:4096]
    if b"\0" in text.rstrip(b"\0"):
        return False
    try:
        decoded = text.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError:
        return False
    if decoded.lstrip().startswith("# Disk DescriptorFile"):
        return True
    keys = set()
    for line in decoded.splitlines():
        m = _KEY_LINE.match(line)
        if m:
            keys.add(m.group(1))
    return "createType" in keys and "version" in keys


def parse(raw: bytes, where: str) -> Descriptor:
    """Parse descriptor text, raising CorruptImage on what cannot be a descriptor."""
    if len(raw) > MAX_DESCRIPTOR_SIZE:
        raise CorruptImage(f"{where}: descriptor of {len(raw)} bytes is too big")
    raw = raw.split(b"\0", 1)[0]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptImage(f"{where}: descriptor is not text ({e})") from None
    desc = Descriptor(text=text)
    for line_no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _EXTENT_LINE.match(stripped)
        if m and m.group(1) in ACCESS_MODES:
            kind = m.group(3)
            if kind not in EXTENT_TYPES:
                raise Unsupported(f"{where}: extent type {kind!r} (line {line_no})")
            if kind != "ZERO" and m.group(4) is None:
                raise CorruptImage(f"{where}: extent line {line_no} names no file: {stripped!r}")
            if len(desc.extents) >= MAX_EXTENTS:
                raise CorruptImage(f"{where}: more than {MAX_EXTENTS} extents")
            desc.extents.append(
                ExtentLine(
                    access=m.group(1),
                    sectors=int(m.group(2)),
                    kind=kind,
                    filename=m.group(4),
                    offset=int(m.group(5) or 0),
                )
            )
            continue
        k = _KEY_LINE.match(line)
        if k:
            desc.keys[k.group(1)] = _unquote(k.group(2))
            continue
        if stripped.split()[0] in ACCESS_MODES:
            raise CorruptImage(f"{where}: bad extent line {line_no}: {stripped[:80]!r}")
        # Anything else (odd tools write odd lines) is ignored, as VMware does.
    if "createType" not in desc.keys:
        raise CorruptImage(f"{where}: descriptor has no createType")
    return desc


def extent_names(raw: bytes) -> list[str]:
    """The file names of a descriptor's extents; [] for anything unparsable (never raises)."""
    try:
        return [e.filename for e in parse(raw, "?").extents if e.filename]
    except Exception:
        return []


def render(
    *,
    cid: int,
    parent_cid: int,
    create_type: str,
    extent_lines: list[str],
    ddb: dict[str, str],
    parent_hint: str | None = None,
) -> str:
    """A descriptor in the layout VMware and qemu-img write."""
    out = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        f'createType="{create_type}"',
    ]
    if parent_hint is not None:
        out.append(f'parentFileNameHint="{parent_hint}"')
    out += ["", "# Extent description", *extent_lines, "", "# The Disk Data Base", "#DDB", ""]
    out += [f'ddb.{k} = "{v}"' for k, v in ddb.items()]
    return "\n".join(out) + "\n"
