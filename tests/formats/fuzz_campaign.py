"""A long mutation-fuzz campaign over every format, for running in the background.

    python -m tests.formats.fuzz_campaign OUT_DIR [--per-format N] [--chunk N] [--first-seed S]

Seeds come from two places: the small qemu-img (and other producer) images of
:func:`tests.formats.hostile.make_bases`, and every image of the shared corpus whose format imgfs
reads (``MANIFEST.tsv``, decompressed into OUT_DIR; an image in a directory of its own brings
its sibling files along: extents, bundle parts, backing files). Mutants run through the same
worker as the hostile tests, so a finding is replayed with ``run_mutants([base], [seed], dir)``.

OUT_DIR/progress.json holds executions, failures and distinct error lines per format, rewritten
after every chunk; OUT_DIR/failures/ keeps a copy of every mutant that failed (regenerated from
its base and seed) for tests/formats/regressions/.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import json
import lzma
import re
import shutil
import sys
import time
from pathlib import Path

from tests.formats.hostile import (
    Base,
    make_bases,
    make_mutant,
    run_mutants,
    scratch_dir,
    standard_regions,
)

# Corpus formats that name a top-level image (extents and companions come along as siblings).
CORPUS_FORMATS = {
    "bochs": "bochs", "cloop": "cloop", "dmg": "dmg", "parallels": "parallels",
    "parallels-hdd-descriptor": "parallels-hdd", "qcow2": "qcow2", "vdi": "vdi",
    "vhdx": "vhdx", "vmdk": "vmdk", "vpc": "vpc", "asif": "asif",
}  # fmt: skip
# Copying a seed per mutant must stay cheap.
MAX_CORPUS_SEED = 12 * 1024 * 1024
OPENERS = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}


def unpacked_name(path: str, compression: str) -> str:
    name = Path(path).name
    if compression != "none" and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def copy_decompressed(src: Path, compression: str, dest: Path) -> None:
    opener = OPENERS.get(compression)
    if opener is None:
        shutil.copyfile(src, dest)
        return
    with opener(src, "rb") as f, open(dest, "wb") as out:
        shutil.copyfileobj(f, out)


def corpus_bases(corpus: Path, root: Path) -> dict[str, list[Base]]:
    """One base per corpus image of a format imgfs reads (malformed ones included)."""
    with open(corpus / "MANIFEST.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    by_dir: dict[str, list[dict]] = {}
    for row in rows:
        by_dir.setdefault(str(Path(row["path"]).parent), []).append(row)
    bases: dict[str, list[Base]] = {}
    for index, row in enumerate(rows):
        fmt = CORPUS_FORMATS.get(row["format"])
        if fmt is None or "encrypt" in row["path"]:
            continue
        parts = Path(row["path"]).parts
        # An image that names others (a descriptor, an overlay) in a directory of its own
        # (vmdk-rs/monolithicFlat/, split.hdd/, backing-chain/): bring the siblings.
        names_others = fmt in ("vmdk", "parallels-hdd", "qcow2", "vpc", "vhdx")
        group = by_dir[str(Path(row["path"]).parent)] if names_others and len(parts) >= 4 else [row]
        d = root / f"corpus-{index}-{fmt}"
        d.mkdir(parents=True)
        try:
            total = 0
            for member in group:
                name = unpacked_name(member["path"], member["stored_compression"])
                copy_decompressed(corpus / member["path"], member["stored_compression"], d / name)
                total += (d / name).stat().st_size
            if total > MAX_CORPUS_SEED:
                shutil.rmtree(d)
                continue
        except OSError:
            shutil.rmtree(d, ignore_errors=True)
            continue
        image = unpacked_name(row["path"], row["stored_compression"])
        base = Base(d, fmt, image, {image: standard_regions(d / image)})
        base.save()
        bases.setdefault(fmt, []).append(base)
    return bases


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-format", type=int, default=5000)
    parser.add_argument("--chunk", type=int, default=250)
    parser.add_argument("--first-seed", type=int, default=1_000_000)
    parser.add_argument("--formats", default="")
    args = parser.parse_args()
    from tests.conftest import SHARED

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    bases = make_bases(out / "bases")
    for fmt, extra in corpus_bases(SHARED / "corpus", out / "corpus").items():
        bases.setdefault(fmt, []).extend(extra)
    formats = args.formats.split(",") if args.formats else sorted(bases)
    progress: dict[str, dict] = {
        fmt: {"executions": 0, "failures": [], "errors": {}, "opened": 0, "seconds": 0.0,
              "bases": [b.directory.name for b in bases[fmt]]}
        for fmt in formats
    }  # fmt: skip
    (out / "failures").mkdir(exist_ok=True)
    done_per_format = 0
    while done_per_format < args.per_format:
        for fmt in formats:
            first = args.first_seed + done_per_format
            seeds = range(first, first + args.chunk)
            start = time.monotonic()
            outcome = run_mutants(bases[fmt], seeds, scratch_dir(out))
            p = progress[fmt]
            p["seconds"] += time.monotonic() - start
            p["executions"] += len(outcome.results)
            p["opened"] += sum(bool(r.get("opened")) for r in outcome.results)
            for r in outcome.results:
                for e in r.get("errors", [])[:1]:
                    key = e.split(":", 1)[0]
                    p["errors"][key] = p["errors"].get(key, 0) + 1
            for failure in outcome.failures:
                p["failures"].append(failure[:4000])
                found = re.search(r"seed (\d+)", failure)
                if found is not None:
                    seed = int(found.group(1))
                    base = bases[fmt][(seed - first) % len(bases[fmt])]
                    dest = out / "failures" / f"{fmt}-{seed}"
                    shutil.rmtree(dest, ignore_errors=True)
                    make_mutant(base, seed, dest)
            (out / "progress.json").write_text(json.dumps(progress, indent=1))
        done_per_format += args.chunk
    return 0


if __name__ == "__main__":
    sys.exit(main())
