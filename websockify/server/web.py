"""Static files for --web: a small WSGI application.

Paths are decoded once, resolved with realpath and must stay inside the web
root, so ``..``, ``%2e%2e`` and symlinks pointing outside all get 404.
"""

import html
import logging
import mimetypes
import os
import posixpath
from email.utils import formatdate
from typing import Callable, Iterable, List, Optional, Tuple
from urllib.parse import quote, unquote

log = logging.getLogger("websockify")

StartResponse = Callable[..., object]
_CHUNK = 64 * 1024
INDEX_FILES = ("index.html", "index.htm")


def _text(start_response: StartResponse, status: str, body: str,
          headers: Iterable[Tuple[str, str]] = (), head: bool = False) -> List[bytes]:
    data = (body + "\n").encode("utf-8")
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(data)))] + list(headers))
    return [] if head else [data]


def method_not_allowed(environ: dict, start_response: StartResponse) -> List[bytes]:
    """The answer to a plain HTTP request when --web is not given."""
    head = environ.get("REQUEST_METHOD") == "HEAD"
    return _text(start_response, "405 Method Not Allowed",
                 "405 Method Not Allowed: this server only accepts WebSocket connections",
                 [("Allow", "GET")], head=head)


class StaticFiles:
    """Serve files below ``root``; directory listings unless ``file_only``."""

    def __init__(self, root: str, file_only: bool = False):
        self.root = os.path.realpath(root)
        self.file_only = file_only

    def resolve(self, url_path: str) -> Optional[str]:
        """Map a URL path to a real path inside the root, or None."""
        path = unquote(url_path.split("?", 1)[0].split("#", 1)[0], errors="strict")
        if "\x00" in path:
            return None
        path = posixpath.normpath("/" + path.lstrip("/"))
        parts = [part for part in path.split("/") if part not in ("", ".", "..")]
        candidate = os.path.realpath(os.path.join(self.root, *parts))
        if candidate != self.root and not candidate.startswith(self.root + os.sep):
            return None
        return candidate

    def __call__(self, environ: dict, start_response: StartResponse) -> List[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _text(start_response, "405 Method Not Allowed",
                         "405 Method Not Allowed", [("Allow", "GET, HEAD")])
        # RAW_URI keeps the escapes; PATH_INFO was already decoded as latin-1.
        raw = environ.get("RAW_URI") or quote(environ.get("PATH_INFO", "/"))
        url_path, _, query = raw.partition("?")
        url_path = url_path.split("#", 1)[0]
        try:
            path = self.resolve(url_path)
        except UnicodeDecodeError:
            path = None
        if path is None or not os.path.exists(path):
            return _text(start_response, "404 Not Found", "404 Not Found", head=head)
        if os.path.isdir(path):
            if not url_path.endswith("/"):
                location = url_path + "/" + ("?" + query if query else "")
                return _text(start_response, "301 Moved Permanently",
                             "301 Moved Permanently", [("Location", location)], head=head)
            for name in INDEX_FILES:
                index = os.path.join(path, name)
                if os.path.isfile(index):
                    return self._file(index, start_response, head)
            if self.file_only:
                return _text(start_response, "404 Not Found", "404 Not Found", head=head)
            return self._listing(path, url_path, start_response, head)
        return self._file(path, start_response, head)

    def _file(self, path: str, start_response: StartResponse, head: bool) -> Iterable[bytes]:
        try:
            handle = open(path, "rb")
            size = os.fstat(handle.fileno()).st_size
        except OSError:
            return _text(start_response, "403 Forbidden", "403 Forbidden", head=head)
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript",):
            ctype += "; charset=utf-8"
        start_response("200 OK", [
            ("Content-Type", ctype),
            ("Content-Length", str(size)),
            ("Last-Modified", formatdate(os.path.getmtime(path), usegmt=True)),
            ("Cache-Control", "no-cache"),
        ])
        if head:
            handle.close()
            return []
        return _FileIterator(handle)

    def _listing(self, path: str, url_path: str, start_response: StartResponse,
                 head: bool) -> List[bytes]:
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return _text(start_response, "403 Forbidden", "403 Forbidden", head=head)
        title = html.escape("Directory listing for %s" % unquote(url_path))
        rows = []
        for name in names:
            shown = name + ("/" if os.path.isdir(os.path.join(path, name)) else "")
            rows.append('<li><a href="%s">%s</a></li>'
                        % (quote(shown), html.escape(shown)))
        body = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>%s</title>"
                "</head><body><h1>%s</h1><ul>\n%s\n</ul></body></html>\n"
                % (title, title, "\n".join(rows))).encode("utf-8")
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Length", str(len(body)))])
        return [] if head else [body]


class _FileIterator:
    """Stream a file in chunks and close it when the server is done."""

    def __init__(self, handle):
        self.handle = handle

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        data = self.handle.read(_CHUNK)
        if not data:
            raise StopIteration
        return data

    def close(self) -> None:
        self.handle.close()
