"""The FUSE layer: exported files <-> Disks (ops), directory scan (scan), the mount loop (mount)."""
