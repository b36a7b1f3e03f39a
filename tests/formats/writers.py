"""Write workloads shared by the format tests."""

from __future__ import annotations

import random
import threading

from imgfs.block.disk import Disk

STRIPE = 65536


def striped_thread_writes(
    disk: Disk, size: int, threads: int = 4, ops: int = 60, seed: int = 11
) -> bytearray:
    """Write from ``threads`` threads at once, each owning every ``threads``-th 64 KiB stripe
    (so the expected bytes are well defined whatever the interleaving), with odd offsets and
    lengths inside the stripe. Returns what the first ``size`` bytes must hold afterwards."""
    expected = bytearray(disk.read(0, size))
    rng = random.Random(seed)
    plans = []
    for t in range(threads):
        plan = []
        for i in range(ops):
            stripe = rng.randrange(0, size // STRIPE // threads) * threads + t
            start = stripe * STRIPE + rng.randrange(0, STRIPE - STRIPE // 16)
            data = bytes([t * ops + i + 1 & 0xFF]) * rng.randrange(1, STRIPE - start % STRIPE)
            plan.append((start, data))
            expected[start : start + len(data)] = data
        plans.append(plan)

    def run(plan: list[tuple[int, bytes]]) -> None:
        for start, data in plan:
            disk.write(start, data)

    workers = [threading.Thread(target=run, args=(plan,)) for plan in plans]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return expected
