"""Becoming a daemon (python-daemon) and the master's pid file."""

import errno
import logging
import os
from typing import List, Optional

log = logging.getLogger("websockify")


def daemonize(keep_fds: List[int], log_stream, working_directory: str) -> None:
    """Detach from the terminal, keeping the listener and the log open."""
    import daemon  # python-daemon
    context = daemon.DaemonContext(
        working_directory=working_directory,
        umask=0o022,
        files_preserve=keep_fds,
        stdout=log_stream,
        stderr=log_stream,
        signal_map={},          # the master installs its own handlers
        detach_process=True,
    )
    context.open()


class PidFile:
    """--pid-file: written atomically after daemonizing, removed at the end."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.written = False

    def write(self) -> None:
        if not self.path:
            return
        tmp = "%s.%d.tmp" % (self.path, os.getpid())
        with open(tmp, "w") as handle:
            handle.write("%d\n" % os.getpid())
        os.replace(tmp, self.path)
        self.written = True

    def remove(self) -> None:
        if not self.written:
            return
        try:
            os.unlink(self.path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot remove pid file: %s", exc.strerror)
