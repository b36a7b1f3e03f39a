"""The block layer: driver contract, registry, host files, backing chains and the Disk."""

from imgfs.block.disk import Disk, open_disk
from imgfs.block.hostfile import CacheMode

__all__ = ["CacheMode", "Disk", "open_disk"]
