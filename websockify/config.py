"""The configuration: one declarative entry per option, and the immutable ``Config``.

The parser in cli.py, ``--help``, the man page check and a library caller's
keyword arguments are all derived from ``OPTIONS``; adding an option here is
the only way to add one.  Each entry carries its validator and whether it
is a path (made absolute, since the daemon changes directory).  A ``Config``
is built once, from argv (cli.py) or from keyword arguments
(``Config.from_kwargs``), and never changes; what the master loads for it
(plugins, TLS contexts, the wrapped program's target) is websockify.runtime.
"""

import os
import types
from dataclasses import dataclass, field, replace
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from websockify.errors import UsageError


def _non_negative(value) -> Optional[str]:
    return "must not be negative" if value < 0 else None


def _positive(value) -> Optional[str]:
    return "must be positive" if value <= 0 else None


def _at_least_one(value) -> Optional[str]:
    return "must be at least 1" if value < 1 else None


def _frame_size(value) -> Optional[str]:
    # A frame header's 7-bit length must still fit a control frame.
    return "must be at least 126 bytes" if value < 126 else None


def _parse_syslog(text: str):
    from websockify.log import parse_syslog_server
    return parse_syslog_server(text)


def _parse_metrics(text: str):
    from websockify.addr import AddressError, parse_host_port
    text = text.strip()
    try:
        if text.isdigit():
            return "127.0.0.1", parse_host_port(text, listen=True)[1]
        return parse_host_port(text, listen=True)
    except AddressError as exc:
        raise ValueError("--metrics: %s" % exc) from None


def _parse_trusted(text: str):
    from websockify.protocol.forwarded import parse_trusted_proxies
    return parse_trusted_proxies(text)

from websockify.addr import format_host_port


@dataclass(frozen=True)
class Option:
    flags: Tuple[str, ...]
    dest: str
    help: str
    kind: str = "flag"               # flag | str | int | float | choice
    default: Any = None
    metavar: Optional[str] = None
    choices: Sequence[str] = ()
    #: A message (after the flag) when a given value cannot be used, else None.
    check: Optional[Callable[[Any], Optional[str]]] = None
    #: Turns the text into the value the program uses (ValueError: a usage error).
    parse: Optional[Callable[[str], Any]] = None
    #: A file or directory: made absolute.
    path: bool = False

    @property
    def takes_value(self) -> bool:
        return self.kind != "flag"

    @property
    def flag(self) -> str:
        return self.flags[-1]



