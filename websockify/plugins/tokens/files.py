"""Token plugins backed by files: token files, a file per token, a socket directory."""

import logging
import os
import re
import stat
import time
from typing import Dict, List, Optional, Sequence, Tuple

from websockify.addr import UNIX
from websockify.plugins.tokens.base import ResolvingPlugin, SourceError, TokenRefused, need_source
from websockify.plugins.tokens.targets import parse_target, split_target
from websockify.plugins.tokens.watch import FileWatch, Stamp, stamp_of

log = logging.getLogger("websockify")

# 0.13's line rule: the token, then a colon and whitespace, then the target.
_SEPARATOR = re.compile(r":\s")


def _plain_name(token: str) -> str:
    """A token used as a file name: one plain path component, or refused."""
    if (not token or token in (".", "..") or "/" in token or "\\" in token
            or "\0" in token or token.startswith(".")):
        raise TokenRefused("token %r is not a plain file name" % token[:64])
    return token


def _source_path(src) -> Optional[str]:
    """The source as an absolute path; None without one (``check()`` says so)."""
    return os.path.abspath(src) if isinstance(src, str) and src.strip() else None


class ReadOnlyTokenFile(ResolvingPlugin):
    """``token: host:port`` lines in a file or in every file of a directory.

    Read once: at the first lookup, or at start by ``check()`` (and again on
    SIGHUP, which builds a new plugin).  ``lookup()`` gives the target as
    written, split at its last colon (``['10.0.0.1', '5900']``), as 0.13.
    Blank lines and lines starting with ``#`` are skipped, CRLF endings are
    fine, a duplicate token keeps its last target and logs a warning.  In a
    directory, every regular file directly inside is read in name order,
    except hidden files and editor backups (``.*``, ``*~``).  A bad line is
    skipped by ``lookup()`` (0.13 logs and skips it) and stops the start.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path = _source_path(self.source)
        #: token -> target as written; None until read (0.13's attribute).
        self._targets: Optional[Dict[str, List[str]]] = None
        self._problems: List[SourceError] = []
        self._watch = FileWatch()

    def check(self) -> None:
        if self._targets is None:
            self._read_table(quiet=True)
        if self._problems:
            raise self._problems[0]

    def resolve(self, token: str):
        if self._targets is None:
            self._read_table()
        target = self._targets.get(token)
        # A copy: what a caller does with its answer must not change the table.
        return list(target) if target is not None else None

    # -- reading

    def _files(self) -> List[str]:
        if self.path is None:
            raise SourceError("%s needs --token-source" % type(self).__name__)
        if os.path.isdir(self.path):
            names = sorted(name for name in os.listdir(self.path)
                           if not name.startswith(".") and not name.endswith("~"))
            files = [os.path.join(self.path, name) for name in names]
            return [f for f in files if os.path.isfile(f)]
        if not os.path.exists(self.path):
            raise SourceError("token file does not exist", self.path)
        return [self.path]

    def _snapshot(self) -> Tuple[List[str], Stamp]:
        """The files of the source and their stat; SourceError if they cannot be listed."""
        try:
            files = self._files()
            extra = [self.path] if os.path.isdir(self.path) else []
            return files, stamp_of(extra + files)
        except OSError as exc:
            raise SourceError("cannot read token source: %s" % (exc.strerror or exc),
                              self.path) from None

    @staticmethod
    def _contents(files: Sequence[str]) -> List[Tuple[str, bytes]]:
        contents = []
        for path in files:
            try:
                with open(path, "rb") as handle:
                    contents.append((path, handle.read()))
            except OSError as exc:
                raise SourceError("cannot read token file: %s" % (exc.strerror or exc),
                                  path) from None
        return contents

    def _parse(self, contents) -> Tuple[Dict[str, List[str]], List[SourceError]]:
        """The table 0.13 reads from these files, and what is wrong in them."""
        targets: Dict[str, List[str]] = {}
        where: Dict[str, str] = {}
        problems: List[SourceError] = []
        for path, raw in contents:
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                problems.append(SourceError("not UTF-8 text", path,
                                            raw[:exc.start].count(b"\n") + 1))
                continue
            for number, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = _SEPARATOR.split(line)
                if len(parts) != 2:
                    problems.append(SourceError("syntax error: expected 'token: host:port'",
                                                path, number))
                    continue
                token, target = parts[0], parts[1].strip()
                try:
                    parse_target(target)
                except ValueError as exc:
                    # Kept for lookup() as 0.13 keeps it; the start refuses it.
                    problems.append(SourceError("bad target for token %r: %s" % (token, exc),
                                                path, number))
                here = "%s:%d" % (path, number)
                if token in targets:
                    log.warning("token %r at %s also defined at %s; the last one wins",
                                token, here, where[token])
                targets[token] = split_target(target)
                where[token] = here
        return targets, problems

    def _read_table(self, quiet: bool = False) -> None:
        """Read the source and keep its good lines, whatever is wrong beside them."""
        try:
            files, stamp = self._snapshot()
            contents = self._contents(files)
        except SourceError as exc:
            targets, problems = {}, [exc]
        else:
            self._watch.same_content(stamp, contents)
            targets, problems = self._parse(contents)
        self._targets, self._problems = targets, problems
        if not quiet:
            for problem in problems:
                log.error("token source %s", problem)
        if not targets and not problems:
            log.warning("token source %s holds no tokens", self.path)


class TokenFile(ReadOnlyTokenFile):
    """ReadOnlyTokenFile that reads its files again when they change.

    Every lookup stats the files (0.13 read them every time); they are read
    again when their mtime, size or inode changed, or while they are young
    (see ``watch``), and parsed again only if what they hold changed.  A
    file that breaks while the server runs leaves the last good table in
    place, logged once.
    """

    #: Seconds between stats of the files for a known token (an unknown one
    #: always stats them).
    check_interval = 0.0
    _checked = float("-inf")
    _failed: Optional[str] = None

    def resolve(self, token: str):
        if self._targets is None:
            self._read_table()
        else:
            self._refresh(token)
        return super().resolve(token)

    def _refresh(self, token: str) -> None:
        now = time.monotonic()
        if token in self._targets and now - self._checked < self.check_interval:
            return
        self._checked = now
        try:
            files, stamp = self._snapshot()
            if self._watch.unchanged(stamp):
                return
            contents = self._contents(files)
        except SourceError as exc:
            self._report(exc)
            return
        if self._watch.same_content(stamp, contents):
            return
        targets, problems = self._parse(contents)
        if problems:
            self._report(problems[0])
            return
        log.info("token source %s re-read: %d tokens", self.path, len(targets))
        self._targets, self._problems, self._failed = targets, [], None

    def _report(self, problem: SourceError) -> None:
        if self._failed != str(problem):
            self._failed = str(problem)
            log.error("token source %s; keeping the last good table (%d tokens)",
                      problem, len(self._targets))


class TokenFileName(ResolvingPlugin):
    """A directory in which the file named like the token holds ``host:port``.

    ``lookup()`` gives the file's text split at its last colon, as written.
    A token that is not a plain file name is refused (403; None from
    ``lookup()``).  As in 0.13, a source that is not a directory is refused
    when the plugin is built.
    """

    def __init__(self, src):
        super().__init__(src)
        self.path = os.path.abspath(need_source(self, src))
        if not os.path.isdir(self.path):
            raise SourceError("TokenFileName needs a directory", self.path)

    def resolve(self, token: str):
        path = os.path.join(self.path, _plain_name(token))
        try:
            with open(path, "rb") as handle:
                text = handle.read(4096).decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenRefused("cannot read %s: %s" % (path, exc.strerror or exc)) from None
        return split_target(text)


class UnixDomainSocketDirectory(ResolvingPlugin):
    """A directory of Unix sockets; the token names the socket.

    ``lookup()`` gives ``['unix_socket', path]``, or None for a token that
    names no socket directly inside the directory (a symlink out of it, a
    path or a hidden name is refused: 403 from the server).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dir_path = _source_path(self.source)

    def check(self) -> None:
        path = os.path.abspath(need_source(self, self.source))
        if not os.path.isdir(path):
            raise SourceError("UnixDomainSocketDirectory needs a directory", path)

    def resolve(self, token: str):
        name = _plain_name(token)
        if self._dir_path is None or not os.path.isdir(self._dir_path):
            return None
        path = os.path.join(self._dir_path, name)
        real = os.path.realpath(path)
        if os.path.dirname(real) != os.path.realpath(self._dir_path):
            raise TokenRefused("token %r leaves the socket directory" % token[:64])
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return None
        if not stat.S_ISSOCK(mode):
            return None
        return [UNIX, path]
