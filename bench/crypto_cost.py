"""In-process cost of imgfs.crypto.SectorCipher: CPU (process_time) per MiB for whole-request
encrypt/decrypt at a few request sizes and every mode. Not a FUSE benchmark.

    python bench/crypto_cost.py [--seconds 0.6] [--modes NAME,...] [--root CHECKOUT]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This checkout's imgfs, or another's (--root /work/main) to compare.
_root = sys.argv[sys.argv.index("--root") + 1] if "--root" in sys.argv else None
sys.path.insert(0, _root or str(Path(__file__).resolve().parent.parent))

from imgfs.crypto.cipher import CipherSpec, SectorCipher  # noqa: E402

SPECS: dict[str, tuple[CipherSpec, int]] = {
    "aes-256-xts-plain64": (CipherSpec("aes-256", "xts", "plain64"), 64),
    "aes-128-xts-plain": (CipherSpec("aes-128", "xts", "plain"), 32),
    "aes-256-cbc-essiv": (CipherSpec("aes-256", "cbc", "essiv", "sha256"), 32),
    "aes-128-cbc-plain64": (CipherSpec("aes-128", "cbc", "plain64"), 16),
    "aes-256-ctr-plain64": (CipherSpec("aes-256", "ctr", "plain64"), 32),
    "aes-256-ecb": (CipherSpec("aes-256", "ecb", "plain64"), 32),
}
SIZES = (4 << 20, 1 << 20, 128 << 10, 4096)


def cost_per_mib(fn: Callable[[bytes, int], object], data: bytes, seconds: float) -> float:
    """ms of process CPU per MiB, best of 3 runs of ~seconds/3 each."""
    best = float("inf")
    n = len(data)
    for _ in range(3):
        reps = 0
        t0 = time.process_time()
        deadline = t0 + seconds / 3
        sector = 1 << 33  # plain64 sectors beyond 32 bits
        while True:
            fn(data, sector)
            reps += 1
            sector += n >> 9
            t = time.process_time()
            if t >= deadline:
                break
        best = min(best, (t - t0) / reps / (n / (1 << 20)) * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=0.6)
    ap.add_argument("--modes", default=",".join(SPECS))
    ap.add_argument("--root", help="the imgfs checkout to measure (default: this one)")
    args = ap.parse_args()
    import imgfs

    print(f"imgfs from {Path(imgfs.__file__).parent}")
    print(f"{'cipher':22} {'request':>8} {'decrypt ms/MiB':>15} {'encrypt ms/MiB':>15}")
    for name in args.modes.split(","):
        spec, kb = SPECS[name]
        c = SectorCipher(spec, os.urandom(kb))
        for size in SIZES:
            data = os.urandom(size)
            d = cost_per_mib(c.decrypt, data, args.seconds)
            e = cost_per_mib(c.encrypt, data, args.seconds)
            print(f"{name:22} {size >> 10:>6}Ki {d:>15.3f} {e:>15.3f}")


if __name__ == "__main__":
    main()