OPTIONS: List[Option] = [
    # -- websockify 0.13 -------------------------------------------------
    Option(("-v", "--verbose"), "verbose", "verbose messages"),
    Option(("--traffic",), "traffic", "per frame traffic"),
    Option(("--record",), "record", "record sessions to FILE.[session_number]",
           kind="str", metavar="FILE",
           path=True),
    Option(("-D", "--daemon"), "daemon", "become a daemon (background process)"),
    Option(("--run-once",), "run_once",
           "handle a single WebSocket connection and exit"),
    Option(("--timeout",), "timeout",
           "stop accepting new connections TIMEOUT seconds after start, and exit "
           "when the open sessions have ended (0: never)",
           kind="float", default=0.0,
           check=_non_negative),
    Option(("--idle-timeout",), "idle_timeout",
           "exit after IDLE_TIMEOUT seconds with no open WebSocket session (0: never)",
           kind="float", default=0.0,
           check=_non_negative),
    Option(("--cert",), "cert", "SSL certificate file", kind="str",
           default="self.pem",
           path=True),
    Option(("--key",), "key", "SSL key file (if separate from cert)", kind="str", path=True),
    Option(("--key-password",), "key_password",
           "SSL key password (ps shows it: prefer a password file, or the "
           "WEBSOCKIFY_KEY_PASSWORD environment variable)", kind="str"),
    Option(("--key-password-file",), "key_password_file",
           "read the SSL key password from the first line of FILE", kind="str",
           metavar="FILE",
           path=True),
    Option(("--ssl-only",), "ssl_only", "disallow non-encrypted client connections"),
    Option(("--ssl-target",), "ssl_target",
           "connect to SSL target as SSL client (the target's certificate is "
           "verified with the system CAs, and SNI is sent)"),
    Option(("--ssl-target-cafile",), "ssl_target_cafile",
           "with --ssl-target, verify the target's certificate with the CAs in FILE "
           "instead of the system CAs", kind="str", metavar="FILE",
           path=True),
    Option(("--ssl-target-no-verify",), "ssl_target_no_verify",
           "with --ssl-target, do not verify the target's certificate (self-signed "
           "targets; a warning is logged)"),
    Option(("--verify-client",), "verify_client",
           "require encrypted client to present a valid certificate"),
    Option(("--cafile",), "cafile",
           "file of concatenated certificates of authorities trusted for validating "
           "clients (only effective with --verify-client); default: the system CAs",
           kind="str", metavar="FILE",
           path=True),
    Option(("--ssl-version",), "ssl_version",
           "minimum TLS version to use (default, tlsv1_1, tlsv1_2, tlsv1_3)",
           kind="choice", default="default",
           choices=("default", "tlsv1_1", "tlsv1_2", "tlsv1_3")),
    Option(("--ssl-ciphers",), "ssl_ciphers",
           "list of ciphers allowed for connection (see `openssl ciphers`)",
           kind="str"),
    Option(("--unix-listen",), "unix_listen", "listen to unix socket",
           kind="str", metavar="FILE",
           path=True),
    Option(("--unix-listen-mode",), "unix_listen_mode",
           "specify mode for unix socket (octal, defaults to 0600)",
           kind="str", metavar="MODE"),
    Option(("--unix-target",), "unix_target", "connect to unix socket target",
           kind="str", metavar="FILE",
           path=True),
    Option(("--inetd",), "inetd", "inetd mode, receive listening socket from stdin"),
    Option(("--web",), "web", "run webserver on same port. Serve files from DIR.",
           kind="str", metavar="DIR",
           path=True),
    Option(("--web-auth",), "web_auth", "require authentication to access webserver."),
    Option(("--wrap-mode",), "wrap_mode",
           "action to take when the wrapped program exits or daemonizes: "
           "exit (default), ignore, respawn",
           kind="choice", default="exit", choices=("exit", "ignore", "respawn"),
           metavar="MODE"),
    Option(("-6", "--prefer-ipv6"), "prefer_ipv6",
           "prefer IPv6 when resolving source_addr"),
    Option(("--libserver",), "libserver",
           "accepted for compatibility; this server always uses its gevent engine"),
    Option(("--target-config",), "target_config",
           "configuration file of 'token: host:port' lines, or a directory of them "
           "(DEPRECATED: use --token-plugin TokenFile --token-source FILE)",
           kind="str", metavar="FILE",
           path=True),
    Option(("--token-plugin",), "token_plugin",
           "use a Python class, usually one from websockify.token_plugins, such as "
           "TokenFile, to process tokens into host:port pairs (a bare name, or a "
           "dotted path such as mypackage.MyPlugin); no target is given then",
           kind="str", metavar="CLASS"),
    Option(("--token-source",), "token_source",
           "an argument to be passed to the token plugin on instantiation "
           "(a file, directory, URL or host, depending on the plugin)",
           kind="str", metavar="ARG"),
    Option(("--host-token",), "host_token",
           "use the host HTTP header as token instead of the token URL query parameter"),
    Option(("--auth-plugin",), "auth_plugin",
           "use a Python class, usually one from websockify.auth_plugins, such as "
           "BasicHTTPAuth, to determine if a connection is allowed",
           kind="str", metavar="CLASS"),
    Option(("--auth-source",), "auth_source",
           "an argument to be passed to the auth plugin on instantiation",
           kind="str", metavar="ARG"),
    Option(("--heartbeat",), "heartbeat",
           "send a ping to the client every INTERVAL seconds (0: never)",
           kind="float", default=0.0, metavar="INTERVAL",
           check=_non_negative),
    Option(("--heartbeat-timeout",), "heartbeat_timeout",
           "with --heartbeat, close a client that has not answered a ping within "
           "SECONDS, and log it (0: never)", kind="float", default=0.0, metavar="SECONDS",
           check=_non_negative),
    Option(("--log-file",), "log_file", "file where logs will be saved",
           kind="str", metavar="FILE",
           path=True),
    Option(("--syslog",), "syslog",
           "log to syslog server. SERVER can be local socket, such as /dev/log, "
           "or a UDP host:port pair.", kind="str", metavar="SERVER",
           parse=_parse_syslog),
    Option(("--legacy-syslog",), "legacy_syslog",
           "use the old syslog protocol instead of RFC 5424"),
    Option(("--file-only",), "file_only", "disable directory listings in web server"),
    # -- new in this implementation -------------------------------------
    Option(("--workers",), "workers",
           "number of worker processes (default: the number of CPUs)",
           kind="int", default=None, metavar="N",
           check=_at_least_one),
    Option(("--worker-connections",), "worker_connections",
           "most connections one worker holds at once (default: what its "
           "descriptor limit allows, two descriptors per session)",
           kind="int", default=None, metavar="N",
           check=_at_least_one),
    Option(("--graceful-timeout",), "graceful_timeout",
           "on SIGTERM or SIGHUP, seconds open sessions may take to end before "
           "they are closed with 1001", kind="float", default=30.0, metavar="SECONDS",
           check=_non_negative),
    Option(("--worker-timeout",), "worker_timeout",
           "a worker whose event loop has not reported for SECONDS is sent SIGABRT "
           "(its traceback is logged), then SIGKILL, and replaced (0: never)",
           kind="float", default=60.0, metavar="SECONDS",
           check=_non_negative),
    Option(("--pid-file",), "pid_file", "write the master's process id to FILE",
           kind="str", metavar="FILE",
           path=True),
    Option(("--connect-timeout",), "connect_timeout",
           "seconds to wait for the target to accept a connection (then 504)",
           kind="float", default=10.0, metavar="SECONDS",
           check=_positive),
    Option(("--echo",), "echo",
           "echo service: answer every WebSocket message with the same type and "
           "content instead of bridging to a target (to check wss:// or proxy setups)"),
    Option(("--handshake-timeout",), "handshake_timeout",
           "seconds a client has from connecting to completing its TLS and HTTP "
           "handshake before it is dropped", kind="float", default=10.0,
           metavar="SECONDS",
           check=_positive),
    Option(("--rebind-lib",), "rebind_lib",
           "the rebind library preloaded into a wrapped program to move its port "
           "(default: $WEBSOCKIFY_REBIND_LIB, else the one built with websockify)",
           kind="str", metavar="FILE",
           path=True),
    Option(("--trusted-proxy",), "trusted_proxy",
           "reverse proxies whose X-Forwarded-For or X-Real-IP header names the "
           "client in log lines: networks (CIDR), addresses, or 'unix' for a Unix "
           "listening socket; from anyone else these headers are ignored",
           kind="str", metavar="CIDR[,CIDR...]",
           parse=_parse_trusted),
    Option(("--tunnel-config",), "tunnel_config",
           "reverse tunnels: agents (websockify-agent) behind NAT connect to this server "
           "and users reach their services through it; FILE is TOML (ours, or "
           "reverse_websockify's config.toml); re-read on SIGHUP. With it, a target "
           "is optional", kind="str", metavar="FILE",
           path=True),
    Option(("--metrics",), "metrics",
           "serve Prometheus metrics at http://HOST:PORT/metrics and a health check at "
           "/healthz, from the master (HOST: 127.0.0.1 unless given; ':PORT' is every "
           "address)", kind="str", metavar="[HOST:]PORT",
           parse=_parse_metrics),
    Option(("--max-frame-size",), "max_frame_size",
           "largest WebSocket frame accepted from a client; larger ones are closed "
           "with 1009", kind="int", default=16 * 1024 * 1024, metavar="BYTES",
           check=_frame_size),
]

