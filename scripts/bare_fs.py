"""The thinnest correct pyfuse3 file system: the baseline that scripts/bench.py compares with.

The root holds `value` (a constant to read), `limit` (accepts any write) and whatever
directories mkdir makes; directories may hold directories.  Files are opened with direct I/O,
as encidfs opens its cgroup files, so every read and write reaches the daemon.

    python scripts/bare_fs.py MOUNTPOINT [--timeout SECONDS]   # blocks until unmounted
"""

import argparse
import errno
import os
import stat

import pyfuse3
import trio

VALUE = b"0\n"
VALUE_INODE = pyfuse3.ROOT_INODE + 1
LIMIT_INODE = pyfuse3.ROOT_INODE + 2


class BareFs(pyfuse3.Operations):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout
        # Directory inode -> {name: inode}; inode numbers are never reused, so forget is a no-op.
        self.dirs: dict[int, dict[bytes, int]] = {
            pyfuse3.ROOT_INODE: {b"value": VALUE_INODE, b"limit": LIMIT_INODE},
        }
        self.next_inode = LIMIT_INODE + 1

    def attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode in self.dirs:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        elif inode in (VALUE_INODE, LIMIT_INODE):
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_nlink = 1
            attr.st_size = len(VALUE) if inode == VALUE_INODE else 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)  # a removed directory
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.entry_timeout = self.timeout
        attr.attr_timeout = self.timeout
        return attr

    async def lookup(self, parent_inode, name, ctx):
        inode = self.dirs[parent_inode].get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(inode)

    async def getattr(self, inode, ctx):
        return self.attrs(inode)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        # Entries go in inode order and resume after the last inode sent: inodes only grow,
        # so a mkdir or rmdir during a listing neither skips nor repeats an entry.
        entries = sorted((inode, name) for name, inode in self.dirs[fh].items() if inode > start_id)
        for inode, name in entries:
            if not pyfuse3.readdir_reply(token, name, self.attrs(inode), inode):
                return

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        return VALUE[off:off + size]

    async def write(self, fh, off, buf):
        return len(buf)

    async def release(self, fh):
        pass

    async def mkdir(self, parent_inode, name, mode, ctx):
        entries = self.dirs[parent_inode]
        if name in entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        inode = entries[name] = self.next_inode
        self.next_inode += 1
        self.dirs[inode] = {}
        return self.attrs(inode)

    async def rmdir(self, parent_inode, name, ctx):
        inode = self.dirs[parent_inode].get(name)
        if inode not in self.dirs:
            raise pyfuse3.FUSEError(errno.ENOTDIR if inode else errno.ENOENT)
        if self.dirs[inode]:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del self.dirs[parent_inode][name]
        del self.dirs[inode]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="entry and attribute timeout in seconds (default 0)")
    args = parser.parse_args()
    options = set(pyfuse3.default_options)
    options.add("fsname=bare")
    pyfuse3.init(BareFs(args.timeout), args.mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=False)  # fusermount3 -u already took the mount away


if __name__ == "__main__":
    main()
