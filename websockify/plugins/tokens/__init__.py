"""Token plugins: a token from the request -> the session's target.

The contract is websockify 0.13's: a plugin class is built once with the
``--token-source`` string (``cls(src)``) and its ``lookup(token)`` returns
``(host, port)`` (a tuple or a list, the port an int or a string),
``('unix_socket', path)``, or None for an unknown token, or raises.

The plugins are built in the master before any worker is forked, so a
source that does not exist or cannot be parsed stops the server at start
(``SourceError``: one line naming the file and line).  Workers inherit the
built plugin; anything that must not be shared between processes (a Redis
connection pool) is created lazily per process.

Refusals are ``HTTPError``s, answered before any upgrade: an unknown token
is 404, a refused token (expired, altered, outside the allow-list, a path
escape) 403, a backend that is down 503, a store entry that is not a target
502.  ``TokenResolver`` maps anything else a plugin raises to 403.
"""

import base64
import binascii
import hashlib
import hmac
import importlib.util
import ipaddress
import json
import logging
import os
import re
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, List, Optional, Tuple

from websockify.errors import ConfigError, HTTPError

log = logging.getLogger("websockify")

UNIX = "unix_socket"


# -- errors -------------------------------------------------------------------

class SourceError(ConfigError):
    """A token source that cannot be used: ``file:line: message``."""

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None):
        where = path or ""
        if path and line:
            where = "%s:%d" % (path, line)
        super().__init__("%s: %s" % (where, message) if where else message)
        self.path = path
        self.line = line
        self.message = message


class TokenError(HTTPError):
    """A refused token, answered with ``status`` before any upgrade."""

    status_code = 403
    reason_phrase = "Forbidden"

    def __init__(self, text: str):
        super().__init__(self.status_code, self.reason_phrase, text)


class TokenNotFound(TokenError):
    status_code = 404
    reason_phrase = "Not Found"


class TokenRefused(TokenError):
    status_code = 403
    reason_phrase = "Forbidden"


class MissingToken(TokenError):
    status_code = 400
    reason_phrase = "Bad Request"


class BadTarget(TokenError):
    """The token store holds something that is not a target."""
    status_code = 502
    reason_phrase = "Bad Gateway"


class BackendUnavailable(TokenError):
    """The token store (Redis, an HTTP API) cannot be asked right now."""
    status_code = 503
    reason_phrase = "Service Unavailable"


class PluginFailed(TokenError):
    """The plugin itself broke (any exception, SystemExit included): 500.

    The client hears only that; the log line names the plugin and the error.
    """
    status_code = 500
    reason_phrase = "Internal Server Error"

    def __init__(self, log_text: str):
        super().__init__("token plugin failed")
        self.log_text = log_text


# -- targets ------------------------------------------------------------------

def _port(text, what="port") -> int:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if isinstance(text, bool):
        raise ValueError("bad %s %r" % (what, text))
    if isinstance(text, int):
        number = text
    else:
        text = str(text).strip()
        if not text.isdigit() or not text.isascii():
            raise ValueError("bad %s %r" % (what, text))
        number = int(text)
    if not 1 <= number <= 65535:
        raise ValueError("%s %d out of range" % (what, number))
    return number


def _host(text) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    host = str(text).strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError("bad host %r" % (text,))
    return host


def parse_target(text: str) -> Tuple[str, object]:
    """``host:port``, ``[v6]:port``, ``v6:port`` or ``unix_socket:/path`` -> a pair.

    The port is the part after the last colon, so ``::1:5900`` is ``::1``
    port 5900 (websockify 0.13's rule); brackets are the unambiguous form.
    """
    text = text.strip()
    if text.startswith(UNIX + ":"):
        path = text[len(UNIX) + 1:].strip()
        if not path:
            raise ValueError("unix_socket: needs a path")
        return UNIX, path
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError("target %r is not host:port" % text)
    return _host(host), _port(port)


def target_from_result(result) -> Tuple[str, object]:
    """A plugin's lookup result -> ``(host, int port)`` or ``('unix_socket', path)``."""
    if isinstance(result, (str, bytes)):
        text = result.decode("utf-8") if isinstance(result, bytes) else result
        return parse_target(text)
    if isinstance(result, dict):
        if "port" in result:
            return _host(result["host"]), _port(result["port"])
        return parse_target(str(result.get("host", "")))
    try:
        items = list(result)
    except TypeError:
        raise ValueError("lookup returned %s, not (host, port)" % type(result).__name__) from None
    if len(items) != 2:
        raise ValueError("lookup returned %d items, not (host, port)" % len(items))
    host, port = items
    if isinstance(host, bytes):
        host = host.decode("utf-8", "replace")
    if host == UNIX:
        if isinstance(port, bytes):
            port = port.decode("utf-8", "replace")
        if not port or not isinstance(port, str):
            raise ValueError("unix_socket target without a path")
        return UNIX, port
    return _host(host), _port(port)


