"""argv -> Config, with websockify 0.13's spelling; no behaviour here."""

import argparse
import os
import sys
from typing import List, Optional, Tuple

from websockify import __version__, addr
from websockify.addr import AddressError, parse_host_port
from websockify.config import OPTIONS, Config, check_values
from websockify.errors import EXIT_USAGE, UsageError
from websockify.net.sockets import systemd_listen_fds

USAGE = """
    %(prog)s [options] [source_addr:]source_port target_addr:target_port
    %(prog)s [options] --token-plugin=CLASS [source_addr:]source_port
    %(prog)s [options] --unix-target=FILE [source_addr:]source_port
    %(prog)s [options] [source_addr:]source_port -- WRAP_COMMAND_LINE
    %(prog)s [options] --echo [source_addr:]source_port
    %(prog)s [options] --tunnel-config=FILE [source_addr:]source_port [target_addr:target_port]"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="websockify", usage=USAGE.lstrip("\n"),
        description="WebSockets to TCP socket bridge.")
    parser.add_argument("--version", action="version",
                        version="websockify %s" % __version__)
    for opt in OPTIONS:
        kwargs = {"dest": opt.dest, "help": opt.help}
        if opt.kind == "flag":
            kwargs["action"] = "store_true"
        else:
            # Defaults are applied after parsing so that an explicitly given
            # option can be told from its default.
            kwargs["default"] = None
            if opt.metavar:
                kwargs["metavar"] = opt.metavar
            if opt.kind == "int":
                kwargs["type"] = int
            elif opt.kind == "float":
                kwargs["type"] = float
            elif opt.kind == "choice":
                kwargs["choices"] = list(opt.choices)
            if opt.default is not None and opt.kind != "flag":
                kwargs["help"] += " (default: %s)" % (opt.default,)
        parser.add_argument(*opt.flags, **kwargs)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    return parser


def _split_address(text: str, what: str) -> Tuple[str, int]:
    """The listen address (``[host:]port``) or the target (``host:port``), by addr's rules."""
    try:
        host, port = parse_host_port(text, listen=what == "listen")
    except AddressError as exc:
        if exc.kind == addr.PORT:
            raise UsageError("Error parsing %s port: %r" % (what, exc.value)) from None
        if exc.kind == addr.RANGE:
            raise UsageError("%s port out of range: %d" % (what.capitalize(), exc.value)) from None
        raise UsageError("Error parsing %s: %r" % ("target" if what == "target"
                                                    else what + " address", text)) from None
    return host, int(port)


def _join_negative_values(argv: List[str]) -> List[str]:
    """``--timeout -1`` -> ``--timeout=-1``.

    The short option ``-6`` makes argparse read every ``-N`` as an option,
    where optparse (websockify 0.13) took it as the value.
    """
    takes_value = {flag for opt in OPTIONS if opt.takes_value for flag in opt.flags}
    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if (arg in takes_value and i + 1 < len(argv)
                and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit()):
            out.append("%s=%s" % (arg, argv[i + 1]))
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def parse_args(argv: List[str]) -> Config:
    """Parse ``argv`` (without the program name) into a Config."""
    wrap_cmd: Optional[List[str]] = None
    if "--" in argv:
        cut = argv.index("--")
        argv, wrap_cmd = argv[:cut], argv[cut + 1:]
        if not wrap_cmd:
            raise UsageError("'--' must be followed by the command line to wrap")
    parser = build_parser()
    namespace = parser.parse_args(_join_negative_values(argv))
    values = vars(namespace)
    args: List[str] = values.pop("args")

    for opt in OPTIONS:
        if values.get(opt.dest) is None:
            values[opt.dest] = opt.default if opt.kind != "flag" else False

    check_values(values)
    where = {}

    tokens = values["token_plugin"] or values["target_config"]
    if values["inetd"] or values["unix_listen"]:
        if values["inetd"] and values["unix_listen"]:
            raise UsageError("--inetd and --unix-listen cannot be used together")
    else:
        where["listen_fds"] = listen_fds = systemd_listen_fds()
        # Under socket activation the listen address may be left out (one
        # command line serves both ways); when given, it is not used.
        targets = 0 if (values["echo"] or values["unix_target"] or tokens
                        or values["tunnel_config"]) else 1
        if not (listen_fds and len(args) <= targets):
            if not args:
                raise UsageError("Too few arguments")
            where["listen_host"], where["listen_port"] = _split_address(args.pop(0), "listen")

    if wrap_cmd is not None:
        _check_wrap(values, tokens)
        # The daemon changes directory: a relative program path must still work.
        if "/" in wrap_cmd[0]:
            wrap_cmd[0] = os.path.abspath(wrap_cmd[0])
    elif values["echo"]:
        if values["unix_target"]:
            raise UsageError("--echo and --unix-target cannot be used together")
        if tokens:
            raise UsageError("--echo and a token plugin cannot be used together")
    elif values["unix_target"]:
        if tokens:
            raise UsageError("--unix-target and a token plugin cannot be used together")
    elif tokens:
        if args:
            raise UsageError("a target (%s) cannot be given with a token plugin: the "
                             "token picks the target" % args[0])
    elif args or not values["tunnel_config"]:
        # --tunnel-config alone needs no target: users reach the tunnel agents.
        if not args:
            raise UsageError("Too few arguments")
        where["target_host"], where["target_port"] = _split_address(args.pop(0), "target")
    if args:
        raise UsageError("Too many arguments")
    return Config(values, wrap_cmd=wrap_cmd, **where)


def _check_wrap(values: dict, tokens: Optional[str]) -> None:
    """A wrapped program is the target: nothing else may name one."""
    for what, given in (("--echo", values["echo"]), ("--unix-target", values["unix_target"]),
                        ("a token plugin", tokens)):
        if given:
            raise UsageError("%s cannot be used with a wrapped program (the program "
                             "is the target)" % what)
    if values["unix_listen"]:
        raise UsageError("--unix-listen cannot be used with a wrapped program (its "
                         "TCP port is moved off the port websockify listens on)")


def print_usage_error(exc: UsageError) -> None:
    sys.stderr.write("%s\nwebsockify: error: %s\n" % (
        USAGE.strip("\n").replace("%(prog)s", "websockify"), exc))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_args(argv)
    except UsageError as exc:
        print_usage_error(exc)
        return EXIT_USAGE
    from websockify.arbiter.master import Master
    return Master(config).run()
