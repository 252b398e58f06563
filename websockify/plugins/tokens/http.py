"""Token plugins that ask an HTTP API: BaseTokenAPI (plain ``host:port``) and JSONTokenApi."""

import json
import urllib.error
import urllib.parse
import urllib.request

from websockify.plugins.tokens.base import (BackendUnavailable, BadTarget, BasePlugin,
                                            SourceError, need_source)
from websockify.addr import parse_host, parse_port
from websockify.plugins.tokens.targets import parse_target


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
        url = need_source(self, src)
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
        return parse_host(data["host"]), parse_port(data["port"])
