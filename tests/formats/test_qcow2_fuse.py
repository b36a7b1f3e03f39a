"""qcow2 through a real FUSE mount: concurrent writers, then qemu-img check and compare."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from imgfs.formats.qcow2 import Qcow2Driver
from tests.formats.qcow2_util import MiB, create, qemu_convert_raw, qemu_io, run
from tests.formats.test_qcow2_write import assert_check_clean, assert_compare


def test_concurrent_writers_through_mount(images: Path, mount, tmp_path: Path) -> None:
    base = create(images / "base.qcow2", 8 * MiB, "cluster_size=65536")
    qemu_io(base, "write -P 0x11 0 8M")
    img = create(images / "disk.qcow2", 8 * MiB, "cluster_size=16384", backing=base)
    model = bytearray(qemu_convert_raw(img, tmp_path / "start.raw").read_bytes())
    m = mount(images)
    exported = m.file("disk.qcow2")
    assert exported.stat().st_size == 8 * MiB
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        rng = random.Random(n)
        fd = os.open(exported, os.O_RDWR)
        try:
            for _ in range(40):
                # Each writer owns a 2 MiB region; writes straddle cluster edges.
                off = n * 2 * MiB + rng.randrange(0, 2 * MiB - 100_000)
                data = rng.randbytes(rng.choice([1, 513, 16384, 40_000, 99_999]))
                assert os.pwrite(fd, data, off) == len(data)
                with lock:
                    model[off : off + len(data)] = data
                back = os.pread(fd, len(data), off)
                assert back == data
            os.fsync(fd)
        except BaseException as e:
            errors.append(e)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with open(exported, "rb") as f:
        assert f.read() == model
    m.umount()
    assert_check_clean(img)
    assert_check_clean(base)
    assert_compare(img, bytes(model), tmp_path)


def test_compressed_and_data_file_images_through_mount(images: Path, mount, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(b"line %06d of compressible text\n" % i for i in range(60000)))
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(images / "packed.qcow2"))
    ext = create(images / "ext.qcow2", 2 * MiB, "data_file=ext.bin")
    qemu_io(ext, "write -P 0x33 4096 100000")
    assert Qcow2Driver.companion_files(str(ext)) == ["ext.bin"]
    m = mount(images)
    assert sorted(p.name for p in m.path.iterdir()) == ["ext.qcow2.raw", "packed.qcow2.raw"]
    assert m.file("packed.qcow2").read_bytes() == src.read_bytes().ljust(
        m.file("packed.qcow2").stat().st_size, b"\0"
    )
    expected = qemu_convert_raw(ext, tmp_path / "ext.raw").read_bytes()
    assert m.file("ext.qcow2").read_bytes() == expected
