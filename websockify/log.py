"""Logging setup: stderr or a log file (reopened on SIGUSR1), -v, --traffic."""

import logging
import os
import sys
from typing import Callable, Optional

LOGGER_NAME = "websockify"
FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(message)s"


class ReopenableFileHandler(logging.StreamHandler):
    """A file handler that can reopen its file after logrotate moved it."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(self._open())

    def _open(self):
        return open(self.path, "a", encoding="utf-8", buffering=1)

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.stream
            self.stream = self._open()
            old.close()
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream and not self.stream.closed:
                self.stream.close()
        finally:
            self.release()
        super().close()


def setup_logging(verbose: bool, log_file: Optional[str]) -> logging.Logger:
    """Configure the ``websockify`` logger once, in the master before forking."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = []
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    formatter = logging.Formatter(FORMAT)
    handler: logging.Handler
    if log_file:
        handler = ReopenableFileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    return logger


def reopen_log_files() -> None:
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()


def log_streams() -> list:
    """Open files the logger writes to (kept open across daemonizing)."""
    streams = []
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            streams.append(stream)
    return streams


TRAFFIC_LEGEND = """
Traffic Legend:
    }  - Client receive
    {  - Target receive

    >  - Target send
    >. - Target send partial
    <  - Client send
    <. - Client send partial
"""


def traffic_printer() -> Callable[[str], None]:
    """--traffic: legend characters on stdout as data moves, like websockify."""
    fd = sys.stdout.fileno()

    def emit(char: str) -> None:
        try:
            os.write(fd, char.encode())
        except OSError:
            pass
    return emit
