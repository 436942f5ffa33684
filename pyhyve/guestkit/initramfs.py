"""The guest's initramfs: busybox, an /init, and a shell on the serial console.

Both kernels of the kit (Debian's cloud kernel, or the one built from
linux-source) boot the same userspace.  /init mounts the pseudo file systems,
loads the kernel modules the archive carries (the cloud kernel has its virtio
drivers as modules), and then either runs /test.sh, which a test appends as a
second archive, and powers off, or hands over to busybox init, whose
/etc/rc brings up the network with DHCP and mounts the disk, and whose
inittab keeps a shell on ttyS0 for as long as the VM runs; `poweroff` there
stops the VM.  The archive is an uncompressed newc cpio: decompressing it
would cost seconds on hosts that emulate guest code.
"""

import stat
import subprocess
from pathlib import Path

READY = "pyhyve guest ready"

INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
if [ -f /modules.order ]; then
  for module in $(cat /modules.order); do insmod /modules/$module.ko; done
fi
echo LINUX-USERSPACE-OK
if [ -x /test.sh ]; then
  /test.sh
  echo "LINUX-TEST-EXIT $?"
  poweroff -f
fi
exec /bin/init
"""

# busybox init: /etc/rc once, then a login shell on the console, again if it exits
INITTAB = """::sysinit:/etc/rc
ttyS0::respawn:-/bin/sh
::shutdown:/bin/umount -a -r
"""

RC = """#!/bin/sh
hostname pyhyve
ip link set lo up
address="no network device"
if [ -e /sys/class/net/eth0 ]; then
  if udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 4 -T 2 >/dev/null 2>&1; then
    address="eth0 $(ip -4 -o addr show eth0 | sed 's/.* inet \\([^ ]*\\).*/\\1/')"
    address="$address, gateway $(ip route | sed -n 's/^default via \\([^ ]*\\).*/\\1/p')"
  else
    address="eth0 got no DHCP lease"
  fi
fi
disk="no disk"
if [ -b /dev/vda ]; then
  # a blank disk (the kit's own) is formatted; any other is mounted if it is ext2
  if [ -z "$(dd if=/dev/vda bs=4096 count=2 2>/dev/null | tr -d '\\000' | head -c 1)" ]; then
    mke2fs -q /dev/vda
  fi
  if mount -t ext2 /dev/vda /mnt 2>/dev/null; then
    disk="/dev/vda on /mnt"
  else
    disk="/dev/vda (not ext2, not mounted)"
  fi
fi
cat <<EOF

%s: Linux $(uname -r), busybox sh on ttyS0
  network: $address
  disk:    $disk
  leave with: poweroff

EOF
""" % READY

# udhcpc calls this with the lease in its environment ($ip, $mask, $router, $dns)
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for gateway in $router; do ip route replace default via "$gateway"; break; done
    : > /etc/resolv.conf
    for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done ;;
esac
"""

PROFILE = """export PATH=/bin
export PS1='\\u@\\h:\\w\\$ '
"""

DIRECTORY, FILE, EXECUTABLE = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
SYMLINK = stat.S_IFLNK | 0o777


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries, what Linux unpacks as an
    initramfs; a symlink's data is its target.  Archives can be concatenated."""
    out = bytearray()
    for inode, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        fields = (inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
        out += bytes(-len(out) % 4) + data
        out += bytes(-len(out) % 4)
    return bytes(out)


def busybox_applets(busybox: Path) -> list[str]:
    """The applets a busybox binary offers (it runs on the host: both are x86-64)."""
    listed = subprocess.run([str(busybox), "--list"], capture_output=True, text=True)
    if listed.returncode:
        raise OSError(f"{busybox} --list failed: {listed.stderr.strip()}")
    return [name for name in listed.stdout.split() if name and "/" not in name]


def build(busybox: Path, modules: dict[str, bytes] | None = None) -> bytes:
    """The initramfs: busybox with a link per applet, the scripts above, and
    `modules` (name -> .ko contents, in load order) for /init to insmod."""
    entries = [(name, DIRECTORY, b"") for name in
               ("bin", "dev", "etc", "mnt", "proc", "root", "sys", "tmp")]
    entries.append(("bin/busybox", EXECUTABLE, busybox.read_bytes()))
    entries += [(f"bin/{applet}", SYMLINK, b"busybox")
                for applet in busybox_applets(busybox) if applet != "busybox"]
    entries += [("init", EXECUTABLE, INIT.encode()),
                ("etc/inittab", FILE, INITTAB.encode()),
                ("etc/rc", EXECUTABLE, RC.encode()),
                ("etc/udhcpc.script", EXECUTABLE, UDHCPC_SCRIPT.encode()),
                ("etc/profile", FILE, PROFILE.encode()),
                ("etc/passwd", FILE, b"root:x:0:0:root:/root:/bin/sh\n"),
                ("etc/group", FILE, b"root:x:0:\n")]
    if modules:
        entries.append(("modules", DIRECTORY, b""))
        entries.append(("modules.order", FILE, "\n".join(modules).encode() + b"\n"))
        entries += [(f"modules/{name}.ko", FILE, data) for name, data in modules.items()]
    return newc_archive(entries)
