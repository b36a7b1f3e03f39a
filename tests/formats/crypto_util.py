"""qemu-img/qemu-io on encrypted images: secrets from files, --image-opts, and the retry that
LUKS creation needs here ("Unable to get accurate CPU usage", see PITFALLS.md)."""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from pathlib import Path

from imgfs.block.disk import Disk, open_disk
from imgfs.keys import KeyRing

PASSPHRASE = b"correct horse\n"  # a trailing newline is part of it, as in QEMU's secret file=
OTHER_PASSPHRASE = b"battery staple"


def key_file(directory: Path, data: bytes = PASSPHRASE, name: str = "pw") -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def secret_args(*secrets: Path) -> list[str]:
    out: list[str] = []
    for i, path in enumerate(secrets):
        out += ["--object", f"secret,id=s{i},file={path}"]
    return out


def image_opts(image: Path, fmt: str, secret_id: str = "s0", extra: str = "") -> str:
    key = "key-secret" if fmt == "luks" else "encrypt.key-secret"
    opts = f"driver={fmt},file.filename={image},{key}={secret_id}"
    return opts + ("," + extra if extra else "")


def run(cmd: list[str], retries: int = 1) -> subprocess.CompletedProcess:
    for attempt in range(retries):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode == 0:
            return result
        if "accurate CPU usage" not in result.stderr or attempt == retries - 1:
            break
    raise AssertionError(f"{' '.join(cmd)} failed: {result.stdout} {result.stderr}")


_TEMPLATES: dict[tuple[str, str, str, bytes], Path] = {}
_TEMPLATE_DIR: list[Path] = []


def qemu_create(image: Path, fmt: str, size: str, pw: Path, options: str = "") -> None:
    """qemu-img create of an encrypted image (retried: LUKS creation fails now and then).
    qemu calibrates PBKDF2 for a second or more whatever iter-time says, so each distinct
    image is made once per test session and copied."""
    if "backing_file" in options:  # names a file beside the image: no template
        _qemu_create(image, fmt, size, pw, options)
        return
    key = (fmt, size, options, pw.read_bytes())
    template = _TEMPLATES.get(key)
    if template is None:
        if not _TEMPLATE_DIR:
            _TEMPLATE_DIR.append(Path(tempfile.mkdtemp(prefix="imgfs-crypto-")))
            atexit.register(shutil.rmtree, _TEMPLATE_DIR[0], True)
        template = _TEMPLATE_DIR[0] / f"t{len(_TEMPLATES)}.{fmt}"
        _qemu_create(template, fmt, size, pw, options)
        _TEMPLATES[key] = template
    shutil.copyfile(template, image)


def _qemu_create(image: Path, fmt: str, size: str, pw: Path, options: str) -> None:
    opts = "key-secret=s0" if fmt == "luks" else "encrypt.key-secret=s0"
    if options:
        opts += "," + options
    cmd = ["qemu-img", "create", "-q", "-f", fmt, *secret_args(pw), "-o", opts, str(image), size]
    run(cmd, retries=8)


def qemu_io(image: Path, fmt: str, pw: Path, *commands: str) -> None:
    cmd = ["qemu-io", *secret_args(pw), "--image-opts", image_opts(image, fmt)]
    for c in commands:
        cmd += ["-c", c]
    result = run(cmd)
    assert "error" not in result.stdout.lower() and "failed" not in result.stdout.lower(), result


def qemu_raw(image: Path, fmt: str, pw: Path, out: Path, extra: str = "", *more: Path) -> Path:
    cmd = ["qemu-img", "convert", *secret_args(pw, *more), "--image-opts",
           image_opts(image, fmt, extra=extra), "-O", "raw", str(out)]  # fmt: skip
    run(cmd)
    return out


def qemu_check_clean(image: Path, fmt: str, pw: Path) -> None:
    cmd = ["qemu-img", "check", *secret_args(pw), "--image-opts", image_opts(image, fmt)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 63), f"qemu-img check: {result.stdout} {result.stderr}"


def qemu_compare(image: Path, fmt: str, pw: Path, expected: Path) -> None:
    cmd = ["qemu-img", "compare", *secret_args(pw), "--image-opts", image_opts(image, fmt),
           f"driver=raw,file.filename={expected}"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"qemu-img compare: {result.stdout} {result.stderr}"


def open_keyed(image: Path, pw: Path, read_only: bool = False, fmt: str | None = None) -> Disk:
    return open_disk(str(image), fmt, read_only=read_only, keys=KeyRing.single(str(image), str(pw)))


def read_all(disk: Disk) -> bytes:
    return bytes(disk.read(0, disk.size))
