"""TokenRedis: tokens in Redis, and parse_source_args for its ``a:b:c`` source."""

import importlib.util
import json
import logging
import os
import re
from typing import List, Optional

from websockify.addr import format_host_port, parse_host, parse_port
from websockify.plugins.tokens.base import (BackendUnavailable, BadTarget, ResolvingPlugin,
                                            SourceError, need_source)
from websockify.plugins.tokens.targets import split_target

log = logging.getLogger("websockify")


def parse_source_args(src: str) -> List[str]:
    """``a:b:c`` -> ['a', 'b', 'c']; a field in double quotes may hold colons.

    The answers are 0.13's for every input, odd ones included.  A quoted
    field is a ``"``, at least one other character and the next ``"``, at
    the start of a field and followed by a colon or the end of the text (a
    final newline after it is dropped, as 0.13's ``$`` does).  Anything
    else is plain text up to the next colon: ``'"'`` is ``['"']``,
    ``'"a"b'`` is ``['"a"b']``.
    """
    fields: List[str] = []
    n = len(src)
    start = 0
    while True:
        if src.startswith('"', start):
            close = src.find('"', start + 1)
            if close > start + 1:
                if close + 1 == n or src[close + 1:] == "\n":
                    fields.append(src[start + 1:close])
                    return fields
                if src.startswith(":", close + 1):
                    fields.append(src[start + 1:close])
                    start = close + 2
                    continue
        colon = src.find(":", start)
        if colon < 0:
            fields.append(src[start:])
            return fields
        fields.append(src[start:colon])
        start = colon + 1


class TokenRedis(ResolvingPlugin):
    """Tokens in Redis: key ``[namespace:]token``, value ``host:port`` or JSON.

    The source is ``host[:port[:db[:password[:namespace]]]]``; empty fields
    take 6379 and 0; a field in double quotes may hold colons.  JSON values
    are ``{"host": "h:p"}`` or ``{"host": "h", "port": p}``.  ``lookup()``
    gives ``[host, port]`` as the value holds them, None for a value that
    is neither (the server: 502), and lets redis-py's error through when
    Redis cannot be reached (the server: 503).  Each worker keeps one
    connection pool.  Needs redis-py (``pip install websockify[redis]``).
    """

    socket_timeout = 2.0

    def __init__(self, src):
        super().__init__(src)
        self._server, self._port, self._db = None, 6379, 0
        self._password, self._namespace = None, ""
        self._problem: Optional[SourceError] = None
        self._pool = None
        self._pool_pid = None
        try:
            fields = parse_source_args(need_source(self, src))
            if len(fields) > 5 or not fields[0]:
                raise ValueError("expected host[:port[:db[:password[:namespace]]]]")
            fields += [""] * (5 - len(fields))
            self._server = parse_host(fields[0])
            self._port = parse_port(fields[1]) if fields[1] else 6379
            self._db = int(fields[2]) if fields[2] else 0
            self._password = fields[3] or None
            self._namespace = fields[4] + ":" if fields[4] else ""
        except SourceError as exc:
            self._problem = exc
            return
        except ValueError as exc:
            self._problem = SourceError("TokenRedis source %r: %s" % (src, exc))
            return
        log.info("TokenRedis: tokens from redis %s db %d%s",
                 format_host_port(self._server, self._port), self._db,
                 " namespace %s" % self._namespace[:-1] if self._namespace else "")

    def check(self) -> None:
        if self._problem is not None:
            raise self._problem
        # Only look for the package: the master checks plugins before it
        # forks, and importing redis (which imports ssl) there would come
        # before the workers' gevent patching.
        if importlib.util.find_spec("redis") is None:
            raise SourceError("TokenRedis needs the redis package "
                              "(pip install 'websockify[redis]')")

    def _client(self):
        import redis
        if self._pool is None or self._pool_pid != os.getpid():
            # One pool per process: a pool must not cross a fork.
            self._pool = redis.ConnectionPool(
                host=self._server, port=self._port, db=self._db, password=self._password,
                socket_timeout=self.socket_timeout, socket_connect_timeout=self.socket_timeout,
                max_connections=64)
            self._pool_pid = os.getpid()
        return redis.Redis(connection_pool=self._pool)

    def resolve(self, token: str):
        if self._problem is not None:
            raise BackendUnavailable(str(self._problem))
        try:
            import redis
        except ImportError:
            raise BackendUnavailable("TokenRedis needs the redis package") from None
        try:
            value = self._client().get(self._namespace + token)
        except redis.exceptions.RedisError as exc:
            raise BackendUnavailable("redis %s: %s" % (format_host_port(self._server, self._port),
                                                       str(exc) or type(exc).__name__),
                                     exc) from None
        if value is None:
            return None
        text = value.decode("utf-8", "replace").strip()
        target = _json_target(text) if text.startswith("{") else _text_target(text)
        if target is None:
            raise BadTarget("redis value for token %r is neither JSON nor host:port: %r"
                            % (token[:64], text[:80]))
        return target


def _json_target(text: str) -> Optional[list]:
    """``{"host": "h:p"}`` (0.13) or ``{"host": h, "port": p}`` -> [host, port]; None if neither."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or "host" not in data:
        return None
    if "port" in data:
        return [data["host"], data["port"]]
    if not isinstance(data["host"], str):
        return None
    parts = split_target(data["host"])
    return parts if len(parts) == 2 else None


def _text_target(text: str) -> Optional[list]:
    """``host:port`` -> [host, port] as text; None without a colon between two words."""
    if not _HOST_PORT.match(text):
        return None
    parts = split_target(text)
    return parts if len(parts) == 2 else None


# 0.13's test for a plain value: a word, a colon, a word.
_HOST_PORT = re.compile(r"\S+:\S+")
