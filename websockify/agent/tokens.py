"""Where the agent's bearer token comes from: a file read at each connection, or stdin lines.

``TokenFile`` reads its file every time a connection is made, so a token
renewed on disk (by cron, by a secrets manager) is used at the next
reconnect.  ``TokenStdin`` keeps the last line read from standard input: a
parent process feeds fresh tokens, one per line, and each replaces the one
used for the *next* connection; the open tunnel and its streams are not
touched (websocktunnel's wst-client works the same way).
"""

import logging
import os
from typing import Optional

import gevent
from gevent.event import Event
from gevent.fileobject import FileObject

log = logging.getLogger("websockify.agent")


class TokenError(Exception):
    """No token can be had right now (an unreadable or empty file)."""


class TokenFile:
    """The token is the file's text with surrounding whitespace stripped."""

    def __init__(self, path: str):
        self.path = path

    def current(self) -> str:
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read(64 * 1024)
        except OSError as exc:
            raise TokenError("cannot read the token file %s: %s"
                             % (self.path, exc.strerror or exc)) from None
        token = raw.decode("utf-8", "replace").strip()
        if not token:
            raise TokenError("the token file %s is empty" % self.path)
        return token

    def wait(self) -> None:
        """A file needs no waiting."""


class TokenStdin:
    """The last non-empty line read from standard input."""

    def __init__(self, fd: int = 0):
        self._fd = fd
        self._token: Optional[str] = None
        self._first = Event()
        self.updates = 0            # lines taken (for the log and the tests)
        self.closed = False         # stdin reached its end
        self._reader = None

    def start(self) -> None:
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        stream = FileObject(os.dup(self._fd), "rb")
        try:
            for raw in stream:
                token = raw.decode("utf-8", "replace").strip()
                if not token:
                    continue
                replaced = self._token is not None
                self._token = token
                self.updates += 1
                self._first.set()
                if replaced:
                    log.info("new token read from stdin: used from the next connection")
        except OSError as exc:
            log.warning("cannot read tokens from stdin: %s", exc.strerror or exc)
        finally:
            stream.close()
            self.closed = True
            self._first.set()
        if self._token is not None:
            log.info("stdin closed: the last token read is kept")

    def wait(self) -> None:
        """Block until a first token arrives; TokenError if stdin ends first."""
        if self._token is None and not self.closed:
            log.info("waiting for a token on stdin")
            self._first.wait()
        if self._token is None:
            raise TokenError("stdin closed before a token was read")

    def current(self) -> str:
        if self._token is None:
            raise TokenError("no token read from stdin yet")
        return self._token

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.kill(block=False)
