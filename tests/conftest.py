from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.mountutil import Mount, start_mount, stop_mount

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    # CI installs every tool the suite uses; a missing one is a failure there, not a skip.
    if os.environ.get("CI"):
        missing = [t for t in ("qemu-img", "fusermount3") if shutil.which(t) is None]
        if missing:
            raise pytest.UsageError(f"CI is missing required tools: {', '.join(missing)}")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """mount(images_dir, *imgfs_mount_args) -> Mount; every mount is torn down at the end, and
    its log must hold no unexpected errors."""
    mounts: list[Mount] = []

    def make(
        images: Path,
        *args: str,
        name: str = "mnt",
        at: Path | None = None,
        preload: tuple[str, ...] = (),
    ) -> Mount:
        point = at if at is not None else tmp_path / name
        m = start_mount(images, point, tmp_path / f"{name}.log", *args, preload=preload)
        mounts.append(m)
        return m

    yield make
    failures = []
    for m in mounts:
        stop_mount(m)
        try:
            m.check_log()
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)