_BY_DEST = {opt.dest: opt for opt in OPTIONS}


def check_values(values: dict) -> None:
    """Validate option values in place (parsed, checked, paths absolute); UsageError if not."""
    for opt in OPTIONS:
        value = values.get(opt.dest)
        if value is None:
            continue
        if opt.parse is not None and isinstance(value, str):
            try:
                values[opt.dest] = value = opt.parse(value)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if opt.check is not None:
            problem = opt.check(value)
            if problem:
                raise UsageError("%s %s" % (opt.flag, problem))
    _check_combinations(values)
    if values["unix_listen_mode"] is None:
        values["unix_listen_mode"] = 0o600
    elif isinstance(values["unix_listen_mode"], str):
        try:
            values["unix_listen_mode"] = int(values["unix_listen_mode"], 8)
        except ValueError:
            raise UsageError("Error parsing listen unix socket mode") from None
    for opt in OPTIONS:
        if opt.path and values[opt.dest]:
            values[opt.dest] = os.path.abspath(values[opt.dest])


def _check_combinations(values: dict) -> None:
    """Options that need, or exclude, other options."""
    if values["heartbeat_timeout"] and not values["heartbeat"]:
        raise UsageError("--heartbeat-timeout needs --heartbeat")
    if values["target_config"] and values["token_plugin"]:
        raise UsageError("--target-config and --token-plugin cannot be used together "
                         "(--target-config FILE means --token-plugin TokenFile "
                         "--token-source FILE)")
    if values["token_source"] is not None and not values["token_plugin"]:
        raise UsageError("You must use --token-plugin to use --token-source")
    if values["host_token"] and not (values["token_plugin"] or values["target_config"]):
        raise UsageError("You must use --token-plugin to use --host-token")
    if values["auth_source"] is not None and not values["auth_plugin"]:
        raise UsageError("You must use --auth-plugin to use --auth-source")
    if values["web_auth"] and not values["auth_plugin"]:
        raise UsageError("--web-auth needs --auth-plugin")
    for dest, needs in (("ssl_target_cafile", "ssl_target"),
                        ("ssl_target_no_verify", "ssl_target")):
        if values[dest] and not values[needs]:
            raise UsageError("--%s needs --%s" % (dest.replace("_", "-"), needs.replace("_", "-")))
    if values["ssl_target_cafile"] and values["ssl_target_no_verify"]:
        raise UsageError("--ssl-target-cafile and --ssl-target-no-verify contradict each other")
    if values["legacy_syslog"] and not values["syslog"]:
        raise UsageError("--legacy-syslog needs --syslog")
    if values["web"] and not os.path.isdir(values["web"]):
        raise UsageError("--web: %s is not a directory" % values["web"])


