"""The viewer URL the server tells an agent in its 101: checked, printed once, written to --url-file.

A server gives an agent with an HTTP face its viewers' URL in the
``X-Websockify-Viewer-URL`` header of the 101.  The agent prints it on
standard output (one line, flushed) and, with ``--url-file``, writes it to
that file (a temporary file renamed over it, so a reader never sees half a
URL), as websocktunnel's wst-client does with ``--out-file``.  Reconnecting
to the same URL prints and writes nothing again; a different URL (another
instance, another host name) is printed and written.  What the header
holds is checked first: anything but a plain http(s) URL is a warning, and
nothing is printed (standard output may be a terminal or a script's input).
"""

import logging
import os
import re
import sys
from typing import Optional, TextIO

log = logging.getLogger("websockify.agent")

#: Longer than this is not a URL a server means.
MAX_URL = 2048

# http(s)://, a host name or IPv4 address or [IPv6], an optional port, then
# a path of RFC 3986 characters (no fragment, no spaces, no control bytes).
_HOST = r"(?:[A-Za-z0-9._~%-]+|\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9._~-]+)?\])"
_URL = re.compile(r"https?://" + _HOST + r"(?::(?P<port>[0-9]{1,5}))?"
                  r"/[A-Za-z0-9._~%!$&'()*+,;=:@/?-]*", re.IGNORECASE)


class BadViewerURL(ValueError):
    """The server's viewer URL header is not a sane http(s) URL."""


def check_viewer_url(text: str) -> str:
    """``text`` (the header's value) if it is an http:// or https:// URL with
    a host and a path; raises BadViewerURL saying what is wrong."""
    if len(text) > MAX_URL:
        raise BadViewerURL("longer than %d characters" % MAX_URL)
    match = _URL.fullmatch(text)
    if match is None:
        raise BadViewerURL("not an http:// or https:// URL with a host and a path: %r"
                           % text[:100])
    port = match.group("port")
    if port is not None and not 0 < int(port) < 65536:
        raise BadViewerURL("port %s out of range" % port)
    return text


def write_atomically(path: str, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it, renamed over it."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(tmp, "w", encoding="ascii") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class ViewerURL:
    """What the agent did with the viewer URLs it was told, across reconnections."""

    def __init__(self, url_file: Optional[str] = None, out: Optional[TextIO] = None,
                 expected: bool = False):
        self.url_file = url_file
        self.out = out
        #: Say so (once) when a server gives no URL: --http or --url-file asked for one.
        self.expected = expected or bool(url_file)
        self.printed: Optional[str] = None     # the last URL printed
        self.written: Optional[str] = None     # the last URL written to url_file
        self._told_none = False

    def connected(self, header: Optional[str]) -> Optional[str]:
        """A tunnel came up with ``header`` (the 101's viewer URL header, or
        None): print and write it if new.  Returns the URL, None without one."""
        if header is None:
            if not self._told_none and (self.expected or self.printed):
                log.info("the server gave no viewer URL (no HTTP face for this agent)%s",
                         ": nothing written to %s" % self.url_file if self.url_file else "")
            self._told_none = True
            self.printed = None         # a URL given again later is printed again
            return None
        self._told_none = False
        try:
            url = check_viewer_url(header.strip())
        except BadViewerURL as exc:
            log.warning("ignoring the server's viewer URL: %s", exc)
            return None
        # The file first: once the URL is on standard output, the file holds it too.
        if self.url_file and url != self.written:
            try:
                write_atomically(self.url_file, url + "\n")
            except OSError as exc:
                log.error("cannot write the viewer URL to %s: %s", self.url_file,
                          exc.strerror or exc)
            else:
                self.written = url
        if url != self.printed:
            log.info("viewer URL: %s", url)
            self._print(url)
            self.printed = url
        return url

    def _print(self, url: str) -> None:
        out = self.out if self.out is not None else sys.stdout
        try:
            out.write(url + "\n")
            out.flush()
        except (OSError, ValueError) as exc:     # stdout closed, or a broken pipe
            log.warning("cannot print the viewer URL: %s", getattr(exc, "strerror", None)
                        or exc)
