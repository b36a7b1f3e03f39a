"""imgfs: a directory of virtual-disk images, mounted as raw files."""

__version__ = "0.1.0"
