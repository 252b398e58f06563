"""websockify-sign: print a SignedTarget token (or a URL carrying one).

    websockify-sign --config /etc/websockify/signed.conf 10.1.2.3:5901
    websockify-sign --secret-file sign.key --lifetime 10m \\
        --url 'https://example.org/novnc/vnc.html?path=novnc/websockify' 10.1.2.3:5901

With --config, the secret file named there is used and the target is
checked against its allow-list, so a token the server would refuse is not
printed.
"""

import argparse
import re
import sys
import urllib.parse
from typing import List, Optional

from websockify.errors import EXIT_CONFIG, EXIT_USAGE
from websockify.addr import UNIX, parse_host_port
from websockify.plugins.tokens.base import SourceError
from websockify.plugins.tokens.signed import SignedTarget, read_secret, sign_target

_LIFETIME = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_lifetime(text: str) -> float:
    match = _LIFETIME.match(text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError("lifetime must be a positive number of seconds, "
                                         "or with s, m, h or d: %r" % text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def with_token(url: str, token: str) -> str:
    """``url`` with ``token=TOKEN`` appended to its query, even when the
    query already holds a noVNC ``path=...?`` (the token then rides along)."""
    joiner = "&" if "?" in url else "?"
    if re.search(r"[?&]path=[^&#]*$", url):
        # noVNC's path=websockify: the token belongs to the WebSocket path.
        rest = url.split("path=", 1)[1].lower()
        joiner = "%26" if "?" in rest or "%3f" in rest else "%3F"
    return "%s%stoken=%s" % (url, joiner, urllib.parse.quote(token, safe=""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="websockify-sign",
        description="Print a token for websockify's SignedTarget token plugin: the "
                    "target and an expiry time, authenticated with HMAC-SHA256.")
    secret = parser.add_mutually_exclusive_group(required=True)
    secret.add_argument("--config", metavar="FILE",
                        help="the SignedTarget configuration (the --token-source): its "
                             "secret is used and the target must be in its allow-list")
    secret.add_argument("--secret-file", metavar="FILE",
                        help="the secret file (no allow-list check)")
    parser.add_argument("--lifetime", type=parse_lifetime, default=3600.0, metavar="TIME",
                        help="how long the token is valid: seconds, or 30s, 10m, 2h, 1d "
                             "(default: 1h)")
    parser.add_argument("--url", metavar="URL",
                        help="print URL with token=TOKEN added to its query instead of "
                             "the bare token")
    parser.add_argument("target", help="host:port ([v6]:port), an IP address literal")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else 0
    try:
        host, port = parse_host_port(args.target, unix=True)
    except ValueError as exc:
        sys.stderr.write("websockify-sign: %s\n" % exc)
        return EXIT_USAGE
    if host == UNIX:
        sys.stderr.write("websockify-sign: SignedTarget targets are host:port\n")
        return EXIT_USAGE
    try:
        if args.config:
            plugin = SignedTarget(args.config)
            plugin.check()
            if not plugin.allowed(host, port):
                sys.stderr.write("websockify-sign: %s is outside the allow-list of %s; "
                                 "the server would refuse it\n" % (args.target, args.config))
                return EXIT_CONFIG
            secret = plugin.secret
        else:
            secret = read_secret(args.secret_file)
    except SourceError as exc:
        sys.stderr.write("websockify-sign: %s\n" % exc)
        return EXIT_CONFIG
    token = sign_target(secret, host, port, args.lifetime)
    print(with_token(args.url, token) if args.url else token)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
