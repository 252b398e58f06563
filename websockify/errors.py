"""Errors that carry their own HTTP status or WebSocket close code, and the
process exit codes the master uses.

Exceptions are mapped to an answer in one place (the handshake handler for
HTTP statuses, the relay for close codes), so code that refuses a session
only has to raise.
"""

import http
from typing import Iterable, Optional, Tuple

# Process exit statuses (also documented in man/websockify.1).
EXIT_OK = 0
EXIT_FAILURE = 1        # an unexpected error in the master
EXIT_USAGE = 2          # bad command line
EXIT_WORKER_BOOT = 3    # a worker could not start: respawning would loop forever
EXIT_LISTEN = 4         # the listening socket could not be opened
EXIT_CONFIG = 5         # a file or setting named on the command line is unusable


def reason_phrase(status: int) -> str:
    """The standard phrase of an HTTP status (http.HTTPStatus), for any status a plugin picks."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Client Error" if 400 <= status < 500 else "Error"


class HTTPError(Exception):
    """Refuse a request before any upgrade with an HTTP status and a short body."""

    def __init__(self, status: int, text: Optional[str] = None,
                 headers: Iterable[Tuple[str, str]] = ()):
        reason = reason_phrase(status)
        super().__init__(text or reason)
        self.status = status
        self.reason = reason
        self.text = text or reason
        self.headers = list(headers)
        #: What the log line says, when it must say more than the client hears.
        self.log_text = self.text

    @property
    def status_line(self) -> str:
        return "%d %s" % (self.status, self.reason)


class BadRequest(HTTPError):
    def __init__(self, text: str, headers: Iterable[Tuple[str, str]] = ()):
        super().__init__(400, text, headers)


class BadGateway(HTTPError):
    def __init__(self, text: str):
        super().__init__(502, text)


class GatewayTimeout(HTTPError):
    def __init__(self, text: str):
        super().__init__(504, text)


class HeaderTooLarge(HTTPError):
    def __init__(self, limit: int):
        super().__init__(431, "request header block exceeds %d bytes" % limit)


class WebSocketError(Exception):
    """A WebSocket protocol failure; the session is closed with close_code."""

    close_code = 1002

    def __init__(self, reason: str, close_code: Optional[int] = None):
        super().__init__(reason)
        self.reason = reason
        if close_code is not None:
            self.close_code = close_code


class ProtocolError(WebSocketError):
    close_code = 1002


class InvalidPayload(WebSocketError):
    """Text that is not UTF-8 (close 1007)."""
    close_code = 1007


class MessageTooBig(WebSocketError):
    close_code = 1009


class TunnelHandshakeError(Exception):
    """A server did not accept the tunnel agent's upgrade.

    ``status`` is the HTTP status the server answered (0 when the answer is
    not HTTP), ``reason`` its reason text from the status line; ``problem``
    says what was wrong with a 101 (or with an answer that is not HTTP).
    """

    def __init__(self, status: int, reason: str, problem: Optional[str] = None):
        text = ("%d %s" % (status, reason)).rstrip() if status else "no HTTP status"
        super().__init__(text + (": " + problem if problem else ""))
        self.status = status
        self.reason = reason
        self.problem = problem


class UsageError(Exception):
    """A command line (or library call) that cannot run: exit EXIT_USAGE."""

    exit_code = EXIT_USAGE


class ConfigError(Exception):
    """A setting that cannot work; the master exits with EXIT_CONFIG."""

    exit_code = EXIT_CONFIG
