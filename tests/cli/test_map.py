"""imgfs map against qemu-img map: the same JSON text and the same human table, byte for byte,
for images of many formats made by qemu-img and qemu-io."""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from imgfs.cli import main
from tests.conftest import SHARED
from tests.oracle import qemu_img

MiB = 1024 * 1024


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    result = subprocess.run([*args, str(image)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "error" not in result.stdout.lower(), result


def create(path: Path, fmt: str, size: str, *opts: str) -> Path:
    args = ["create", "-q", "-f", fmt]
    for o in opts:
        args += ["-o", o]
    qemu_img(*args, str(path), size)
    return path


def imgfs_out(*args: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        status = main(list(args))
    return status, buf.getvalue()


# -- image builders: each returns (image, format) ------------------------------------------------


def qcow2_chain(tmp: Path, compat: str = "1.1") -> Path:
    """Three layers: base with data and compressed clusters, mid with zero clusters, a discard
    and new data, top with data over both and a zeroed range."""
    base = create(tmp / "base.qcow2", "qcow2", "8M", f"compat={compat}")
    qemu_io(base, "qcow2", "write -P 1 0 1M", "write -P 2 3M 192k", "write -P 9 6M 64k")
    text = tmp / "text.raw"
    text.write_bytes(b"compressible " * (MiB // 13 + 1))
    qemu_io(base, "qcow2", "write -c -P 7 4M 128k")
    mid = create(tmp / "mid.qcow2", "qcow2", "8M", f"compat={compat}",
                 "backing_file=base.qcow2,backing_fmt=qcow2")  # fmt: skip
    qemu_io(mid, "qcow2", "write -z 0 64k", "write -P 3 512k 128k", "discard 3M 64k",
            "write -P 4 5M 100k")  # fmt: skip
    top = create(tmp / "top.qcow2", "qcow2", "8M", f"compat={compat}",
                 "backing_file=mid.qcow2,backing_fmt=qcow2")  # fmt: skip
    qemu_io(top, "qcow2", "write -P 5 448k 256k", "write -z 6M 32k", "write -P 6 7M 4k")
    return top


def qcow2_v3_chain(tmp: Path) -> tuple[Path, str]:
    return qcow2_chain(tmp, "1.1"), "qcow2"


def qcow2_v2_chain(tmp: Path) -> tuple[Path, str]:
    return qcow2_chain(tmp, "0.10"), "qcow2"


def qcow2_plain_chain(tmp: Path) -> tuple[Path, str]:
    """Three layers without compressed clusters, so the human table is complete."""
    base = create(tmp / "base.qcow2", "qcow2", "8M")
    qemu_io(base, "qcow2", "write -P 1 0 2M", "write -P 2 6M 1M")
    mid = create(tmp / "mid.qcow2", "qcow2", "8M", "backing_file=base.qcow2,backing_fmt=qcow2")
    qemu_io(mid, "qcow2", "write -z 64k 64k", "write -P 3 1M 128k", "discard 6M 64k")
    top = create(tmp / "top.qcow2", "qcow2", "8M", "backing_file=mid.qcow2,backing_fmt=qcow2")
    qemu_io(top, "qcow2", "write -P 4 960k 128k", "write -z 6M 128k", "write -P 5 7M 4k")
    return top, "qcow2"


def qcow2_compressed(tmp: Path) -> tuple[Path, str]:
    src = tmp / "src.raw"
    src.write_bytes((b"compress me please " * 100000)[: 3 * MiB] + bytes(MiB))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(tmp / "c.qcow2"))
    image = tmp / "c.qcow2"
    qemu_io(image, "qcow2", "write -P 8 1M 64k")
    return image, "qcow2"


def qcow2_short_backing(tmp: Path) -> tuple[Path, str]:
    """A backing image shorter than its overlay: past its end the overlay reads zeros."""
    base = create(tmp / "b.qcow2", "qcow2", "2M")
    qemu_io(base, "qcow2", "write -P 1 0 2M")
    top = create(tmp / "t.qcow2", "qcow2", "6M", "backing_file=b.qcow2,backing_fmt=qcow2")
    qemu_io(top, "qcow2", "write -P 2 1M 64k", "write -P 3 4M 64k")
    return top, "qcow2"


def qcow2_over_raw(tmp: Path) -> tuple[Path, str]:
    base = tmp / "b.raw"
    with open(base, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\1" * 65536)
    top = create(tmp / "t.qcow2", "qcow2", "4M", "backing_file=b.raw,backing_fmt=raw")
    qemu_io(top, "qcow2", "write -P 2 3M 64k")
    return top, "qcow2"


def raw_sparse(tmp: Path) -> tuple[Path, str]:
    image = tmp / "r.raw"
    with open(image, "wb") as f:
        f.truncate(5 * MiB + 512)
        for pos in (0, 2 * MiB + 4096, 5 * MiB):
            f.seek(pos)
            f.write(b"x" * 8192)
    return image, "raw"


def raw_full(tmp: Path) -> tuple[Path, str]:
    image = tmp / "f.raw"
    image.write_bytes(b"\1" * (3 * MiB))
    return image, "raw"


def vmdk(subformat: str) -> Callable[[Path], tuple[Path, str]]:
    def build(tmp: Path) -> tuple[Path, str]:
        image = create(tmp / "d.vmdk", "vmdk", "5M", f"subformat={subformat}")
        qemu_io(image, "vmdk", "write -P 1 0 64k", "write -P 2 2M 300k", "write -z 4M 64k")
        return image, "vmdk"

    return build


def vmdk_stream(tmp: Path) -> tuple[Path, str]:
    src = tmp / "s.raw"
    src.write_bytes(b"stream " * (MiB // 7) + bytes(2 * MiB))
    image = tmp / "s.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(src),
             str(image))  # fmt: skip
    return image, "vmdk"


def vmdk_overlay(tmp: Path) -> tuple[Path, str]:
    base = create(tmp / "b.vmdk", "vmdk", "4M")
    qemu_io(base, "vmdk", "write -P 1 0 1M")
    top = create(tmp / "t.vmdk", "vmdk", "4M", "backing_file=b.vmdk,backing_fmt=vmdk")
    qemu_io(top, "vmdk", "write -P 2 512k 64k", "write -P 3 3M 64k")
    return top, "vmdk"


def simple(fmt: str, *opts: str, size: str = "6M") -> Callable[[Path], tuple[Path, str]]:
    def build(tmp: Path) -> tuple[Path, str]:
        image = create(tmp / f"d.{fmt}", fmt, size, *opts)
        qemu_io(image, fmt, "write -P 1 0 64k", "write -P 2 2M 3M", "write -P 3 5M 4k",
                "write -z 3M 1M")  # fmt: skip
        return image, fmt

    return build


def qed_chain(tmp: Path) -> tuple[Path, str]:
    base = create(tmp / "b.qed", "qed", "8M")
    qemu_io(base, "qed", "write -P 1 0 1M", "write -P 4 6M 64k")
    top = create(tmp / "t.qed", "qed", "8M", "backing_file=b.qed,backing_fmt=qed")
    qemu_io(top, "qed", "write -P 2 512k 64k", "write -P 3 3M 64k", "write -z 6M 64k")
    return top, "qed"


def qcow_chain(tmp: Path) -> tuple[Path, str]:
    base = create(tmp / "b.qcow", "qcow", "4M")
    qemu_io(base, "qcow", "write -P 1 0 1M")
    top = create(tmp / "t.qcow", "qcow", "4M", "backing_file=b.qcow,backing_fmt=qcow")
    qemu_io(top, "qcow", "write -P 2 512k 64k", "write -P 3 3M 64k")
    return top, "qcow"


BUILDERS: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "qcow2-v3-chain": qcow2_v3_chain,
    "qcow2-v2-chain": qcow2_v2_chain,
    "qcow2-plain-chain": qcow2_plain_chain,
    "qcow2-compressed": qcow2_compressed,
    "qcow2-short-backing": qcow2_short_backing,
    "qcow2-over-raw": qcow2_over_raw,
    "qcow2-prealloc-meta": simple("qcow2", "preallocation=metadata"),
    "qcow2-prealloc-falloc": simple("qcow2", "preallocation=falloc"),
    "qcow2-subcluster": simple("qcow2", "extended_l2=on,cluster_size=128k"),
    "raw-sparse": raw_sparse,
    "raw-full": raw_full,
    "vmdk-monolithicSparse": vmdk("monolithicSparse"),
    "vmdk-monolithicFlat": vmdk("monolithicFlat"),
    "vmdk-twoGbMaxExtentSparse": vmdk("twoGbMaxExtentSparse"),
    "vmdk-twoGbMaxExtentFlat": vmdk("twoGbMaxExtentFlat"),
    "vmdk-streamOptimized": vmdk_stream,
    "vmdk-overlay": vmdk_overlay,
    "vpc-dynamic": simple("vpc", "subformat=dynamic"),
    "vpc-fixed": simple("vpc", "subformat=fixed", size="6M"),
    "vdi-dynamic": simple("vdi"),
    "vdi-static": simple("vdi", "static=on"),
    "vhdx": simple("vhdx", size="8M"),
    "parallels": simple("parallels"),
    "qed-chain": qed_chain,
    "qcow-chain": qcow_chain,
}


@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_map_equals_qemu(case: str, tmp_path: Path) -> None:
    """The JSON text and the human table equal qemu-img's. qemu refuses a table for compressed
    or external data (status 1, after the lines before it); so does imgfs."""
    image, fmt = BUILDERS[case](tmp_path)
    for args in (["--output=json", "-f", fmt, str(image)], ["-f", fmt, str(image)]):
        result = qemu_img("map", *args, check=False)
        status, got = imgfs_out("map", *args)
        assert (status, got) == (1 if result.returncode else 0, result.stdout), args


def _corpus_images() -> list:
    """(path, format) of the corpus images qemu reads that are stored uncompressed: the first
    of each format in the default run, the others marked slow."""
    manifest = SHARED / "corpus" / "MANIFEST.tsv"
    skip = {"luks", "keyfile", "format", "vmdk-extent", "parallels-hdd-descriptor"}
    out = []
    seen: set[str] = set()
    for line in manifest.read_text().splitlines()[1:]:
        cols = line.split("\t")
        if cols[5] == "yes" and cols[11] == "none" and cols[1] not in skip:
            marks = [pytest.mark.slow] if cols[1] in seen else []
            seen.add(cols[1])
            out.append(pytest.param(cols[0], cols[1], marks=marks))
    return out


@pytest.mark.parametrize(("path", "fmt"), _corpus_images())
def test_map_of_corpus_images_equals_qemu(path: str, fmt: str) -> None:
    image = str(SHARED / "corpus" / path)
    for args in (["--output=json", "-f", fmt, image], ["-f", fmt, image]):
        result = qemu_img("map", *args, check=False)
        status, got = imgfs_out("map", *args)
        assert (status, got) == (1 if result.returncode else 0, result.stdout), args


@pytest.mark.parametrize(
    "case", ["qcow2-plain-chain", "qcow2-v3-chain", "qcow2-short-backing", "qed-chain",
             "vmdk-overlay", "raw-sparse", "qcow2-prealloc-falloc"]
)  # fmt: skip
def test_info_allocation_agrees_with_qemu_map(case: str, tmp_path: Path) -> None:
    """imgfs info's allocation summary, recomputed from qemu-img map of the same image: data
    is what depth 0 holds, zero what depth 0 marks as zeros, backing what deeper layers hold,
    unallocated what no layer has."""
    image, fmt = BUILDERS[case](tmp_path)
    want = {"data": 0, "zero": 0, "backing": 0, "unallocated": 0}
    for e in json.loads(qemu_img("map", "--output=json", "-f", fmt, str(image)).stdout):
        if not e["present"]:
            want["unallocated"] += e["length"]
        elif e["depth"] > 0:
            want["backing"] += e["length"]
        elif e["data"]:
            want["data"] += e["length"]
        else:
            want["zero"] += e["length"]
    status, out = imgfs_out("info", "--output=json", "-f", fmt, str(image))
    assert status == 0
    got = json.loads(out)["imgfs-allocation"]
    assert {k: got[k] for k in want} == want
    assert got["host-shared"] in (0, None)


@pytest.mark.parametrize(
    "window",
    [("1536k", "1M"), ("100", "1000"), ("7M", "10M"), ("9M", None), ("3M", "0"), ("0", None),
     ("6200k", "300k")],
)  # fmt: skip
def test_map_of_a_window_equals_qemu(window: tuple[str, str | None], tmp_path: Path) -> None:
    image, fmt = qcow2_plain_chain(tmp_path)
    start, length = window
    opts = [f"--start-offset={start}"] + ([f"--max-length={length}"] if length else [])
    for out in (["--output=json"], []):
        args = [*out, *opts, "-f", fmt, str(image)]
        result = qemu_img("map", *args)
        assert imgfs_out("map", *args) == (0, result.stdout), args


def test_map_of_an_empty_image_equals_qemu(tmp_path: Path) -> None:
    image = create(tmp_path / "empty.qcow2", "qcow2", "0")
    for args in (["--output=json", str(image)], [str(image)]):
        assert imgfs_out("map", *args) == (0, qemu_img("map", *args).stdout)
