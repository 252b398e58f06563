"""SignedTarget: targets carried by HMAC-signed tokens, and the token format websockify-sign writes."""

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import time
from typing import List, Optional, Tuple

from websockify.addr import UNIX, format_host_port, parse_host, parse_port
from websockify.plugins.tokens.base import (BackendUnavailable, ResolvingPlugin, SourceError,
                                            TokenRefused, need_source)

log = logging.getLogger("websockify")


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
        host, port = parse_host(host), parse_port(port)
    expires = int((time.time() if now is None else now) + lifetime)
    payload = _b64(json.dumps({"h": host, "p": port, "e": expires},
                              separators=(",", ":")).encode("utf-8"))
    signed = "%s.%s" % (SIGNED_PREFIX, payload)
    mac = hmac.new(secret, signed.encode("ascii"), hashlib.sha256).digest()
    return "%s.%s" % (signed, _b64(mac))


def _parse_ports(text: str) -> Tuple[int, int]:
    low, dash, high = text.partition("-")
    first = parse_port(low)
    last = parse_port(high) if dash else first
    if last < first:
        raise ValueError("empty port range %s" % text)
    return first, last


class SignedTarget(ResolvingPlugin):
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
    A configuration that cannot be used is ``check()``'s SourceError.
    """

    def __init__(self, src):
        super().__init__(src)
        self.allow: List[Tuple[object, int, int]] = []
        self.secret: Optional[bytes] = None
        self.path: Optional[str] = None
        self._problem: Optional[SourceError] = None
        try:
            self._configure(src)
        except SourceError as exc:
            self._problem = exc

    def check(self) -> None:
        if self._problem is not None:
            raise self._problem

    def _configure(self, src) -> None:
        self.path = os.path.abspath(need_source(self, src))
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

    def resolve(self, token: str):
        if self._problem is not None:
            raise BackendUnavailable(str(self._problem))
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
            host, port = parse_host(host), parse_port(port)
        except ValueError as exc:
            raise TokenRefused("signed target: %s" % exc) from None
        if not self.allowed(host, port):
            raise TokenRefused("signed target %s outside the allow-list"
                               % format_host_port(host, port))
        return host, port
