"""Telling whether files read earlier changed: their stat, and their content while young."""

import hashlib
import os
import time
from typing import Iterable, Optional, Sequence, Tuple

#: A file modified less than this long ago is read again at every look:
#: two writes within one clock tick can leave the same mtime and size.
YOUNG_SECONDS = 2.0

Stamp = Tuple[Tuple[str, int, int, int, int], ...]


def stamp_of(paths: Iterable[str]) -> Stamp:
    """(path, mtime, size, inode, ctime) of each path; OSError if one is gone."""
    stamps = []
    for path in paths:
        st = os.stat(path)
        stamps.append((path, st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns))
    return tuple(stamps)


class FileWatch:
    """What a set of files was when last read: enough to skip reading it again."""

    def __init__(self) -> None:
        self._stamp: Optional[Stamp] = None
        self._digest: Optional[bytes] = None

    def unchanged(self, stamp: Stamp) -> bool:
        """True if the files need not be read: same stat, none of them young."""
        if stamp != self._stamp:
            return False
        young = time.time_ns() - int(YOUNG_SECONDS * 1e9)
        return all(mtime < young and ctime < young for _, mtime, _, _, ctime in stamp)

    def same_content(self, stamp: Stamp, contents: Sequence[Tuple[str, bytes]]) -> bool:
        """Remember this read; True if the files hold what they held at the last one."""
        digest = hashlib.blake2b()
        for path, data in contents:
            for part in (path.encode("utf-8", "surrogateescape"), data):
                digest.update(b"%d:" % len(part))
                digest.update(part)
        value = digest.digest()
        same = value == self._digest
        self._stamp, self._digest = stamp, value
        return same
