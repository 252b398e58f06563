"""websockify as a library: 0.13's keyword arguments -> a Config, and running it.

``WebSocketProxy(**kwargs)`` (websockify.websocketproxy) takes exactly
0.13's keyword arguments, tolerating what embedders pass (ports as
strings, ``None``/``False`` for unset paths, plugins as objects or names);
this module turns them into our immutable Config and the plugin objects the
Runtime carries, sets 0.13's attributes on the server object (what hooks
read as ``self.server``), and runs the master in the caller's process
(``serve``).  The workers are forked from it, so the objects it holds are
theirs as they were at the start.
"""

import logging
import ssl
import sys
import threading
import time
from typing import Any, Dict, Optional, Sequence, Tuple

from websockify.config import Config
from websockify.errors import EXIT_USAGE, UsageError

log = logging.getLogger("websockify")

#: 0.13's WebSockifyServer.__init__ parameters after RequestHandlerClass, in order.
SERVER_KEYWORDS: Tuple[Tuple[str, Any], ...] = (
    ("listen_fd", None), ("listen_host", ""), ("listen_port", None), ("source_is_ipv6", False),
    ("verbose", False), ("cert", ""), ("key", ""), ("key_password", None), ("ssl_only", None),
    ("verify_client", False), ("cafile", None), ("daemon", False), ("record", ""),
    ("web", ""), ("web_auth", False), ("file_only", False), ("run_once", False),
    ("timeout", 0), ("idle_timeout", 0), ("traffic", False), ("tcp_keepalive", True),
    ("tcp_keepcnt", None), ("tcp_keepidle", None), ("tcp_keepintvl", None),
    ("ssl_ciphers", None), ("ssl_options", 0), ("unix_listen", None),
    ("unix_listen_mode", None))

#: What 0.13's WebSocketProxy.__init__ takes before passing the rest on.
PROXY_KEYWORDS: Tuple[Tuple[str, Any], ...] = (
    ("target_host", None), ("target_port", None), ("wrap_cmd", None), ("wrap_mode", None),
    ("unix_target", None), ("ssl_target", None), ("heartbeat", None), ("token_plugin", None),
    ("host_token", None), ("auth_plugin", None))

#: Ours: the sources of plugins given by name (0.13 takes plugin objects only).
SOURCE_KEYWORDS: Tuple[Tuple[str, Any], ...] = (("token_source", None), ("auth_source", None))

KEYWORDS: Dict[str, Any] = dict(SERVER_KEYWORDS + PROXY_KEYWORDS + SOURCE_KEYWORDS)

#: Where 0.13 keeps a keyword's value on the server under another name.
_ATTRIBUTE_OF = {"source_is_ipv6": "prefer_ipv6"}

_NOT_A_PORT = object()
_running = set()
_running_lock = threading.Lock()


