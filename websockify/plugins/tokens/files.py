"""Token plugins backed by files: token files, a file per token, a socket directory."""

import logging
import os
import re
import stat
import time
from typing import Dict, List, Tuple

from websockify.plugins.tokens.base import (BadTarget, BasePlugin, SourceError, TokenRefused,
                                            need_source)
from websockify.addr import UNIX
from websockify.plugins.tokens.targets import parse_target

log = logging.getLogger("websockify")


def _safe_name(token: str) -> str:
    """A token used as a file name: one plain path component, or refused."""
    if (not token or token in (".", "..") or "/" in token or "\\" in token
            or "\0" in token or token.startswith(".")):
        raise TokenRefused("token %r is not a plain file name" % token[:64])
    return token


_LINE = re.compile(r"^(\S+?):\s+(\S.*)$")


def _signature(path: str):
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


class ReadOnlyTokenFile(BasePlugin):
    """``token: host:port`` lines in a file or in every file of a directory.

    Parsed when the plugin is built (so at start, and again on SIGHUP);
    blank lines and lines starting with ``#`` are skipped, CRLF endings are
    fine, a duplicate token keeps its last target and logs a warning.  In a
    directory, every regular file directly inside is read in name order,
    except hidden files and editor backups (``.*``, ``*~``).
    """

    def __init__(self, src):
        super().__init__(src)
        self.path = os.path.abspath(need_source(self, src))
        self._targets: Dict[str, Tuple[str, object]] = {}
        self._signatures = None
        self._load(initial=True)

    # -- reading

    def _files(self) -> List[str]:
        if os.path.isdir(self.path):
            names = sorted(name for name in os.listdir(self.path)
                           if not name.startswith(".") and not name.endswith("~"))
            files = [os.path.join(self.path, name) for name in names]
            return [f for f in files if os.path.isfile(f)]
        if not os.path.exists(self.path):
            raise SourceError("token file does not exist", self.path)
        return [self.path]

    def _current_signatures(self):
        files = self._files()
        sigs = [(self.path, _signature(self.path))] if os.path.isdir(self.path) else []
        return tuple(sigs + [(f, _signature(f)) for f in files]), files

    def _parse(self, files) -> Dict[str, Tuple[str, object]]:
        targets: Dict[str, Tuple[str, object]] = {}
        where: Dict[str, str] = {}
        for path in files:
            try:
                with open(path, "rb") as handle:
                    raw = handle.read()
            except OSError as exc:
                raise SourceError("cannot read token file: %s" % (exc.strerror or exc), path) from None
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                line = raw[:exc.start].count(b"\n") + 1
                raise SourceError("not UTF-8 text", path, line) from None
            for number, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                match = _LINE.match(line)
                if not match:
                    raise SourceError("syntax error: expected 'token: host:port'", path, number)
                token, target = match.group(1), match.group(2).strip()
                try:
                    pair = parse_target(target)
                except ValueError as exc:
                    raise SourceError("bad target for token %r: %s" % (token, exc),
                                      path, number) from None
                here = "%s:%d" % (path, number)
                if token in targets:
                    log.warning("token %r at %s also defined at %s; the last one wins",
                                token, here, where[token])
                targets[token] = pair
                where[token] = here
        return targets

    def _load(self, initial: bool = False) -> None:
        sigs = None
        try:
            sigs, files = self._current_signatures()
            if not initial and sigs == self._signatures:
                return
            targets = self._parse(files)
        except (SourceError, OSError) as exc:
            if initial:
                if isinstance(exc, OSError):
                    raise SourceError("cannot read token source: %s"
                                      % (exc.strerror or exc), self.path) from None
                raise
            key = sigs or str(exc)
            if getattr(self, "_failed", None) != key:
                self._failed = key
                log.error("token source %s; keeping the last good table (%d tokens)",
                          exc, len(self._targets))
            return
        if not targets and initial:
            log.warning("token source %s holds no tokens", self.path)
        if not initial:
            log.info("token source %s re-read: %d tokens", self.path, len(targets))
        self._failed = None
        self._targets = targets
        self._signatures = sigs

    def lookup(self, token):
        return self._targets.get(token)


class TokenFile(ReadOnlyTokenFile):
    """ReadOnlyTokenFile that re-reads its files when they change.

    A file's (or the directory's) change is noticed by its mtime, size and
    inode, checked at most once a second, and at once for an unknown token;
    the files are not re-parsed on every lookup.  A file that breaks while
    the server runs leaves the last good table in place, logged once.
    """

    check_interval = 1.0

    def __init__(self, src):
        super().__init__(src)
        self._checked = time.monotonic()

    def lookup(self, token):
        now = time.monotonic()
        if token not in self._targets or now - self._checked >= self.check_interval:
            self._checked = now
            self._load()
        return self._targets.get(token)


class TokenFileName(BasePlugin):
    """A directory in which the file named like the token holds ``host:port``."""

    def __init__(self, src):
        super().__init__(src)
        self.path = os.path.abspath(need_source(self, src))
        if not os.path.isdir(self.path):
            raise SourceError("TokenFileName needs a directory", self.path)

    def lookup(self, token):
        path = os.path.join(self.path, _safe_name(token))
        try:
            with open(path, "rb") as handle:
                text = handle.read(4096).decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenRefused("cannot read %s: %s" % (path, exc.strerror or exc)) from None
        try:
            return parse_target(text)
        except ValueError as exc:
            raise BadTarget("%s: %s" % (path, exc)) from None


class UnixDomainSocketDirectory(BasePlugin):
    """A directory of Unix sockets; the token names the socket."""

    def __init__(self, src):
        super().__init__(src)
        self._dir_path = os.path.realpath(need_source(self, src))
        if not os.path.isdir(self._dir_path):
            raise SourceError("UnixDomainSocketDirectory needs a directory", self._dir_path)

    def lookup(self, token):
        path = os.path.realpath(os.path.join(self._dir_path, _safe_name(token)))
        if os.path.dirname(path) != self._dir_path:
            raise TokenRefused("token %r leaves the socket directory" % token[:64])
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return None
        if not stat.S_ISSOCK(mode):
            return None
        return (UNIX, path)
