"""Deduplication by backing file: the blocks several qcow2 images hold at the same guest
offsets go into one read-only base image, and each image is rewritten as a qcow2 overlay on it.

qcow2 backing can share data only at the same guest offset (an overlay's unallocated cluster
reads the backing image's cluster at that offset), so that is the sharing planned here; equal
blocks at different offsets are left to FIDEDUPERANGE.

Safety: the base is written to a temporary file, checked, synced and renamed into place before
any image names it, and never changes after. Each image is rewritten into a temporary file in
the same directory; its guest content is compared with the original byte for byte and its
metadata checked; then it is synced and renamed over the original (atomic: a crash leaves the
old image or the new one). The original is opened through ``open_disk`` during the whole
rewrite, so the image locks apply, and its identity (inode, size, mtime) is checked again just
before the rename: an image that changed meanwhile is left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from imgfs.block import chain
from imgfs.block.disk import Disk, open_disk
from imgfs.block.driver import RepairMode
from imgfs.create import create_image
from imgfs.dedup.control import Control, Interrupted
from imgfs.dedup.index import DedupIndex, FileKey
from imgfs.dedup.scan import Image, block_hash
from imgfs.errors import CorruptImage, ImgfsError

BASE_NAME = re.compile(r"imgfs-dedup-base-(\d+)\.qcow2")
VERIFY_CHUNK = 4 * 1024 * 1024
# A rough per-image cost of qcow2 metadata (header, tables), for estimates only.
METADATA_ESTIMATE = 256 * 1024


# How the report says that an image was deduplicated by an earlier run.
ON_BASE = "already an overlay on"


def is_base(name: str) -> bool:
    return BASE_NAME.fullmatch(name) is not None


def temp_name(directory: str, name: str) -> str:
    # A dot name: the mount does not list it, and a later run recognises leftovers.
    return os.path.join(directory, f".{name}.imgfs-dedup-tmp")


@dataclass(slots=True)
class Member:
    image: Image
    shared_blocks: int  # blocks the base will answer for
    own_blocks: int  # blocks the overlay keeps
    allocated_before: int  # host bytes of the image file now


@dataclass(slots=True)
class BasePlan:
    """One base image and the images to rewrite on it."""

    name: str
    exists: bool
    size: int
    # block index -> (hash, image to copy it from); only for a new base
    blocks: dict[int, tuple[bytes, str]] = field(default_factory=dict)
    hashes: dict[int, bytes] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)

    def saving(self, block_size: int) -> int:
        """Estimated host bytes saved: the members' current sizes minus their overlays and
        (for a new base) the base."""
        before = sum(m.allocated_before for m in self.members)
        after = sum(m.own_blocks * block_size + METADATA_ESTIMATE for m in self.members)
        if not self.exists:
            after += len(self.blocks) * block_size + METADATA_ESTIMATE
        return before - after


def skip_reason(img: Image) -> str | None:
    """Why an image is not rewritten on a base (None: it may be)."""
    if is_base(img.name):
        return "it is a dedup base image"
    if img.format != "qcow2":
        return f"its format is {img.format} (only qcow2 images are rebased)"
    if img.backing is not None:
        if is_base(os.path.basename(img.backing)):
            return f"{ON_BASE} {img.backing}"
        return f"it already has a backing file ({img.backing})"
    return img.read_only_reason


def _member(img: Image, base: dict[int, bytes]) -> Member:
    shared = sum(1 for i, h in img.hashes.items() if base.get(i) == h)
    return Member(img, shared, len(img.hashes) - shared, os.stat(img.path).st_blocks * 512)


def plan(
    images: list[Image], block_size: int, min_size: int
) -> tuple[list[BasePlan], dict[str, str]]:
    """The bases to use or make and their members; and the images left alone, with why."""
    skipped: dict[str, str] = {}
    candidates: list[Image] = []
    for img in images:
        reason = skip_reason(img)
        if reason is None:
            candidates.append(img)
        elif not is_base(img.name):
            skipped[img.name] = reason
    plans: list[BasePlan] = []
    # Images a base already made can answer for (an earlier run, or one interrupted midway).
    for base in (img for img in images if is_base(img.name)):
        bp = BasePlan(base.name, True, base.virtual_size, hashes=base.hashes)
        plans.append(bp)
    remaining: list[Image] = []
    for img in candidates:
        best: tuple[int, BasePlan | None, Member | None] = (0, None, None)
        for bp in plans:
            m = _member(img, bp.hashes)
            gain = m.allocated_before - m.own_blocks * block_size - METADATA_ESTIMATE
            if gain >= max(min_size, 1) and gain > best[0]:
                best = (gain, bp, m)
        if best[1] is not None and best[2] is not None:
            best[1].members.append(best[2])
        else:
            remaining.append(img)
    plans = [bp for bp in plans if bp.members]
    new = _new_base(remaining, block_size, min_size, _next_base_name(images))
    if new is not None:
        plans.append(new)
    planned = {m.image.name for bp in plans for m in bp.members}
    for img in candidates:
        if img.name not in planned:
            skipped[img.name] = "too little in common with the other images"
    return plans, skipped


def _next_base_name(images: list[Image]) -> str:
    numbers = [int(m.group(1)) for img in images if (m := BASE_NAME.fullmatch(img.name))]
    return f"imgfs-dedup-base-{max(numbers, default=0) + 1}.qcow2"


def _new_base(images: list[Image], block_size: int, min_size: int, name: str) -> BasePlan | None:
    members = list(images)
    while len(members) >= 2:
        # At each offset, the content most images hold there, if at least two do.
        per_offset: dict[int, Counter[bytes]] = {}
        for img in members:
            for i, h in img.hashes.items():
                per_offset.setdefault(i, Counter())[h] += 1
        blocks: dict[int, tuple[bytes, str]] = {}
        for i, counts in per_offset.items():
            h, n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
            if n >= 2:
                source = next(img.name for img in members if img.hashes.get(i) == h)
                blocks[i] = (h, source)
        hashes = {i: h for i, (h, _) in blocks.items()}
        scored = [_member(img, hashes) for img in members]
        keep = [
            m for m in scored
            if m.allocated_before - m.own_blocks * block_size - METADATA_ESTIMATE >= min_size
        ]  # fmt: skip
        if len(keep) == len(members):
            bp = BasePlan(name, False, max(img.virtual_size for img in members), blocks, hashes,
                          keep)  # fmt: skip
            return bp if bp.saving(block_size) >= max(min_size, 1) else None
        members = [m.image for m in keep]
    return None


# -- doing it ---------------------------------------------------------------------------------


@dataclass(slots=True)
class RebaseResult:
    bases_made: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    allocated_before: int = 0
    allocated_after: int = 0


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def execute(
    directory: str, plans: list[BasePlan], block_size: int, index: DedupIndex, control: Control
) -> RebaseResult:
    result = RebaseResult()
    containment = chain.Containment(directory)
    for bp in plans:
        if not bp.exists:
            control.check("base")
            make_base(directory, bp, block_size, index, control, containment)
            result.bases_made.append(bp.name)
        for m in bp.members:
            control.check("image")
            before = os.stat(m.image.path).st_blocks * 512
            try:
                rewrite_as_overlay(directory, m.image, bp, block_size, index, control,
                                   containment)  # fmt: skip
            except Interrupted:
                raise
            except ImgfsError as e:
                result.failed[m.image.name] = str(e)
                continue
            result.rewritten.append(m.image.name)
            result.allocated_before += before
            result.allocated_after += os.stat(m.image.path).st_blocks * 512
    return result


def make_base(
    directory: str,
    bp: BasePlan,
    block_size: int,
    index: DedupIndex,
    control: Control,
    containment: chain.Containment,
) -> None:
    """Write the base image (temp file, check, sync, rename) and index it."""
    final = os.path.join(directory, bp.name)
    tmp = temp_name(directory, bp.name)
    sources: dict[str, Disk] = {}
    bar = control.bar(len(bp.blocks) * block_size, "base")
    try:
        create_image(tmp, "qcow2", bp.size, {"cluster_size": str(block_size)})
        base = open_disk(tmp, "qcow2")
        try:
            for i in sorted(bp.blocks):
                control.check("base-block")
                h, source = bp.blocks[i]
                disk = sources.get(source)
                if disk is None:
                    disk = sources[source] = open_disk(
                        os.path.join(directory, source), "qcow2", read_only=True,
                        containment=containment)  # fmt: skip
                start = i * block_size
                data = disk.read(start, min(block_size, disk.size - start))
                if block_hash(data) != h:
                    raise CorruptImage(f"{source}: block {i} changed since it was hashed")
                base.write(start, data)
                bar.update(len(data))
            base.flush()
            _check_clean(base, tmp)
        finally:
            base.close()
        _verify_hashes(tmp, bp.hashes, block_size, control)
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(directory)
        os.chmod(final, 0o444)  # nothing may write it: every overlay depends on it
        index.replace(bp.name, FileKey.of(final), "qcow2", bp.size, bp.hashes)
    finally:
        bar.close()
        for disk in sources.values():
            disk.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _check_clean(disk: Disk, what: str) -> None:
    result = disk.check(RepairMode.NONE)
    if result.exit_status != 0:
        raise CorruptImage(f"{what}: the new image fails its check: {'; '.join(result.messages)}")


def _verify_hashes(path: str, hashes: dict[int, bytes], block_size: int, control: Control) -> None:
    """Read the new base back: every block holds what the plan says."""
    disk = open_disk(path, "qcow2", read_only=True)
    try:
        for i, h in hashes.items():
            control.check("verify-block")
            start = i * block_size
            if block_hash(disk.read(start, min(block_size, disk.size - start))) != h:
                raise CorruptImage(f"{path}: block {i} reads back wrong")
    finally:
        disk.close()


def rewrite_as_overlay(
    directory: str,
    img: Image,
    bp: BasePlan,
    block_size: int,
    index: DedupIndex,
    control: Control,
    containment: chain.Containment,
) -> None:
    """Rewrite one qcow2 image as an overlay on the base, keeping its guest content."""
    tmp = temp_name(directory, img.name)
    source = open_disk(img.path, "qcow2", read_only=True, containment=containment)
    bar = control.bar(img.virtual_size, img.name)
    try:
        info = source.top.info()
        if info.snapshots or info.encrypted or {"data-file", "bitmaps"} & set(info.format_specific):
            raise ImgfsError(
                f"{img.name}: has snapshots, encryption, bitmaps or a data file; left alone"
            )
        if FileKey.of(img.path) != img.key:
            raise ImgfsError(f"{img.name}: changed since it was hashed; left alone")
        options = {
            "backing_file": bp.name,
            "backing_fmt": "qcow2",
            "cluster_size": str(block_size),
            "compat": str(info.format_specific.get("compat", "1.1")),
        }
        create_image(tmp, "qcow2", img.virtual_size, options)
        overlay = open_disk(tmp, "qcow2", containment=containment)
        try:
            _fill_overlay(source, overlay, img, bp.hashes, block_size, control, bar.update)
            overlay.flush()
            _check_clean(overlay, tmp)
        finally:
            overlay.close()
        _verify_same(source, tmp, containment, control)
        st = os.stat(img.path)
        os.chmod(tmp, st.st_mode & 0o7777)
        with contextlib.suppress(PermissionError):
            os.chown(tmp, st.st_uid, st.st_gid)
        _fsync_file(tmp)
        control.check("rename")
        if FileKey.of(img.path) != img.key:
            raise ImgfsError(f"{img.name}: changed while it was rewritten; left alone")
        os.replace(tmp, img.path)
        _fsync_dir(directory)
        # Same guest content: the hashes stay; only the file's identity changed.
        index.touch(img.name, FileKey.of(img.path))
    finally:
        bar.close()
        source.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fill_overlay(
    source: Disk,
    overlay: Disk,
    img: Image,
    base: dict[int, bytes],
    block_size: int,
    control: Control,
    progress: Callable[[int], None],
) -> None:
    size = img.virtual_size
    nblocks = -(-size // block_size)
    for i in range(nblocks):
        control.check("rebase-block")
        mine, theirs = img.hashes.get(i), base.get(i)
        start = i * block_size
        n = min(block_size, size - start)
        if mine != theirs:
            if mine is None:  # zeros here, data in the base: a zero cluster hides it
                overlay.write_zeroes(start, n, may_unmap=False)
            else:
                data = source.read(start, n)
                if block_hash(data) != mine:
                    raise ImgfsError(f"{img.name}: block {i} changed since it was hashed")
                overlay.write(start, data)
        progress(n)


def _verify_same(source: Disk, path: str, containment: chain.Containment, control: Control) -> None:
    """The new image's guest bytes equal the original's, all of them."""
    new = open_disk(path, "qcow2", read_only=True, containment=containment)
    try:
        if new.size != source.size:
            raise CorruptImage(f"{path}: size {new.size}, the original has {source.size}")
        offset = 0
        while offset < source.size:
            control.check("verify-chunk")
            n = min(VERIFY_CHUNK, source.size - offset)
            if bytes(new.read(offset, n)) != bytes(source.read(offset, n)):
                raise CorruptImage(f"{path}: reads back differently near offset {offset}")
            offset += n
    finally:
        new.close()
