"""Token plugins that ask an HTTP API: BaseTokenAPI (plain ``host:port``) and JSONTokenApi."""

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from websockify.plugins.tokens.base import (BackendUnavailable, BadTarget, ResolvingPlugin,
                                            SourceError)
from websockify.plugins.tokens.targets import split_target


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


class BaseTokenAPI(ResolvingPlugin):
    """GET the source URL with the token in place of its ``%s``; the body is ``host:port``.

    The token is URL-escaped; the request has a timeout.  2xx: the target,
    from ``process_result(resp)`` (0.13's hook: ``[host, b'port']``); 404 (or
    another 4xx): unknown token; 5xx: 503 (None from ``lookup()``, as 0.13);
    a timeout or a refused connection: 503 (``lookup()`` raises the error).
    """

    timeout = 5.0
    max_body = 64 * 1024

    def _source_problem(self) -> Optional[str]:
        url = self.source
        if not isinstance(url, str) or not url.strip():
            return "%s needs --token-source" % type(self).__name__
        if url.count("%s") != 1:
            return ("%s source %r must contain %%s once, where the token goes"
                    % (type(self).__name__, url))
        scheme = urllib.parse.urlsplit(url.replace("%s", "x")).scheme
        if scheme not in ("http", "https"):
            return "%s source %r is not an http(s) URL" % (type(self).__name__, url)
        return None

    def check(self) -> None:
        problem = self._source_problem()
        if problem:
            raise SourceError(problem)

    def process_result(self, resp):
        parts = split_target(resp.text)
        if len(parts) != 2:
            raise ValueError("the answer is not host:port")
        host, port = parts
        return [host, port.encode("ascii", "ignore")]

    def resolve(self, token: str):
        problem = self._source_problem()
        if problem:
            raise BackendUnavailable(problem)
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
            raise BackendUnavailable("token API unreachable: %s" % (reason,), exc) from None
        if not resp.ok:
            return None
        try:
            return self.process_result(resp)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadTarget("token API answer is not a target: %s" % exc) from None


class JSONTokenApi(BaseTokenAPI):
    """BaseTokenAPI whose answer is ``{"host": ..., "port": ...}``, given as it is."""

    def process_result(self, resp):
        data = resp.json()
        return data["host"], data["port"]
