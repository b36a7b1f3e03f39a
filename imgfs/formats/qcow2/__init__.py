"""qcow2: QEMU's copy-on-write image format (read, write, create, check)."""

from imgfs.block.registry import register
from imgfs.formats.qcow2.driver import Qcow2Driver

register(Qcow2Driver)

__all__ = ["Qcow2Driver"]
