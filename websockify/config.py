"""One declarative entry per command-line option.

The parser in cli.py, ``--help`` and the man page check are all derived
from ``OPTIONS``; adding an option here is the only way to add one.
"""

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

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

    @property
    def takes_value(self) -> bool:
        return self.kind != "flag"


def _cpu_count() -> int:
    return os.cpu_count() or 1



OPTIONS: List[Option] = [
    # -- websockify 0.13 -------------------------------------------------
    Option(("-v", "--verbose"), "verbose", "verbose messages"),
    Option(("--traffic",), "traffic", "per frame traffic"),
    Option(("--record",), "record", "record sessions to FILE.[session_number]",
           kind="str", metavar="FILE"),
    Option(("-D", "--daemon"), "daemon", "become a daemon (background process)"),
    Option(("--run-once",), "run_once",
           "handle a single WebSocket connection and exit"),
    Option(("--timeout",), "timeout",
           "stop accepting new connections TIMEOUT seconds after start, and exit "
           "when the open sessions have ended (0: never)",
           kind="float", default=0.0),
    Option(("--idle-timeout",), "idle_timeout",
           "exit after IDLE_TIMEOUT seconds with no open WebSocket session (0: never)",
           kind="float", default=0.0),
    Option(("--cert",), "cert", "SSL certificate file", kind="str",
           default="self.pem"),
    Option(("--key",), "key", "SSL key file (if separate from cert)", kind="str"),
    Option(("--key-password",), "key_password",
           "SSL key password (ps shows it: prefer a password file, or the "
           "WEBSOCKIFY_KEY_PASSWORD environment variable)", kind="str"),
    Option(("--key-password-file",), "key_password_file",
           "read the SSL key password from the first line of FILE", kind="str",
           metavar="FILE"),
    Option(("--ssl-only",), "ssl_only", "disallow non-encrypted client connections"),
    Option(("--ssl-target",), "ssl_target",
           "connect to SSL target as SSL client (the target's certificate is "
           "verified with the system CAs, and SNI is sent)"),
    Option(("--ssl-target-cafile",), "ssl_target_cafile",
           "with --ssl-target, verify the target's certificate with the CAs in FILE "
           "instead of the system CAs", kind="str", metavar="FILE"),
    Option(("--ssl-target-no-verify",), "ssl_target_no_verify",
           "with --ssl-target, do not verify the target's certificate (self-signed "
           "targets; a warning is logged)"),
    Option(("--verify-client",), "verify_client",
           "require encrypted client to present a valid certificate"),
    Option(("--cafile",), "cafile",
           "file of concatenated certificates of authorities trusted for validating "
           "clients (only effective with --verify-client); default: the system CAs",
           kind="str", metavar="FILE"),
    Option(("--ssl-version",), "ssl_version",
           "minimum TLS version to use (default, tlsv1_1, tlsv1_2, tlsv1_3)",
           kind="choice", default="default",
           choices=("default", "tlsv1_1", "tlsv1_2", "tlsv1_3")),
    Option(("--ssl-ciphers",), "ssl_ciphers",
           "list of ciphers allowed for connection (see `openssl ciphers`)",
           kind="str"),
    Option(("--unix-listen",), "unix_listen", "listen to unix socket",
           kind="str", metavar="FILE"),
    Option(("--unix-listen-mode",), "unix_listen_mode",
           "specify mode for unix socket (octal, defaults to 0600)",
           kind="str", metavar="MODE"),
    Option(("--unix-target",), "unix_target", "connect to unix socket target",
           kind="str", metavar="FILE"),
    Option(("--inetd",), "inetd", "inetd mode, receive listening socket from stdin"),
    Option(("--web",), "web", "run webserver on same port. Serve files from DIR.",
           kind="str", metavar="DIR"),
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
           kind="str", metavar="FILE"),
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
           kind="float", default=0.0, metavar="INTERVAL"),
    Option(("--heartbeat-timeout",), "heartbeat_timeout",
           "with --heartbeat, close a client that has not answered a ping within "
           "SECONDS, and log it (0: never)", kind="float", default=0.0, metavar="SECONDS"),
    Option(("--log-file",), "log_file", "file where logs will be saved",
           kind="str", metavar="FILE"),
    Option(("--syslog",), "syslog",
           "log to syslog server. SERVER can be local socket, such as /dev/log, "
           "or a UDP host:port pair.", kind="str", metavar="SERVER"),
    Option(("--legacy-syslog",), "legacy_syslog",
           "use the old syslog protocol instead of RFC 5424"),
    Option(("--file-only",), "file_only", "disable directory listings in web server"),
    # -- new in this implementation -------------------------------------
    Option(("--workers",), "workers",
           "number of worker processes (default: the number of CPUs)",
           kind="int", default=None, metavar="N"),
    Option(("--worker-connections",), "worker_connections",
           "most connections one worker holds at once (default: what its "
           "descriptor limit allows, two descriptors per session)",
           kind="int", default=None, metavar="N"),
    Option(("--graceful-timeout",), "graceful_timeout",
           "on SIGTERM or SIGHUP, seconds open sessions may take to end before "
           "they are closed with 1001", kind="float", default=30.0, metavar="SECONDS"),
    Option(("--worker-timeout",), "worker_timeout",
           "a worker whose event loop has not reported for SECONDS is sent SIGABRT "
           "(its traceback is logged), then SIGKILL, and replaced (0: never)",
           kind="float", default=60.0, metavar="SECONDS"),
    Option(("--pid-file",), "pid_file", "write the master's process id to FILE",
           kind="str", metavar="FILE"),
    Option(("--connect-timeout",), "connect_timeout",
           "seconds to wait for the target to accept a connection (then 504)",
           kind="float", default=10.0, metavar="SECONDS"),
    Option(("--echo",), "echo",
           "echo service: answer every WebSocket message with the same type and "
           "content instead of bridging to a target (to check wss:// or proxy setups)"),
    Option(("--handshake-timeout",), "handshake_timeout",
           "seconds a client has from connecting to completing its TLS and HTTP "
           "handshake before it is dropped", kind="float", default=10.0,
           metavar="SECONDS"),
    Option(("--rebind-lib",), "rebind_lib",
           "the rebind library preloaded into a wrapped program to move its port "
           "(default: $WEBSOCKIFY_REBIND_LIB, else the one built with websockify)",
           kind="str", metavar="FILE"),
    Option(("--trusted-proxy",), "trusted_proxy",
           "reverse proxies whose X-Forwarded-For or X-Real-IP header names the "
           "client in log lines: networks (CIDR), addresses, or 'unix' for a Unix "
           "listening socket; from anyone else these headers are ignored",
           kind="str", metavar="CIDR[,CIDR...]"),
    Option(("--max-frame-size",), "max_frame_size",
           "largest WebSocket frame accepted from a client; larger ones are closed "
           "with 1009", kind="int", default=16 * 1024 * 1024, metavar="BYTES"),
]

