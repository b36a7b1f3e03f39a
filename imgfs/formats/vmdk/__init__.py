"""The vmdk format driver (VMware virtual disks); see driver.py."""

from imgfs.formats.vmdk.driver import VmdkDriver

__all__ = ["VmdkDriver"]
