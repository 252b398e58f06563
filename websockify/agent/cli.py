"""websockify-agent's command line: argv -> AgentConfig, then the agent runs until a signal."""

import argparse
import signal
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

from websockify import __version__, addr
from websockify.addr import AddressError, format_host_port, parse_host, parse_host_port
from websockify.errors import EXIT_CONFIG, EXIT_OK, EXIT_USAGE, UsageError

USAGE = """
    %(prog)s --service HOST:PORT --server ws[s]://HOST[:PORT]/tunnel/ID
                     (--token-file FILE | --token-stdin) [options]
    %(prog)s --service HOST:PORT --server wss://HOST[:PORT]/PATH/ID
                     --client-cert FILE [--client-key FILE] [options]"""

DESCRIPTION = """\
The service side of a reverse tunnel: dial out to a websockify rendezvous
server over one WebSocket (wss:// or ws://), and for every user the server
sends down that WebSocket open a TCP connection to the local --service.
The agent reconnects forever, with exponential back-off and jitter."""

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_PING_INTERVAL = 15.0
DEFAULT_DEAD_AFTER = 45.0
DEFAULT_MAX_RETRY_DELAY = 30.0


@dataclass(frozen=True)
class ServerURL:
    """Where the agent upgrades: ``ws[s]://host[:port]/path``."""
    secure: bool
    host: str
    port: int
    target: str          # the request target: path and query

    @property
    def host_header(self) -> str:
        default = 443 if self.secure else 80
        if self.port == default:
            return "[%s]" % self.host if ":" in self.host else self.host
        return format_host_port(self.host, self.port)

    def __str__(self) -> str:
        return "%s://%s%s" % ("wss" if self.secure else "ws", self.host_header, self.target)


@dataclass(frozen=True)
class AgentConfig:
    service: Tuple[str, int]
    server: ServerURL
    token_file: Optional[str]
    token_stdin: bool
    ca_cert: Optional[str]
    client_cert: Optional[str]
    client_key: Optional[str]
    connect_timeout: float
    ping_interval: float
    dead_after: float
    max_retry_delay: float
    verbose: bool
    log_file: Optional[str]
    http: bool = False
    url_file: Optional[str] = None


def parse_server_url(text: str) -> ServerURL:
    """``ws://`` or ``wss://``, a host (``[v6]`` for IPv6) and an optional port, then a path."""
    scheme, sep, rest = text.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("ws", "wss"):
        raise UsageError("--server must be a ws:// or wss:// URL, not %r" % text)
    netloc, slash, path = rest.partition("/")
    if "?" in netloc or "#" in netloc:
        raise UsageError("--server %r has no path (it ends in /tunnel/ID)" % text)
    if "@" in netloc:
        raise UsageError("--server %r: credentials in the URL are not supported "
                         "(use --token-file or --token-stdin)" % text)
    secure = scheme == "wss"
    try:
        if netloc.endswith("]") or ":" not in netloc:
            host, port = parse_host(netloc), 443 if secure else 80
        else:
            host, port = parse_host_port(netloc)
    except AddressError as exc:
        raise UsageError("--server %r: %s" % (text, exc)) from None
    target = "/" + path.split("#", 1)[0]
    if target == "/":
        raise UsageError("--server %r has no path (it ends in /tunnel/ID)" % text)
    return ServerURL(secure, host, int(port), target)