OPTION_BY_DEST = {opt.dest: opt for opt in OPTIONS}


@dataclass
class Settings:
    """Everything the master and workers need, resolved from the command line."""

    listen_host: str = ""
    listen_port: Optional[int] = None
    target_host: Optional[str] = None
    target_port: Optional[int] = None
    wrap_cmd: Optional[List[str]] = None
    #: Sockets systemd passed us (LISTEN_FDS); 0 when not socket-activated.
    listen_fds: int = 0
    options: dict = field(default_factory=dict)
    #: The loaded token plugin (plugins.tokens.TokenResolver), built by the
    #: master before workers are forked and rebuilt on SIGHUP.
    tokens: Any = None
    #: The loaded auth plugin (plugins.auth.Authenticator), built like ``tokens``.
    auth: Any = None
    #: The listener's ssl.SSLContext (None: plain only), built by the master.
    tls: Any = None
    #: tls.TargetContexts for --ssl-target, built by the master.
    target_tls: Any = None

    def __getattr__(self, name: str) -> Any:
        # Option values read as attributes: settings.heartbeat, settings.web ...
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        raise AttributeError(name)

    @property
    def target_description(self) -> str:
        if self.echo:
            return "echo"
        if self.token_plugin or self.target_config:
            return "targets from --token-plugin %s" % (self.token_plugin or "TokenFile")
        if self.unix_target:
            return "unix:%s" % self.unix_target
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
