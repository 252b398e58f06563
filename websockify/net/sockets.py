"""Listening sockets (TCP, IPv6, Unix, inetd, systemd socket activation), socket
options, descriptor limits.

Used by the master before forking; nothing here imports gevent.
"""

import logging
import os
import resource
import socket
import stat
from typing import Mapping, Optional

from websockify.addr import format_host_port

log = logging.getLogger("websockify")

BACKLOG = 1024


class ListenError(OSError):
    """The listening socket could not be opened (the master exits with EXIT_LISTEN)."""


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def tune_stream(sock: socket.socket) -> None:
    """TCP_NODELAY and keepalive, as websockify sets on both legs."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            pass


def tcp_listener(host: str, port: int, prefer_ipv6: bool = False) -> socket.socket:
    """Bind one address: the first that ``host`` resolves to (IPv6 first with -6)."""
    family = socket.AF_UNSPEC
    if not host:
        host = "::" if prefer_ipv6 else "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                   socket.IPPROTO_TCP, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError("cannot resolve listen address %r: %s" % (host, exc)) from None
    infos.sort(key=lambda info: info[0] != (socket.AF_INET6 if prefer_ipv6 else socket.AF_INET))
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit TCP_NODELAY and keepalive from the listener.
        tune_stream(sock)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError("cannot listen on %s port %d: %s"
                          % (host, port, exc.strerror or exc)) from None
    sock.setblocking(False)
    return sock


def unix_listener(path: str, mode: int) -> socket.socket:
    """Bind a Unix socket at ``path`` (a stale socket file is replaced)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ListenError("cannot replace %s: %s" % (path, exc.strerror)) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError("cannot listen on unix socket %s: %s"
                          % (path, exc.strerror or exc)) from None
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock


def _adopt_listener(fd: int, what: str, duplicate: bool) -> socket.socket:
    """A listening socket we inherited on ``fd`` (checked to be one)."""
    try:
        sock = socket.socket(fileno=os.dup(fd) if duplicate else fd)
    except OSError as exc:
        raise ListenError("%s: descriptor %d is not a socket: %s"
                          % (what, fd, exc.strerror or exc)) from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if not listening or sock.type != socket.SOCK_STREAM:
        if duplicate:
            sock.close()
        else:
            sock.detach()
        raise ListenError("%s: descriptor %d is not a listening stream socket" % (what, fd))
    # Not for the wrapped program or anything else we start.
    sock.set_inheritable(False)
    tune_stream(sock)
    sock.setblocking(False)
    return sock


def inetd_listener(fd: int = 0) -> socket.socket:
    """The listening socket inetd (wait mode) handed us on ``fd``."""
    return _adopt_listener(fd, "--inetd", duplicate=True)


# -- systemd socket activation (sd_listen_fds(3)) ---------------------------------

SD_LISTEN_FDS_START = 3
ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def systemd_listen_fds(environ: Optional[Mapping[str, str]] = None) -> int:
    """How many sockets systemd passed to this very process (0: none).

    LISTEN_PID guards against variables inherited from a parent that was
    itself socket-activated.
    """
    environ = os.environ if environ is None else environ
    try:
        pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return 0
    return count if pid == os.getpid() and count > 0 else 0


def forget_activation_environment() -> None:
    """Workers, wrapped programs and plugins' children must not take the
    variables for themselves."""
    for name in ACTIVATION_VARIABLES:
        os.environ.pop(name, None)


def activated_listener(count: int) -> socket.socket:
    """The first socket systemd passed (fd 3); the others are closed."""
    sock = _adopt_listener(SD_LISTEN_FDS_START, "socket activation", duplicate=False)
    if count > 1:
        log.warning("systemd passed %d sockets; only the first (descriptor %d) is used",
                    count, SD_LISTEN_FDS_START)
        os.closerange(SD_LISTEN_FDS_START + 1, SD_LISTEN_FDS_START + count)
    return sock


def open_listener(config) -> socket.socket:
    forget_activation_environment()
    if config.inetd:
        return inetd_listener(0 if config.listen_fd is None else config.listen_fd)
    if config.unix_listen:
        return unix_listener(config.unix_listen, config.unix_listen_mode)
    if config.listen_fds:
        return activated_listener(config.listen_fds)
    return tcp_listener(config.listen_host, config.listen_port,
                        config.prefer_ipv6)


def describe_listener(sock: socket.socket) -> str:
    try:
        address = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(address, tuple):
        return format_host_port(address[0], address[1])
    return "unix:%s" % (address or "?")


def unlink_unix_listener(path: Optional[str]) -> None:
    if not path:
        return
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
