"""websockify-sign: print a SignedTarget token (or a URL carrying one), or a tunnel agent's token.

    websockify-sign --config /etc/websockify/signed.conf 10.1.2.3:5901
    websockify-sign --secret-file sign.key --lifetime 10m \\
        --url 'https://example.org/novnc/vnc.html?path=novnc/websockify' 10.1.2.3:5901
    websockify-sign agent LKLAFA151NA774655 --secret-file tunnel-a.key --lifetime 7d
    websockify-sign agent LKLAFA151NA774655 --config /etc/websockify/tunnels.toml

With --config, the secret file named there is used and the target is
checked against its allow-list (an agent: its ID against the tunnel
configuration's agents, and its first secret and audience are used), so a
token the server would refuse is not printed.
"""

import argparse
import re
import sys
import time
import urllib.parse
from typing import List, Optional

from websockify.errors import EXIT_CONFIG, EXIT_USAGE
from websockify.addr import UNIX, parse_host_port
from websockify.plugins.tokens.base import SourceError
from websockify.plugins.tokens.signed import SignedTarget, read_secret, sign_target
from websockify.tunnel.agent_token import MAX_LIFETIME, make_agent_token
from websockify.tunnel.config import AGENT_ID, TunnelConfigError, load_tunnel_config

AGENT = "agent"

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
                    "target and an expiry time, authenticated with HMAC-SHA256. "
                    "'websockify-sign agent --help': a tunnel agent's token instead.")
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


def build_agent_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="websockify-sign agent",
        description="Print a token for a websockify-agent (reverse tunnels): an HS256 JWT "
                    "with the agent's ID (tid), nbf, exp and optionally aud.")
    secret = parser.add_mutually_exclusive_group(required=True)
    secret.add_argument("--config", metavar="FILE",
                        help="the --tunnel-config file: its first secret and its audience "
                             "are used, and the ID must be one of its agents (any ID "
                             "with open = true)")
    secret.add_argument("--secret-file", metavar="FILE",
                        help="a file holding the secret (surrounding whitespace is stripped)")
    parser.add_argument("--lifetime", type=parse_lifetime, default=86400.0, metavar="TIME",
                        help="how long the token is valid: seconds, or 30s, 10m, 12h, 7d; "
                             "at most 31 days (default: 1d)")
    parser.add_argument("--audience", metavar="AUD",
                        help="the aud claim (default: the configuration's audience with "
                             "--config, else none)")
    parser.add_argument("agent_id", metavar="ID", help="the agent's ID, as in the tunnel "
                                                       "configuration")
    return parser


def agent_main(argv: List[str]) -> int:
    """websockify-sign agent ID ...: print an agent token."""
    try:
        args = build_agent_parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else 0
    if not AGENT_ID.fullmatch(args.agent_id):
        sys.stderr.write("websockify-sign: bad agent ID %r (1 to 128 of A-Z a-z 0-9 _ ~ . %% -)\n"
                         % args.agent_id)
        return EXIT_USAGE
    if args.lifetime > MAX_LIFETIME:
        sys.stderr.write("websockify-sign: --lifetime is at most 31 days: the server refuses "
                         "longer tokens\n")
        return EXIT_USAGE
    audience = args.audience
    if args.config:
        try:
            tunnels = load_tunnel_config(args.config)
        except TunnelConfigError as exc:
            sys.stderr.write("websockify-sign: %s\n" % exc)
            return EXIT_CONFIG
        # With open = true any ID with a valid token registers: no entry needed.
        if args.agent_id not in tunnels.agents and not getattr(tunnels, "open", False):
            sys.stderr.write("websockify-sign: %s names no agent %s; the server would refuse "
                             "it\n" % (tunnels.source, args.agent_id))
            return EXIT_CONFIG
        if not tunnels.secrets:
            sys.stderr.write("websockify-sign: %s names no secrets\n" % tunnels.source)
            return EXIT_CONFIG
        secret = tunnels.secrets[0]
        if audience is None:
            audience = tunnels.audience
    else:
        try:
            with open(args.secret_file, "rb") as handle:
                secret = handle.read().strip()
        except OSError as exc:
            sys.stderr.write("websockify-sign: %s: cannot read: %s\n"
                             % (args.secret_file, exc.strerror or exc))
            return EXIT_CONFIG
        if not secret:
            sys.stderr.write("websockify-sign: %s: the secret file is empty\n" % args.secret_file)
            return EXIT_CONFIG
    print(make_agent_token(args.agent_id, secret, args.lifetime, time.time(), audience))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [AGENT]:
        # Not a target: a target is host:port.
        return agent_main(argv[1:])
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