def bind_keywords(caller: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """0.13's arguments by name with their defaults; a TypeError names any other one."""
    values = dict(KEYWORDS)
    if len(args) > len(SERVER_KEYWORDS):
        raise TypeError("%s() takes at most %d positional arguments after RequestHandlerClass "
                        "(%d given)" % (caller, len(SERVER_KEYWORDS), len(args)))
    for (name, _), value in zip(SERVER_KEYWORDS, args):
        values[name] = value
    for name, value in kwargs.items():
        if name not in KEYWORDS:
            raise TypeError("%s() got an unexpected keyword argument %r" % (caller, name))
        if name in dict(SERVER_KEYWORDS[:len(args)]):
            raise TypeError("%s() got multiple values for argument %r" % (caller, name))
        values[name] = value
    return values


def _port(value: Any) -> Any:
    """An int port from an int or a string of digits; _NOT_A_PORT otherwise (None stays)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return _NOT_A_PORT
    try:
        port = int(value)
    except (TypeError, ValueError):
        return _NOT_A_PORT
    return port if 0 <= port <= 65535 else _NOT_A_PORT


def ssl_version_of(options: Any) -> str:
    """0.13's ``ssl_options`` (select_ssl_version's OP_NO_* bits) -> our --ssl-version."""
    try:
        options = int(options or 0)
    except (TypeError, ValueError):
        return "default"
    for flag, version in (("OP_NO_TLSv1_2", "tlsv1_3"), ("OP_NO_TLSv1_1", "tlsv1_2"),
                          ("OP_NO_TLSv1", "tlsv1_1")):
        if options & getattr(ssl, flag, 0):
            return version
    return "default"


def plugin_name(plugin: Any) -> str:
    """How a plugin object is named in log lines: its class, module-qualified."""
    cls = type(plugin)
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def _text(value: Any) -> Optional[str]:
    """A path or string option: None, False and '' all mean unset."""
    if value is None or value is False or value == "":
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def config_of(values: Dict[str, Any]) -> Tuple[Config, Any, Any]:
    """(Config, token plugin object or None, auth plugin object or None) for 0.13's arguments.

    A value that cannot work is a ValueError saying which argument.
    """
    listen_port = _port(values["listen_port"])
    if listen_port is _NOT_A_PORT:
        raise ValueError("listen_port must be a port number, not %r" % (values["listen_port"],))
    listen_fd = values["listen_fd"]
    if listen_port is None and listen_fd is None and not values["unix_listen"]:
        raise ValueError("listen_port is needed (or unix_listen, or listen_fd)")
    target_port = _port(values["target_port"])
    options: Dict[str, Any] = {}
    token, token_object = values["token_plugin"], None
    if token and not isinstance(token, str):
        token_object, token = token, plugin_name(token)
    auth, auth_object = values["auth_plugin"], None
    if auth and not isinstance(auth, str):
        auth_object, auth = auth, plugin_name(auth)
    options.update(
        verbose=bool(values["verbose"]), traffic=bool(values["traffic"]),
        record=_text(values["record"]), daemon=bool(values["daemon"]),
        run_once=bool(values["run_once"]),
        timeout=float(values["timeout"] or 0), idle_timeout=float(values["idle_timeout"] or 0),
        # 0.13's library default is no certificate (the command line's is self.pem).
        cert=_text(values["cert"]) or "", key=_text(values["key"]),
        key_password=_text(values["key_password"]), ssl_only=bool(values["ssl_only"]),
        ssl_target=bool(values["ssl_target"]), verify_client=bool(values["verify_client"]),
        cafile=_text(values["cafile"]), ssl_version=ssl_version_of(values["ssl_options"]),
        ssl_ciphers=_text(values["ssl_ciphers"]), unix_listen=_text(values["unix_listen"]),
        unix_listen_mode=values["unix_listen_mode"],
        unix_target=_text(values["unix_target"]), inetd=listen_fd is not None,
        web=_text(values["web"]), web_auth=bool(values["web_auth"]),
        wrap_mode=values["wrap_mode"] or "exit", prefer_ipv6=bool(values["source_is_ipv6"]),
        token_plugin=token or None, token_source=_text(values["token_source"]),
        host_token=bool(values["host_token"]), auth_plugin=auth or None,
        auth_source=_text(values["auth_source"]),
        heartbeat=float(values["heartbeat"] or 0), file_only=bool(values["file_only"]))
    wrap_cmd = values["wrap_cmd"]
    try:
        config = Config.from_kwargs(
            listen_host=_text(values["listen_host"]) or "", listen_port=listen_port,
            target_host=_text(values["target_host"]),
            target_port=None if target_port is _NOT_A_PORT else target_port,
            wrap_cmd=list(wrap_cmd) if wrap_cmd else None,
            listen_fd=int(listen_fd) if listen_fd is not None else None, **options)
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    return config, token_object, auth_object


def set_attributes(server: Any, handler_class: type, config: Config,
                   token_object: Any = None, auth_object: Any = None) -> None:
    """0.13's attributes on the server object, from the Config (what hooks read)."""
    from websockify.websocketproxy import select_ssl_version
    server.RequestHandlerClass = handler_class
    server.listen_fd = (config.listen_fd if config.listen_fd is not None else 0) \
        if config.inetd else None
    server.listen_host = config.listen_host
    server.listen_port = config.listen_port
    server.prefer_ipv6 = bool(config.prefer_ipv6)
    for name in ("verbose", "daemon", "run_once", "timeout", "idle_timeout", "traffic",
                 "file_only", "web_auth", "ssl_only", "verify_client", "key_password",
                 "ssl_ciphers", "unix_listen", "unix_listen_mode", "unix_target",
                 "wrap_mode", "host_token", "heartbeat"):
        setattr(server, name, getattr(config, name))
    server.ssl_target = bool(config.ssl_target)
    server.cert = config.cert or ""
    server.key = config.key or None
    server.cafile = config.cafile or ""
    server.web = config.web or ""
    server.record = config.record or ""
    server.only_upgrade = not config.web
    server.ssl_options = select_ssl_version(config.ssl_version)
    server.target_host = config.target_host
    server.target_port = config.target_port
    server.wrap_cmd = config.wrap_cmd
    server.token_plugin = token_object if token_object is not None else config.token_plugin
    server.auth_plugin = auth_object if auth_object is not None else config.auth_plugin
    server.tcp_keepalive = True
    server.tcp_keepcnt = server.tcp_keepidle = server.tcp_keepintvl = None
    server.launch_time = time.time()
    server.ws_connection = False
    server.handler_id = 1
    server.terminating = False
    server.logger = server.get_logger()
    server._config = config
    server._token_object = token_object
    server._auth_object = auth_object
    server._master = None
    server._from_keywords = False


