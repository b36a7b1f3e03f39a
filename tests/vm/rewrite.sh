# rewrite: fill, overwrite in place at odd offsets (fsync'd), delete, refill; the checksums read
# back after dropping caches must equal those taken while the data was still cached.
. /vmkit/workloads/common.inc
do_mkfs
mkdir -p /mnt && mount -t ext4 "$DISK" /mnt || die "mount failed"
i=0
while [ $i -lt 10 ]; do
  dd if=/vmkit/data/blob-4m.bin of=/mnt/b$i bs=1M 2>/dev/null || die "write b$i"
  i=$((i+1))
done
sync
i=0
while [ $i -lt 10 ]; do
  dd if=/vmkit/data/odd-777777.bin of=/mnt/b$i bs=4096 seek=$((i*37+1)) conv=notrunc,fsync 2>/dev/null || die "overwrite b$i"
  dd if=/vmkit/data/hello.txt of=/mnt/b$i bs=1 seek=$((i*1000003)) conv=notrunc 2>/dev/null || die "poke b$i"
  i=$((i+2))
done
rm /mnt/b3 /mnt/b5 /mnt/b7 || die "rm"
sync
i=0
while [ $i -lt 6 ]; do
  cat /vmkit/data/odd-777777.bin /vmkit/data/blob-4m.bin > /mnt/n$i || die "write n$i"
  i=$((i+1))
done
cp -r /vmkit/data/dir /mnt/dir || die "write dir"
sync
( cd /mnt && find . -type f | LC_ALL=C sort | xargs sha256sum ) > /tmp/cached.sha256
drop_caches
( cd /mnt && find . -type f | LC_ALL=C sort | xargs sha256sum ) > /tmp/read.sha256
cp /tmp/read.sha256 /mnt/MANIFEST.sha256
umount /mnt || die "umount failed"
e2fsck -fn "$DISK" > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; die "fsck"; }
echo "VMKIT-INFO $(wc -l < /tmp/read.sha256) files"
cmp -s /tmp/cached.sha256 /tmp/read.sha256 || { diff /tmp/cached.sha256 /tmp/read.sha256; die "read back differs"; }
exit 0
