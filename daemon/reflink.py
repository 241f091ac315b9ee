"""Shared extents (reflinks) between files on filesystems that have them (XFS made with
reflink=1, btrfs): FICLONERANGE makes a file's range share another's blocks, FIDEDUPERANGE does
the same only where the kernel finds both ranges byte-identical.

Files named by a local client are opened only when every local account could read them (each
directory on the path searchable by others, the file readable by others, no symlink followed):
the daemon must not be a way to read, or learn the digest of, a file its caller cannot read
(docs/security.md, "Bundles and imported caches"). Blocking calls: run them in threads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from .errors import ContentDiffers, NoReflink

FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
FIDEDUPERANGE = 0xC0189436  # _IOWR(0x94, 54, struct file_dedupe_range)
_DEDUPE_HEAD = struct.Struct("=QQHHI")  # src_offset, src_length, dest_count, 2 reserved
_DEDUPE_INFO = struct.Struct("=qQQiI")  # dest_fd, dest_offset, bytes_deduped, status, reserved
_DEDUPE_DIFFERS = 1
# what the kernel answers when the filesystem (or the pair of files) cannot share extents
_NOT_SUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                            errno.ENOSYS})


def open_readable_by_all(path: str) -> int:
    """A read-only fd of the regular file at the absolute `path`, if any local account could
    read it; PermissionError naming the first component that others cannot pass."""
    p = Path(path)
    if not p.is_absolute():
        raise PermissionError(errno.EACCES, "not an absolute path", path)
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in p.parts[1:-1]:
            parent, fd = fd, os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                     dir_fd=fd)
            os.close(parent)
            if not os.fstat(fd).st_mode & stat.S_IXOTH:
                raise PermissionError(errno.EACCES, f"directory {part!r} is not searchable by "
                                      "other accounts", path)
        file_fd = os.open(p.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)
    mode = os.fstat(file_fd).st_mode
    if not stat.S_ISREG(mode) or not mode & stat.S_IROTH:
        os.close(file_fd)
        raise PermissionError(errno.EACCES, "not a regular file readable by other accounts",
                              path)
    return file_fd


def clone_range(src_fd: int, src_offset: int, length: int, dst_fd: int,
                dst_offset: int) -> None:
    """dst[dst_offset:+length] shares src[src_offset:+length]'s blocks (length > 0)."""
    try:
        fcntl.ioctl(dst_fd, FICLONERANGE,
                    struct.pack("=qQQQ", src_fd, src_offset, length, dst_offset))
    except OSError as e:
        raise _why(e) from e


def dedupe_range(src_fd: int, src_offset: int, length: int, dst_fd: int,
                 dst_offset: int) -> None:
    """dst[dst_offset:+length] shares src's blocks where the kernel checked them identical;
    ContentDiffers when they are not (dst is left as it was)."""
    done = 0
    while done < length:  # the kernel may take less than asked per call
        arg = bytearray(_DEDUPE_HEAD.pack(src_offset + done, length - done, 1, 0, 0)
                        + _DEDUPE_INFO.pack(dst_fd, dst_offset + done, 0, 0, 0))
        try:
            fcntl.ioctl(src_fd, FIDEDUPERANGE, arg)
        except OSError as e:
            raise _why(e) from e
        _, _, deduped, status, _ = _DEDUPE_INFO.unpack_from(arg, _DEDUPE_HEAD.size)
        if status == _DEDUPE_DIFFERS:
            raise ContentDiffers(f"bytes {dst_offset + done}.. differ from the store's")
        if status < 0:
            raise _why(OSError(-status, os.strerror(-status)))
        if deduped == 0:
            raise NoReflink(errno.EIO, "the kernel shared no bytes")
        done += deduped


def _why(e: OSError) -> OSError:
    if e.errno in _NOT_SUPPORTED:
        return NoReflink(e.errno, f"no reflink: the filesystem cannot share extents between "
                                  f"these files ({os.strerror(e.errno or 0)})")
    if e.errno in (errno.EPERM, errno.EACCES):
        return NoReflink(e.errno, "no reflink: the daemon may not share extents of this file "
                                  "(it can neither write it nor owns it)")
    return e