def configure(server: Any, handler_class: type, values: Dict[str, Any]) -> None:
    """``WebSocketProxy.__init__``: 0.13's arguments -> the Config and the attributes."""
    config, token_object, auth_object = config_of(values)
    set_attributes(server, handler_class, config, token_object, auth_object)
    # What 0.13 keeps as given, where our Config holds the usable form.
    if _port(values["target_port"]) is _NOT_A_PORT:
        server.target_port = values["target_port"]
    server.ssl_options = values["ssl_options"] or server.ssl_options
    for name in ("tcp_keepalive", "tcp_keepcnt", "tcp_keepidle", "tcp_keepintvl"):
        setattr(server, name, values[name])
    server._sources = {name: values[name] for name, _ in SOURCE_KEYWORDS}
    server._from_keywords = True


def values_of(server: Any) -> Dict[str, Any]:
    """0.13's arguments as the server's attributes say now (a caller may have set some)."""
    values = {}
    for name, default in KEYWORDS.items():
        if name in server._sources:
            values[name] = server._sources[name]
        else:
            values[name] = getattr(server, _ATTRIBUTE_OF.get(name, name), default)
    return values


def check_handler_class(handler_class: Any) -> None:
    """A TypeError unless ``handler_class`` is a ProxyRequestHandler subclass."""
    from websockify.websocketproxy import ProxyRequestHandler
    if not (isinstance(handler_class, type) and issubclass(handler_class, ProxyRequestHandler)):
        raise TypeError("RequestHandlerClass must be websockify.ProxyRequestHandler or a "
                        "subclass of it, not %r" % (handler_class,))


def refuse_eventlet() -> None:
    """A RuntimeError in a process eventlet has monkey-patched (our workers are gevent's)."""
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is None:
        return
    try:
        patched = any(patcher.is_monkey_patched(name)
                      for name in ("socket", "select", "thread", "os", "time"))
    except Exception:
        patched = False
    if patched:
        raise RuntimeError(
            "websockify cannot serve from a process monkey-patched by eventlet: its workers "
            "are forked gevent processes. Run the websockify command line instead "
            "(websockify [options] [source_addr:]source_port target_addr:target_port, "
            "with a --token-plugin or --auth-plugin for what the embedding did).")


def handler_hooks(server: Any):
    """The Runtime's HandlerHooks when the server's handler class overrides a hook, else None."""
    from websockify.runtime import HandlerHooks
    from websockify.websocketproxy import overridden_hooks
    overridden = overridden_hooks(server.RequestHandlerClass)
    if not overridden:
        return None
    return HandlerHooks(server.RequestHandlerClass, server, tuple(overridden))


def serve(server: Any, library: bool = True) -> int:
    """``start_server()``: run the master and its workers until stopped; the exit status."""
    key = id(server)
    with _running_lock:
        if key in _running:
            raise RuntimeError("start_server() is already running for this %s"
                               % type(server).__name__)
        _running.add(key)
    try:
        refuse_eventlet()
        from websockify.arbiter.master import Master
        from websockify.runtime import Runtime
        config, token_object, auth_object = server._config, server._token_object, \
            server._auth_object
        if server._from_keywords:
            # 0.13 read its settings from the attributes when it started.
            check_handler_class(server.RequestHandlerClass)
            config, token_object, auth_object = config_of(values_of(server))
        runtime = Runtime(token_object=token_object, auth_object=auth_object,
                          hooks=handler_hooks(server))
        master = Master(config, runtime, library=library)
        server._master = master
        return master.run()
    finally:
        server._master = None
        with _running_lock:
            _running.discard(key)


def terminate(server: Any) -> None:
    """Stop a running ``start_server()`` gracefully, from any thread (as SIGTERM does)."""
    master = getattr(server, "_master", None)
    if master is not None:
        master.request_stop()


def run_command_line(handler_class: Optional[type] = None) -> int:
    """``websockify_init()``: ``sys.argv`` as the command line, run with ``handler_class``."""
    from websockify import cli
    from websockify.websocketproxy import ProxyRequestHandler, WebSocketProxy
    try:
        config = cli.parse_args(list(sys.argv[1:]))
    except UsageError as exc:
        cli.print_usage_error(exc)
        return EXIT_USAGE
    server = WebSocketProxy.__new__(WebSocketProxy)
    set_attributes(server, handler_class or ProxyRequestHandler, config)
    return serve(server, library=False)
