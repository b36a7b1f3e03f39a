"""Device emulation: SCSI (SBC-4/SPC-5), ATA (ACS-4) and virtio-blk (virtio 1.2 §5.2) device
models that decode requests exactly as the standards define them and run them against an image
(through the driver contract) or an exported file; plus the trace format, the replay engine and
trace importers.

Nothing in imgfs.block or imgfs.formats imports this package.
"""