# -- the base class -------------------------------------------------------------

class BasePlugin:
    """websockify 0.13's base class: ``__init__(src)``, ``lookup(token)``."""

    def __init__(self, src):
        self.source = src

    def lookup(self, token):
        return None


def _need_source(plugin, src) -> str:
    if src is None or not str(src).strip():
        raise SourceError("%s needs --token-source" % type(plugin).__name__)
    return str(src)


def _safe_name(token: str) -> str:
    """A token used as a file name: one plain path component, or refused."""
    if (not token or token in (".", "..") or "/" in token or "\\" in token
            or "\0" in token or token.startswith(".")):
        raise TokenRefused("token %r is not a plain file name" % token[:64])
    return token


# -- token files ----------------------------------------------------------------

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
        self.path = os.path.abspath(_need_source(self, src))
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
        self.path = os.path.abspath(_need_source(self, src))
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
        self._dir_path = os.path.realpath(_need_source(self, src))
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


# -- HTTP APIs ------------------------------------------------------------------

class APIResponse:
    """The part of a ``requests`` response that 0.13-era ``process_result`` reads."""

    def __init__(self, status_code: int, content: bytes, headers):
        self.status_code = status_code
        self.content = content
        self.headers = headers

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content.decode("utf-8"))


class BaseTokenAPI(BasePlugin):
    """GET the source URL with the token in place of its ``%s``; the body is ``host:port``.

    The token is URL-escaped; the request has a timeout.  2xx: the target;
    404 (or another 4xx): unknown token; 5xx, a timeout or a refused
    connection: 503.
    """

    timeout = 5.0
    max_body = 64 * 1024

    def __init__(self, src):
        super().__init__(src)
        url = _need_source(self, src)
        if url.count("%s") != 1:
            raise SourceError("%s source %r must contain %%s once, where the token goes"
                              % (type(self).__name__, url))
        scheme = urllib.parse.urlsplit(url.replace("%s", "x")).scheme
        if scheme not in ("http", "https"):
            raise SourceError("%s source %r is not an http(s) URL" % (type(self).__name__, url))

    def process_result(self, resp):
        return parse_target(resp.text)

    def lookup(self, token):
        url = self.source.replace("%s", urllib.parse.quote(token, safe=""))
        request = urllib.request.Request(url, headers={"Accept": "application/json, text/plain"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                resp = APIResponse(reply.status, reply.read(self.max_body), reply.headers)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise BackendUnavailable("token API answered %d" % exc.code) from None
            return None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BackendUnavailable("token API unreachable: %s" % (reason,)) from None
        if not resp.ok:
            return None
        try:
            return self.process_result(resp)
        except (ValueError, KeyError, TypeError) as exc:
            raise BadTarget("token API answer is not a target: %s" % exc) from None


class JSONTokenApi(BaseTokenAPI):
    """BaseTokenAPI whose answer is ``{"host": ..., "port": ...}``."""

    def process_result(self, resp):
        data = resp.json()
        return _host(data["host"]), _port(data["port"])


# -- JWT ------------------------------------------------------------------------

_JWS_ALGS = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384",
             "PS512", "ES256", "ES384", "ES512", "EdDSA"]
_JWE_ALGS = ["RSA-OAEP", "RSA-OAEP-256", "A128KW", "A192KW", "A256KW", "dir",
             "ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW",
             "A128GCMKW", "A192GCMKW", "A256GCMKW",
             "A128CBC-HS256", "A192CBC-HS384", "A256CBC-HS512", "A128GCM", "A192GCM", "A256GCM"]


def _jose_header(token: str) -> dict:
    head = token.split(".", 1)[0]
    try:
        return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        raise TokenRefused("token is not a JWT") from None


class JWTTokenApi(BasePlugin):
    """Signed (JWS) or encrypted (JWE, holding a signed JWT) tokens with ``host``, ``port``.

    The source is a key file: a PEM key (RSA or EC, private or public), or
    else its raw bytes as a shared secret, the format of websockify 0.13.
    ``nbf`` and ``exp`` are checked; ``alg: none`` is refused.  Needs
    jwcrypto (``pip install websockify[jwt]``).
    """

    def __init__(self, src):
        super().__init__(src)
        path = os.path.abspath(_need_source(self, src))
        try:
            from jwcrypto import jwk
        except ImportError:
            raise SourceError("JWTTokenApi needs the jwcrypto package "
                              "(pip install 'websockify[jwt]')") from None
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise SourceError("cannot read key file: %s" % (exc.strerror or exc), path) from None
        if not data:
            raise SourceError("key file is empty", path)
        try:
            self._key = jwk.JWK.from_pem(data)
        except Exception:
            if data.lstrip().startswith(b"-----BEGIN"):
                raise SourceError("cannot parse the PEM key", path) from None
            self._key = jwk.JWK(kty="oct", k=base64.urlsafe_b64encode(data).rstrip(b"=").decode())

    def _open(self, token: str, algs):
        from jwcrypto import jwt
        try:
            return jwt.JWT(key=self._key, jwt=token, algs=algs, check_claims=False)
        except Exception as exc:
            raise TokenRefused("JWT rejected: %s" % (str(exc) or type(exc).__name__)) from None

    def lookup(self, token):
        header = _jose_header(token)
        if str(header.get("alg", "none")).lower() == "none":
            raise TokenRefused("JWT with alg none")
        if "enc" in header:
            outer = self._open(token, _JWE_ALGS)
            token = outer.claims
            inner = _jose_header(token)
            if "enc" in inner or str(inner.get("alg", "none")).lower() == "none":
                raise TokenRefused("encrypted JWT must hold a signed JWT")
        parsed = self._open(token, _JWS_ALGS)
        try:
            claims = json.loads(parsed.claims)
        except ValueError:
            raise TokenRefused("JWT claims are not JSON") from None
        if not isinstance(claims, dict):
            raise TokenRefused("JWT claims are not an object")
        now = time.time()
        if "nbf" in claims and not now >= _number(claims["nbf"]):
            raise TokenRefused("JWT not valid yet (nbf)")
        if "exp" in claims and not now < _number(claims["exp"]):
            raise TokenRefused("JWT expired")
        if "host" not in claims or "port" not in claims:
            raise TokenRefused("JWT lacks the host and port claims")
        try:
            return _host(claims["host"]), _port(claims["port"])
        except ValueError as exc:
            raise TokenRefused("JWT target: %s" % exc) from None


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenRefused("JWT time claim %r is not a number" % (value,))
    return float(value)


# -- Redis ------------------------------------------------------------------------

def parse_source_args(src: str) -> List[str]:
    """``a:b:c`` -> ['a', 'b', 'c']; a field in double quotes may hold colons."""
    fields: List[str] = []
    i, n = 0, len(src)
    while True:
        if i < n and src[i] == '"':
            end = src.find('"', i + 1)
            if end < 0 or (end + 1 < n and src[end + 1] != ":"):
                raise ValueError("unbalanced quotes in %r" % src)
            fields.append(src[i + 1:end])
            i = end + 1
        else:
            end = src.find(":", i)
            end = n if end < 0 else end
            fields.append(src[i:end])
            i = end
        if i >= n:
            return fields
        i += 1  # the colon
        if i == n:
            fields.append("")
            return fields


class TokenRedis(BasePlugin):
    """Tokens in Redis: key ``[namespace:]token``, value ``host:port`` or JSON.

    The source is ``host[:port[:db[:password[:namespace]]]]``; empty fields
    take 6379 and 0; a field in double quotes may hold colons.  JSON values
    are ``{"host": "h:p"}`` or ``{"host": "h", "port": p}``.  Each worker
    keeps one connection pool; a Redis that cannot be reached gives 503.
    Needs redis-py (``pip install websockify[redis]``).
    """

    socket_timeout = 2.0

    def __init__(self, src):
        super().__init__(src)
        text = _need_source(self, src)
        # Only look for the package here: the master builds plugins before it
        # forks, and importing redis (which imports ssl) there would come
        # before the workers' gevent patching.
        if importlib.util.find_spec("redis") is None:
            raise SourceError("TokenRedis needs the redis package "
                              "(pip install 'websockify[redis]')")
        try:
            fields = parse_source_args(text)
            if len(fields) > 5 or not fields[0]:
                raise ValueError("expected host[:port[:db[:password[:namespace]]]]")
            fields += [""] * (5 - len(fields))
            self._server = fields[0]
            self._port = int(fields[1]) if fields[1] else 6379
            self._db = int(fields[2]) if fields[2] else 0
            self._password = fields[3] or None
            self._namespace = fields[4] + ":" if fields[4] else ""
        except ValueError as exc:
            raise SourceError("TokenRedis source %r: %s" % (text, exc)) from None
        self._pool = None
        self._pool_pid = None
        log.info("TokenRedis: tokens from redis %s:%d db %d%s", self._server, self._port,
                 self._db, " namespace %s" % self._namespace[:-1] if self._namespace else "")

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

    def lookup(self, token):
        import redis
        try:
            value = self._client().get(self._namespace + token)
        except redis.exceptions.RedisError as exc:
            raise BackendUnavailable("redis %s:%d: %s" % (self._server, self._port,
                                                          str(exc) or type(exc).__name__)) from None
        if value is None:
            return None
        text = value.decode("utf-8", "replace").strip()
        try:
            if text.startswith("{"):
                data = json.loads(text)
                if not isinstance(data, dict) or "host" not in data:
                    raise ValueError("JSON without a host")
                return target_from_result(data)
            return parse_target(text)
        except ValueError:
            raise BadTarget("redis value for token %r is neither JSON nor host:port: %r"
                            % (token[:64], text[:80])) from None


# -- signed targets -----------------------------------------------------------------

SIGNED_PREFIX = "v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def read_secret(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            secret = handle.read().strip()
    except OSError as exc:
        raise SourceError("cannot read secret file: %s" % (exc.strerror or exc), path) from None
    if len(secret) < 16:
        raise SourceError("secret is too short (at least 16 bytes)", path)
    return secret


def sign_target(secret: bytes, host: str, port, lifetime: float, now: Optional[float] = None) -> str:
    """A SignedTarget token for ``host:port`` (or ``unix_socket``, path) valid ``lifetime`` s."""
    if host != UNIX:
        host, port = _host(host), _port(port)
    expires = int((time.time() if now is None else now) + lifetime)
    payload = _b64(json.dumps({"h": host, "p": port, "e": expires},
                              separators=(",", ":")).encode("utf-8"))
    signed = "%s.%s" % (SIGNED_PREFIX, payload)
    mac = hmac.new(secret, signed.encode("ascii"), hashlib.sha256).digest()
    return "%s.%s" % (signed, _b64(mac))


def _parse_ports(text: str) -> Tuple[int, int]:
    low, dash, high = text.partition("-")
    first = _port(low)
    last = _port(high) if dash else first
    if last < first:
        raise ValueError("empty port range %s" % text)
    return first, last


class SignedTarget(BasePlugin):
    """Dynamic targets carried by the token, authenticated with HMAC-SHA256.

    The token is ``v1.<payload>.<mac>``: the payload (base64url JSON) holds
    the target host and port and an expiry time; the mac is HMAC-SHA256
    under a secret read from a file.  ``websockify-sign`` makes tokens.

    The source is a configuration file::

        # where the secret is (relative to this file)
        secret /etc/websockify/sign.key
        # targets that tokens may name: an address or network, and ports
        allow 10.1.0.0/16 5900-5999
        allow ::1 5901

    Nothing is allowed until an ``allow`` line says so; target hosts must be
    address literals (no names, so a name cannot be made to point elsewhere).
    """

    def __init__(self, src):
        super().__init__(src)
        self.path = os.path.abspath(_need_source(self, src))
        self.allow: List[Tuple[object, int, int]] = []
        secret_path = None
        try:
            with open(self.path, "r", encoding="utf-8-sig") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise SourceError("cannot read: %s" % (exc.strerror or exc), self.path) from None
        except UnicodeDecodeError:
            raise SourceError("not UTF-8 text", self.path) from None
        for number, line in enumerate(lines, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            key, args = words[0].lower(), words[1:]
            if key == "secret" and len(args) == 1:
                secret_path = os.path.join(os.path.dirname(self.path), args[0])
                self.secret = read_secret(secret_path)
            elif key == "allow" and len(args) in (1, 2):
                try:
                    network = ipaddress.ip_network(args[0], strict=False)
                    first, last = _parse_ports(args[1]) if len(args) == 2 else (1, 65535)
                except ValueError as exc:
                    raise SourceError("bad allow line: %s" % exc, self.path, number) from None
                self.allow.append((network, first, last))
            else:
                raise SourceError("expected 'secret FILE' or 'allow NETWORK [PORT[-PORT]]'",
                                  self.path, number)
        if secret_path is None:
            raise SourceError("no 'secret FILE' line", self.path)
        if not self.allow:
            log.warning("SignedTarget %s: no 'allow' line, every token will be refused", self.path)

    def allowed(self, host: str, port: int) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network and first <= port <= last
                   for network, first, last in self.allow)

    def lookup(self, token):
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != SIGNED_PREFIX:
            raise TokenRefused("not a signed target token")
        signed = ("%s.%s" % (parts[0], parts[1])).encode("ascii", "replace")
        expected = hmac.new(self.secret, signed, hashlib.sha256).digest()
        try:
            mac = _unb64(parts[2])
            if not hmac.compare_digest(mac, expected):
                raise ValueError
            data = json.loads(_unb64(parts[1]))
            host, port, expires = data["h"], data["p"], data["e"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise TokenRefused("signed target token altered or malformed") from None
        if not isinstance(expires, (int, float)) or time.time() >= expires:
            raise TokenRefused("signed target token expired")
        try:
            host, port = _host(host), _port(port)
        except ValueError as exc:
            raise TokenRefused("signed target: %s" % exc) from None
        if not self.allowed(host, port):
            raise TokenRefused("signed target %s outside the allow-list" % _show(host, port))
        return host, port


def _show(host: str, port) -> str:
    return "[%s]:%s" % (host, port) if ":" in host else "%s:%s" % (host, port)


# -- from the request to a target ---------------------------------------------------

_TOKEN_IN_URI = re.compile(r"[?&;]token=([^&;#\s]*)")


def token_from_request(environ: dict, host_token: bool) -> Optional[str]:
    """The token of a request: Host header with --host-token, else the ``token``
    query parameter (anywhere in the path), else a ``token`` cookie."""
    if host_token:
        host = environ.get("HTTP_HOST", "").strip()
        if not host:
            return None
        if host.startswith("["):
            end = host.find("]")
            return host[1:end] if end > 0 else host
        if host.count(":") == 1:
            host = host.partition(":")[0]
        return host or None
    query = environ.get("QUERY_STRING", "")
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("token") if query else None
    if values:
        return values[0].rstrip("\n")
    match = _TOKEN_IN_URI.search(environ.get("RAW_URI", "") or "")
    if match:
        return urllib.parse.unquote(match.group(1))
    for item in environ.get("HTTP_COOKIE", "").split(";"):
        name, eq, value = item.strip().partition("=")
        if eq and name.strip() == "token":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return urllib.parse.unquote(value)
    return None


class TokenResolver:
    """The loaded plugin and how the sessions of a worker ask it."""

    def __init__(self, plugin, name: str, source: Optional[str], host_token: bool = False):
        self.plugin = plugin
        self.name = name
        self.source = source
        self.host_token = host_token

    def describe(self) -> str:
        return "token plugin %s (%s)" % (self.name, self.source)

    def resolve(self, environ: dict) -> Tuple[str, object]:
        """``(host, port)`` or ``('unix_socket', path)`` for the request, or an HTTPError."""
        token = token_from_request(environ, self.host_token)
        if token is None:
            raise MissingToken("no token (Host header)" if self.host_token else
                               "no token (token query parameter or cookie)")
        if not token or len(token) > 4096:
            raise TokenNotFound("empty or oversized token")
        try:
            result = self.plugin.lookup(token)
        except HTTPError:
            raise
        except socket.timeout:
            raise BackendUnavailable("token lookup timed out") from None
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # Not even sys.exit() in a plugin may end the worker: it is this
            # session's 500 (gevent would pass SystemExit to the main greenlet).
            raise PluginFailed("token plugin %s failed: %s: %s" % (
                self.name, type(exc).__name__, str(exc)[:200])) from None
        if result is None:
            raise TokenNotFound("unknown token")
        try:
            return target_from_result(result)
        except ValueError as exc:
            raise BadTarget("token plugin %s gave an unusable target: %s" % (self.name, exc)) from None


DEFAULT_MODULE = "websockify.token_plugins"


def load_resolver(settings) -> Optional[TokenResolver]:
    """Build the configured token plugin (in the master); None without one."""
    from websockify.plugins.loader import instantiate
    name = settings.token_plugin
    source = settings.token_source
    if settings.target_config:
        name, source = "TokenFile", settings.target_config
    if not name:
        return None
    plugin = instantiate(name, source, DEFAULT_MODULE, "token plugin")
    if not callable(getattr(plugin, "lookup", None)):
        raise ConfigError("token plugin %s has no lookup(token) method" % name)
    return TokenResolver(plugin, name, source, bool(settings.host_token))
