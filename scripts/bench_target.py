#!/usr/bin/env python3
"""TCP target for scripts/bench (stdlib only).

Usage: bench_target.py MODE [BYTES] [--port PORT]

Modes:
  echo          echo every byte back on every connection (epoll loop, holds
                as many connections as the descriptor limit allows)
  source BYTES  on each connection send BYTES as fast as possible, then close
  sink BYTES    on each connection count received bytes; once BYTES have
                arrived send a single b"D" back, then read until EOF

It listens on 127.0.0.1 (port 0 = any free port unless --port is given) and
prints "PORT <n>" on stdout once it is listening.  It stops on SIGTERM/SIGINT.
"""

import errno
import os
import resource
import select
import signal
import socket
import sys
import threading

CHUNK = 1 << 20          # source send buffer / sink recv buffer
ECHO_READ = 65536


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def listen(port):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(4096)
    return ls


def announce(ls):
    sys.stdout.write("PORT %d\n" % ls.getsockname()[1])
    sys.stdout.flush()


# --------------------------------------------------------------------------
# echo: one epoll loop, level triggered
# --------------------------------------------------------------------------

def run_echo(ls):
    ls.setblocking(False)
    ep = select.epoll()
    lfd = ls.fileno()
    ep.register(lfd, select.EPOLLIN)
    conns = {}      # fd -> socket
    pending = {}    # fd -> bytes not yet echoed
    IN = select.EPOLLIN
    OUT = select.EPOLLOUT
    ERRMASK = select.EPOLLERR | select.EPOLLHUP

    def drop(fd):
        s = conns.pop(fd, None)
        pending.pop(fd, None)
        if s is not None:
            try:
                ep.unregister(fd)
            except OSError:
                pass
            s.close()

    while True:
        try:
            events = ep.poll(1.0, 1024)
        except InterruptedError:
            continue
        for fd, ev in events:
            if fd == lfd:
                for _ in range(256):
                    try:
                        s, _addr = ls.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE):
                            break
                        raise
                    s.setblocking(False)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[s.fileno()] = s
                    ep.register(s.fileno(), IN)
                continue
            s = conns.get(fd)
            if s is None:
                continue
            if ev & OUT:
                data = pending[fd]
                try:
                    n = s.send(data)
                except BlockingIOError:
                    continue
                except OSError:
                    drop(fd)
                    continue
                if n < len(data):
                    pending[fd] = data[n:]
                else:
                    del pending[fd]
                    ep.modify(fd, IN)
                continue
            if ev & (IN | ERRMASK):
                try:
                    data = s.recv(ECHO_READ)
                except BlockingIOError:
                    continue
                except OSError:
                    drop(fd)
                    continue
                if not data:
                    drop(fd)
                    continue
                try:
                    n = s.send(data)
                except BlockingIOError:
                    n = 0
                except OSError:
                    drop(fd)
                    continue
                if n < len(data):
                    pending[fd] = data[n:]
                    ep.modify(fd, OUT)


# --------------------------------------------------------------------------
# source / sink: a thread per connection (they are used with one session)
# --------------------------------------------------------------------------

def source_conn(s, total):
    buf = memoryview(bytes(range(256)) * (CHUNK // 256))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    except OSError:
        pass
    try:
        left = total
        while left >= CHUNK:
            s.sendall(buf)
            left -= CHUNK
        if left:
            s.sendall(buf[:left])
        s.shutdown(socket.SHUT_WR)
        # wait for the peer to go away so nothing is lost by an early RST
        s.settimeout(60)
        while s.recv(65536):
            pass
    except OSError:
        pass
    finally:
        s.close()


def sink_conn(s, total):
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    got = 0
    told = False
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    except OSError:
        pass
    try:
        while True:
            n = s.recv_into(mv)
            if not n:
                break
            got += n
            if not told and got >= total:
                s.sendall(b"D")
                told = True
    except OSError:
        pass
    finally:
        s.close()


def run_threaded(ls, handler, total):
    while True:
        try:
            s, _addr = ls.accept()
        except InterruptedError:
            continue
        t = threading.Thread(target=handler, args=(s, total), daemon=True)
        t.start()


def main(argv):
    args = list(argv)
    port = 0
    if "--port" in args:
        i = args.index("--port")
        port = int(args[i + 1])
        del args[i:i + 2]
    if not args or args[0] not in ("echo", "source", "sink"):
        sys.stderr.write(__doc__)
        return 2
    mode = args[0]
    total = 0
    if mode in ("source", "sink"):
        if len(args) < 2:
            sys.stderr.write("%s needs BYTES\n" % mode)
            return 2
        total = int(args[1])

    raise_nofile()

    def on_term(signum, frame):
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    ls = listen(port)
    announce(ls)
    if mode == "echo":
        run_echo(ls)
    elif mode == "source":
        run_threaded(ls, source_conn, total)
    else:
        run_threaded(ls, sink_conn, total)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
