"""Interruption and progress for ``imgfs dedup``.

SIGINT and SIGTERM only set a flag; the work checks it at safe points (between blocks, between
images) and unwinds with :class:`Interrupted`, removing its temporary files on the way. A test
hook (``IMGFS_DEDUP_TEST_SIGNAL_AT=STEP:N``) makes the process send itself SIGINT at the N-th
safe point named STEP, so tests interrupt it at a known place through the real signal path.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from imgfs.errors import ImgfsError

TEST_HOOK_ENV = "IMGFS_DEDUP_TEST_SIGNAL_AT"


class Interrupted(ImgfsError):
    """A signal asked the run to stop; it stopped at a safe point."""


class Control:
    def __init__(self, progress: bool) -> None:
        self.requested: int | None = None
        self.show_progress = progress
        self._counts: dict[str, int] = {}
        hook = os.environ.get(TEST_HOOK_ENV, "")
        step, _, count = hook.partition(":")
        self._hook = (step, int(count)) if step and count.isdigit() else None

    @contextmanager
    def signals(self) -> Iterator[None]:
        """Catch SIGINT/SIGTERM for the duration (restoring the old handlers after)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.requested = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def check(self, step: str) -> None:
        """A safe point: stop here if a signal came."""
        if self._hook is not None and self._hook[0] == step:
            n = self._counts[step] = self._counts.get(step, 0) + 1
            if n == self._hook[1]:
                os.kill(os.getpid(), signal.SIGINT)
        if self.requested is not None:
            raise Interrupted(f"interrupted by signal {self.requested} (during {step})")

    def bar(self, total: int, desc: str) -> Any:
        """A progress bar over ``total`` bytes (a no-op object without --progress/a tty)."""
        if not self.show_progress or total <= 0:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                    file=sys.stderr, leave=False)  # fmt: skip


class _NoBar:
    def update(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None