def defaults() -> dict:
    """Every option's value when it is not given."""
    return {opt.dest: (opt.default if opt.kind != "flag" else False) for opt in OPTIONS}


@dataclass(frozen=True)
class Config:
    """Everything the master and workers are told to do; built once, never changed."""

    #: Option values by dest (read as attributes: config.heartbeat, config.web ...).
    options: Mapping[str, Any] = field(default_factory=dict)
    listen_host: str = ""
    listen_port: Optional[int] = None
    target_host: Optional[str] = None
    target_port: Optional[int] = None
    wrap_cmd: Optional[List[str]] = None
    #: Sockets systemd passed us (LISTEN_FDS); 0 when not socket-activated.
    listen_fds: int = 0
    #: With inetd: the descriptor of the listening socket (a library caller's
    #: ``listen_fd``); None means standard input.
    listen_fd: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(name)

    @classmethod
    def from_kwargs(cls, listen_host: str = "", listen_port: Optional[int] = None,
                    target_host: Optional[str] = None, target_port: Optional[int] = None,
                    wrap_cmd: Optional[Sequence[str]] = None, listen_fds: int = 0,
                    listen_fd: Optional[int] = None, **options) -> "Config":
        """A configuration from keyword arguments named like the options' dests.

        Unknown names are a TypeError; values are checked as on the command
        line (UsageError) and paths made absolute.
        """
        unknown = sorted(set(options) - set(_BY_DEST))
        if unknown:
            raise TypeError("unknown option(s): %s" % ", ".join(unknown))
        values = defaults()
        values.update({k: v for k, v in options.items() if v is not None})
        check_values(values)
        return cls(values, listen_host, listen_port, target_host, target_port,
                   list(wrap_cmd) if wrap_cmd is not None else None, listen_fds, listen_fd)

    def replace(self, **changes) -> "Config":
        return replace(self, **changes)

    @property
    def target_description(self) -> str:
        if self.echo:
            return "echo"
        if self.token_plugin or self.target_config:
            return "targets from --token-plugin %s" % (self.token_plugin or "TokenFile")
        if self.unix_target:
            return "unix:%s" % self.unix_target
        if self.tunnel_config and self.target_port is None:
            return "tunnel agents only (no target)"
        return format_host_port(self.target_host or "", self.target_port)

    @property
    def listen_description(self) -> str:
        if self.inetd:
            return "inetd"
        if self.unix_listen:
            return "unix:%s" % self.unix_listen
        if self.listen_fds:
            return "systemd socket"
        return format_host_port(self.listen_host or "", self.listen_port)
