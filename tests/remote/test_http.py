"""The HTTP(S) backend against a real nginx on loopback (and, for the failures nginx cannot
produce, tiny misbehaving http.server handlers): exports equal ``qemu-img convert -O raw`` of the
local file and qemu's own curl driver reading the same URL."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgfs.block.disk import open_disk
from imgfs.errors import HostIOError, NotPermitted, ReadOnly, Unsupported
from imgfs.remote.http import HttpFile, HttpOptions
from tests.mountutil import run_imgfs
from tests.oracle import (
    assert_qemu_check_clean,
    assert_qemu_compare_identical,
    assert_same_bytes,
    pattern_image,
    qemu_img,
    qemu_raw,
)
from tests.remote.httpserver import Nginx, file_handler, serve_in_thread
from tests.remote.tls import make_ca_and_cert

MiB = 1024 * 1024

# (file name, qemu-img convert arguments, format for qemu)
FORMATS = [
    ("disk.qcow2", ["-O", "qcow2"], "qcow2"),
    ("disk-c.qcow2", ["-O", "qcow2", "-c"], "qcow2"),
    ("stream.vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"], "vmdk"),
    ("sparse.vmdk", ["-O", "vmdk", "-o", "subformat=monolithicSparse"], "vmdk"),
    ("disk.vhd", ["-O", "vpc"], "vpc"),
    ("disk.img", ["-O", "raw"], "raw"),
]


def make_source(path: Path, size: int = 12 * MiB) -> bytes:
    """A raw disk with data, a zero run in the middle (holes for the sparse formats) and data
    near the end."""
    data = bytearray(pattern_image(path, size, seed=7))
    data[3 * MiB : 9 * MiB] = bytes(6 * MiB)
    path.write_bytes(data)
    return bytes(data)


@pytest.fixture
def www(tmp_path: Path) -> Path:
    path = tmp_path / "www"
    path.mkdir()
    return path


@pytest.fixture
def nginx(www: Path, tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(www, tmp_path)
    yield server
    server.stop()


@pytest.fixture
def served(www: Path, tmp_path: Path) -> dict[str, Path]:
    """Every format of FORMATS made from one source disk, in the web root."""
    source = tmp_path / "source.raw"
    make_source(source)
    out = {}
    for name, args, _ in FORMATS:
        qemu_img("convert", "-f", "raw", *args, str(source), str(www / name))
        out[name] = www / name
    return out


def test_every_format_through_a_mount_equals_qemu(
    served: dict[str, Path], nginx: Nginx, images: Path, tmp_path: Path, mount
) -> None:
    for name in served:
        (images / f"{name}.url").write_text(f"# served by the test's nginx\n\n{nginx.url}/{name}\n")
    m = mount(images)
    for name, _, fmt in FORMATS:
        expected = qemu_raw(served[name], tmp_path / f"{name}.expected", fmt)
        exported = m.file(name)
        assert exported.stat().st_mode & 0o222 == 0, f"{name}: exported writable"
        assert_same_bytes(exported, expected)
        # qemu's own curl driver reading the same URL agrees (-m 1: qemu 7.2's curl driver
        # hangs with several coroutines in flight on these images)
        via_qemu = tmp_path / f"{name}.qemu-curl"
        subprocess.run(
            ["qemu-img", "convert", "-m", "1", "-f", fmt, "-O", "raw", f"{nginx.url}/{name}",
             str(via_qemu)],
            check=True, timeout=60, capture_output=True,
        )  # fmt: skip
        assert_same_bytes(via_qemu, expected)
    with pytest.raises(OSError):
        with open(m.file("disk.qcow2"), "r+b") as f:
            f.write(b"x")


def test_mount_url_option(served: dict[str, Path], nginx: Nginx, images: Path, tmp_path: Path,
                          mount) -> None:  # fmt: skip
    m = mount(images, "--url", f"remote.qcow2={nginx.url}/disk.qcow2")
    assert os.listdir(m.path) == ["remote.qcow2.raw"]
    assert_same_bytes(m.file("remote.qcow2"), qemu_raw(served["disk.qcow2"], tmp_path / "e.raw"))
    bad = run_imgfs("mount", "--url", "x=/etc/passwd", str(images), str(tmp_path / "mnt2"))
    assert bad.returncode != 0 and "is not a URL" in bad.stderr


def test_info_and_convert_from_url(served: dict[str, Path], nginx: Nginx, tmp_path: Path) -> None:
    url = f"{nginx.url}/stream.vmdk"
    result = run_imgfs("info", "--output", "json", url, check=True)
    info = json.loads(result.stdout)
    assert info["format"] == "vmdk" and info["filename"] == url
    assert info["virtual-size"] == 12 * MiB
    out = tmp_path / "out.raw"
    out.write_bytes(b"an existing output file is replaced")
    run_imgfs("convert", url, str(out), check=True)
    assert_same_bytes(out, qemu_raw(served["stream.vmdk"], tmp_path / "expected", "vmdk"))
    # converted to qcow2 from the URL, then checked by qemu
    out_qcow2 = tmp_path / "out.qcow2"
    run_imgfs("convert", "-O", "qcow2", f"{nginx.url}/disk.vhd", str(out_qcow2), check=True)
    assert_qemu_check_clean(out_qcow2, "qcow2")
    assert_qemu_compare_identical(out_qcow2, qemu_raw(served["disk.vhd"], tmp_path / "vhd.raw"))


def test_driver_api_reads_concurrently_and_refuses_writes(www: Path, nginx: Nginx) -> None:
    data = pattern_image(www / "big.img", 24 * MiB, seed=3)
    disk = open_disk(f"{nginx.url}/big.img", read_only=False)  # a URL always opens read-only
    try:
        assert disk.read_only
        with pytest.raises(ReadOnly):
            disk.write(0, b"x")
        failures: list[str] = []

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(60):
                off = rng.randrange(len(data))
                n = rng.randrange(1, 3 * MiB)
                got = bytes(disk.read(off, n))
                if got != data[off : off + n]:
                    failures.append(f"{off}+{n}")

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures
        assert bytes(disk.read(len(data) - 10, 100)) == data[-10:]  # clamped at the end
    finally:
        disk.close()


def test_sequential_reads_become_few_large_requests(www: Path, nginx: Nginx) -> None:
    data = pattern_image(www / "seq.img", 32 * MiB, seed=5)
    f = HttpFile(f"{nginx.url}/seq.img", HttpOptions.from_mapping({"http-cache-size": "16M"}))
    try:
        before = len(nginx.requests())
        for off in range(0, len(data), 128 * 1024):  # FUSE-sized pieces
            assert bytes(f.pread(off, 128 * 1024)) == data[off : off + 128 * 1024]
        requests = len(nginx.requests()) - before
        # 32 MiB in 128 KiB reads is 256 reads; read-ahead grows to 8 MiB requests
        assert requests <= 12, requests
        assert len(f._cache) <= 16  # the cache bound (16 x 1 MiB blocks) holds
        assert bytes(f.pread(len(data) - 5, 10)) == data[-5:] + bytes(5)  # zeros past the end
    finally:
        f.close()


def test_overlay_on_a_url_backing_written_through_the_mount(
    served: dict[str, Path], nginx: Nginx, images: Path, tmp_path: Path, mount
) -> None:
    url = f"{nginx.url}/disk.qcow2"
    overlay = images / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", url, "-F", "qcow2", str(overlay))
    expected = bytearray(qemu_raw(served["disk.qcow2"], tmp_path / "base.raw").read_bytes())
    m = mount(images, "--allow-external-files")
    writes = [(12345, b"A" * 70000), (3 * MiB - 7, b"B" * 9000), (12 * MiB - 100, b"C" * 100)]
    with open(m.file("overlay.qcow2"), "r+b") as f:
        assert f.read() == bytes(expected)
        for off, data in writes:
            f.seek(off)
            f.write(data)
            expected[off : off + len(data)] = data
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read() == bytes(expected)
    m.umount()
    assert_qemu_check_clean(overlay, "qcow2")
    (tmp_path / "expected.raw").write_bytes(expected)
    assert_qemu_compare_identical(overlay, tmp_path / "expected.raw", "qcow2")
    base = qemu_raw(served["disk.qcow2"], tmp_path / "base-after.raw")
    assert base.read_bytes() == (tmp_path / "base.raw").read_bytes()  # the base is untouched


def test_url_backing_is_refused_in_a_mount_without_allow_external_files(
    served: dict[str, Path], nginx: Nginx, images: Path, mount
) -> None:
    overlay = images / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", f"{nginx.url}/disk.qcow2", "-F", "qcow2", str(overlay))
    shutil.copy(served["disk.img"], images / "local.img")
    before = len(nginx.requests())  # qemu-img create read the backing image
    m = mount(images)
    m.expected_log_errors.append("is a URL; use --allow-external-files")
    assert sorted(os.listdir(m.path)) == ["local.img.raw"]
    assert "overlay.qcow2: not exported" in m.log_text()
    # and no request reached the server
    assert len(nginx.requests()) == before


def test_remote_backing_names_stay_on_the_same_server(
    served: dict[str, Path], nginx: Nginx, www: Path, tmp_path: Path
) -> None:
    # relative backing name: resolved against the overlay's URL
    qemu_img("create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", str(www / "rel.qcow2"))
    disk = open_disk(f"{nginx.url}/rel.qcow2")
    try:
        assert [i.filename for i in disk.info()] == [
            f"{nginx.url}/rel.qcow2",
            f"{nginx.url}/disk.qcow2",
        ]
        want = qemu_raw(served["disk.qcow2"], tmp_path / "want.raw").read_bytes()
        assert bytes(disk.read(0, len(want))) == want
    finally:
        disk.close()
    # a remote image naming a local file is refused even where external files are allowed
    qemu_img(
        "create", "-f", "qcow2", "-u", "-b", "file:///etc/passwd", "-F", "raw",
        str(www / "evil.qcow2"), "1M",
    )  # fmt: skip
    with pytest.raises(NotPermitted, match="not on the same server"):
        open_disk(f"{nginx.url}/evil.qcow2")


def test_server_ignoring_range_gives_one_line(tmp_path: Path) -> None:
    pattern_image(tmp_path / "x.img", 2 * MiB)
    url, server = serve_in_thread(file_handler(tmp_path / "x.img", honour_range=False))
    try:
        with pytest.raises(Unsupported, match="ignores Range requests"):
            open_disk(f"{url}/x.img")
        result = run_imgfs("info", f"{url}/x.img")
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "ignores Range requests" in result.stderr
    finally:
        server.stop()


def test_206_without_content_range_gives_one_line(tmp_path: Path) -> None:
    pattern_image(tmp_path / "x.img", MiB)
    url, server = serve_in_thread(file_handler(tmp_path / "x.img", content_range=False))
    try:
        with pytest.raises(Unsupported, match="no usable Content-Range"):
            open_disk(f"{url}/x.img")
    finally:
        server.stop()


def test_404_and_403_give_one_line(nginx: Nginx, www: Path) -> None:
    result = run_imgfs("info", f"{nginx.url}/missing.qcow2")
    assert result.returncode == 1
    assert result.stderr.strip().endswith("HTTP 404 Not Found"), result.stderr
    assert result.stderr.count("\n") == 1
    (www / "forbidden.img").write_bytes(bytes(4096))
    with pytest.raises(HostIOError, match="HTTP 403 Forbidden"):
        open_disk(f"{nginx.url}/forbidden.img")


def test_retries_after_dropped_connections_and_503(tmp_path: Path) -> None:
    data = pattern_image(tmp_path / "x.img", 3 * MiB)
    url, server = serve_in_thread(file_handler(tmp_path / "x.img", drop_first=2))
    try:
        disk = open_disk(f"{url}/x.img", driver_options={"http-retries": "3"})
        assert bytes(disk.read(0, len(data))) == data
        disk.close()
    finally:
        server.stop()
    handler = file_handler(tmp_path / "x.img", fail_status=503, fail_first=2)
    url, server = serve_in_thread(handler)
    try:
        disk = open_disk(f"{url}/x.img", driver_options={"http-retries": "3"})
        assert bytes(disk.read(0, len(data))) == data
        disk.close()
        assert handler.counts["failed"] == 2
    finally:
        server.stop()
    handler = file_handler(tmp_path / "x.img", fail_status=503, fail_first=100)
    url, server = serve_in_thread(handler)
    try:
        start = time.monotonic()
        with pytest.raises(HostIOError, match=r"HTTP 503 .*gave up after 3 attempts"):
            open_disk(f"{url}/x.img", driver_options={"http-retries": "2"})
        assert time.monotonic() - start < 5
        assert handler.counts["requests"] == 3
    finally:
        server.stop()


def test_stalled_server_times_out(tmp_path: Path) -> None:
    pattern_image(tmp_path / "x.img", MiB)
    url, server = serve_in_thread(file_handler(tmp_path / "x.img", stall=5))
    try:
        start = time.monotonic()
        with pytest.raises(HostIOError, match="timed out") as err:
            open_disk(f"{url}/x.img", driver_options={"http-timeout": "0.5", "http-retries": "1"})
        assert time.monotonic() - start < 4
        assert "\n" not in str(err.value)
    finally:
        server.stop()


def test_object_changed_on_the_server_is_an_error(www: Path, nginx: Nginx) -> None:
    pattern_image(www / "x.img", 8 * MiB, seed=1)
    f = HttpFile(f"{nginx.url}/x.img", HttpOptions.from_mapping({}))
    try:
        f.pread(0, 100)
        pattern_image(www / "x.img", 8 * MiB, seed=2)
        os.utime(www / "x.img", (time.time() + 10, time.time() + 10))  # a new ETag for sure
        with pytest.raises(HostIOError, match="changed on the server"):
            f.pread(5 * MiB, 100)
    finally:
        f.close()


@pytest.fixture
def tls(tmp_path: Path, www: Path) -> Iterator[tuple[Nginx, Path]]:
    ca, cert, key = make_ca_and_cert(tmp_path / "pki")
    server = Nginx(www, tmp_path / "tls", tls=(cert, key))
    yield server, ca
    server.stop()


def test_https_with_a_ca_file_and_without(
    served: dict[str, Path], tls: tuple[Nginx, Path], tmp_path: Path, images: Path, mount
) -> None:
    server, ca = tls
    url = f"{server.url}/disk.qcow2"
    expected = qemu_raw(served["disk.qcow2"], tmp_path / "expected.raw")
    with pytest.raises(HostIOError, match="certificate verification failed"):
        open_disk(url)
    disk = open_disk(url, driver_options={"ca-file": str(ca)})
    try:
        assert bytes(disk.read(0, disk.size)) == expected.read_bytes()
    finally:
        disk.close()
    # the CLI: a clear one-line error without the CA, and IMGFS_CA_FILE
    result = run_imgfs("info", url)
    assert result.returncode == 1 and "certificate verification failed" in result.stderr
    assert result.stderr.count("\n") == 1
    env = dict(os.environ, IMGFS_CA_FILE=str(ca))
    out = tmp_path / "out.raw"
    subprocess.run(
        [*_imgfs(), "convert", url, str(out)], env=_pythonpath(env), check=True, timeout=120
    )
    assert_same_bytes(out, expected)
    # a mount with -o ca-file=
    (images / "disk.qcow2.url").write_text(url + "\n")
    m = mount(images, "-o", f"ca-file={ca}")
    assert_same_bytes(m.file("disk.qcow2"), expected)
    # sslverify=off is explicit (and logged)
    disk = open_disk(url, driver_options={"sslverify": "off"})
    disk.close()


def _imgfs() -> list[str]:
    from tests.mountutil import imgfs_cmd

    return imgfs_cmd()


def _pythonpath(env: dict[str, str]) -> dict[str, str]:
    from tests.mountutil import subprocess_env

    base = subprocess_env()
    base.update({k: v for k, v in env.items() if k.startswith("IMGFS_")})
    return base