def parse_service(text: str) -> Tuple[str, int]:
    try:
        host, port = parse_host_port(text)
    except AddressError as exc:
        what = {addr.PORT: "a bad port", addr.RANGE: "a port out of range"}.get(exc.kind, exc)
        raise UsageError("--service %r: %s" % (text, what)) from None
    return host, int(port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: %r" % text) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds: %r" % text)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="websockify-agent", usage=USAGE.lstrip("\n"),
                                     description=DESCRIPTION)
    parser.add_argument("--version", action="version",
                        version="websockify-agent %s" % __version__)
    parser.add_argument("--service", metavar="HOST:PORT", required=True,
                        help="the TCP service users reach: a connection to it is opened "
                             "for each stream ([v6]:port for IPv6)")
    parser.add_argument("--server", metavar="URL", required=True,
                        help="the rendezvous: ws[s]://HOST[:PORT]/tunnel/ID (the server's "
                             "tunnels path, then this agent's ID)")
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--token-file", metavar="FILE",
                        help="the agent token (a JWT, as websockify-sign agent prints it), "
                             "read again at each reconnection")
    tokens.add_argument("--token-stdin", action="store_true",
                        help="read tokens from standard input, one per line: each line "
                             "replaces the token for the next reconnection, open streams "
                             "are not touched")
    parser.add_argument("--ca-cert", metavar="FILE",
                        help="CA certificates (PEM) that verify the server over wss:// "
                             "(default: the system CAs)")
    parser.add_argument("--client-cert", metavar="FILE",
                        help="a client certificate (PEM) to present over wss://, for "
                             "servers that authenticate agents by certificate")
    parser.add_argument("--client-key", metavar="FILE",
                        help="the client certificate's private key (default: in the "
                             "--client-cert file)")
    parser.add_argument("--connect-timeout", metavar="S", type=_seconds,
                        default=DEFAULT_CONNECT_TIMEOUT,
                        help="seconds a connection may take: to the server (TCP, TLS "
                             "and the handshake) and to the service for each stream "
                             "(then the stream is reset with TIMEOUT) (default: %g)"
                             % DEFAULT_CONNECT_TIMEOUT)
    parser.add_argument("--ping-interval", metavar="S", type=_seconds,
                        default=DEFAULT_PING_INTERVAL,
                        help="ping the server after this many seconds without a message "
                             "from it (default: %g)" % DEFAULT_PING_INTERVAL)
    parser.add_argument("--dead-after", metavar="S", type=_seconds,
                        default=DEFAULT_DEAD_AFTER,
                        help="a server silent this long is dead: its streams are reset "
                             "and the agent reconnects (default: %g)" % DEFAULT_DEAD_AFTER)
    parser.add_argument("--max-retry-delay", metavar="S", type=_seconds,
                        default=DEFAULT_MAX_RETRY_DELAY,
                        help="the back-off cap: reconnection delays grow from 0.5 s to "
                             "this, with full jitter, and a server refusing the agent's "
                             "credentials (401, 403) is retried after this (default: %g)"
                             % DEFAULT_MAX_RETRY_DELAY)
    parser.add_argument("--http", action="store_true",
                        help="the service speaks HTTP: the server may keep viewers' "
                             "connections alive and pipeline their requests over one "
                             "stream each (without it each request gets Connection: close)")
    parser.add_argument("--url-file", metavar="FILE",
                        help="write the viewer URL the server gives (to agents with an "
                             "HTTP face) to FILE, replaced atomically when it changes; it "
                             "is printed on standard output in any case")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each stream and debugging detail")
    parser.add_argument("--log-file", metavar="FILE",
                        help="log to FILE instead of standard error (reopened on SIGUSR1)")
    return parser


def parse_args(argv: List[str]) -> AgentConfig:
    """AgentConfig from argv; UsageError for a bad one (argparse exits for --help)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    server = parse_server_url(args.server)
    service = parse_service(args.service)
    if args.client_key and not args.client_cert:
        raise UsageError("--client-key needs --client-cert")
    if not (args.token_file or args.token_stdin or args.client_cert):
        raise UsageError("the agent needs credentials: --token-file, --token-stdin "
                         "or --client-cert")
    if (args.ca_cert or args.client_cert) and not server.secure:
        raise UsageError("--ca-cert and --client-cert need a wss:// --server")
    return AgentConfig(service=service, server=server, token_file=args.token_file,
                       token_stdin=args.token_stdin, ca_cert=args.ca_cert,
                       client_cert=args.client_cert, client_key=args.client_key,
                       connect_timeout=args.connect_timeout,
                       ping_interval=args.ping_interval, dead_after=args.dead_after,
                       max_retry_delay=args.max_retry_delay,
                       verbose=args.verbose, log_file=args.log_file, http=args.http,
                       url_file=args.url_file)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_args(argv)
    except SystemExit as exc:           # argparse: --help, --version, or its own error
        return EXIT_USAGE if exc.code else EXIT_OK
    except UsageError as exc:
        sys.stderr.write("%s\nwebsockify-agent: error: %s\n"
                         % (USAGE.strip("\n").replace("%(prog)s", "websockify-agent"), exc))
        return EXIT_USAGE
    # gevent is imported only once the command line is good (--help stays fast).
    from websockify.allocator import keep_read_buffers_on_the_heap
    from websockify.agent.transport import Agent, AgentSetupError
    from websockify.log import reopen_log_files, setup_logging
    try:
        logger = setup_logging(config.verbose, config.log_file)
    except OSError as exc:
        sys.stderr.write("websockify-agent: cannot open the log file %s: %s\n"
                         % (config.log_file, exc.strerror or exc))
        return EXIT_CONFIG
    keep_read_buffers_on_the_heap()
    try:
        agent = Agent(config)
    except AgentSetupError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    import gevent
    gevent.signal_handler(signal.SIGTERM, agent.stop, "SIGTERM")
    gevent.signal_handler(signal.SIGINT, agent.stop, "SIGINT")
    gevent.signal_handler(signal.SIGUSR1, reopen_log_files)
    return agent.run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
