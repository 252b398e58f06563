#!/usr/bin/env python3
"""The HTTP service behind the tunnels in scripts/bench's HTTP phase: one epoll loop, keep-alive.

Usage: bench_http_service.py FILE SMALL   (prints "PORT n" once listening on 127.0.0.1)

  GET /big     the whole of FILE, with Content-Length, sent by sendfile(2)
  GET /check   the first min(16 MiB, size) bytes of FILE (verified by the bench)
  GET /small   SMALL bytes
  anything else: 404

Any prefix before the last path segment is ignored (a tunnel may leave its
own), and so is a query.  Requests on one connection are answered in order;
"Connection: close" or HTTP/1.0 closes after the answer, which then says so.
It stops on SIGTERM.
"""

import os
import select
import socket
import sys

CHECK_SIZE = 16 << 20
MAX_HEAD = 65536
CLOSE = b"Connection: close\r\n"


def answers(status, length, body=b""):
    """The answer's bytes kept open and closing (which says so, RFC 9112 9.6)."""
    head = (b"HTTP/1.1 %s\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n" % (status, length))
    return head + b"\r\n" + body, head + CLOSE + b"\r\n" + body


class Conn:
    __slots__ = ("sock", "inbuf", "out", "file_off", "file_left", "close_after")

    def __init__(self, sock):
        self.sock = sock
        self.inbuf = bytearray()
        self.out = None             # memoryview of head bytes still to send
        self.file_off = 0
        self.file_left = 0
        self.close_after = False


class Service:
    def __init__(self, path, small):
        self.file_fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.file_fd).st_size
        body = (b"0123456789abcdef" * (small // 16 + 1))[:small]
        check = min(CHECK_SIZE, size)
        # path -> ((bytes sent from memory kept open, closing), bytes then sent from FILE)
        self.routes = {b"big": (answers(b"200 OK", size), size),
                       b"check": (answers(b"200 OK", check), check),
                       b"small": (answers(b"200 OK", small, body), 0)}
        self.not_found = (answers(b"404 Not Found", 0), 0)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(self.listener.fileno(), select.EPOLLIN)
        self.conns = {}

    def run(self):
        lfd = self.listener.fileno()
        conns = self.conns
        while True:
            for fd, events in self.ep.poll():
                if fd == lfd:
                    self.accept()
                    continue
                conn = conns.get(fd)
                if conn is None:
                    continue
                if conn.out is not None or conn.file_left:
                    if self.flush(conn) and conn.sock.fileno() >= 0:
                        self.ep.modify(fd, select.EPOLLIN)
                        self.serve(conn)
                else:
                    self.read(conn)

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[sock.fileno()] = Conn(sock)
            self.ep.register(sock.fileno(), select.EPOLLIN)

    def close(self, conn):
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.ep.unregister(conn.sock.fileno())
        except (OSError, ValueError):
            pass
        conn.sock.close()

    def read(self, conn):
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        conn.inbuf += data
        self.serve(conn)

    def serve(self, conn):
        """Answer the requests waiting in conn.inbuf, one after another."""
        while conn.out is None and not conn.file_left:
            end = conn.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.inbuf) > MAX_HEAD:
                    self.close(conn)
                return
            request = bytes(conn.inbuf[:end])
            del conn.inbuf[:end + 4]
            line, _, headers = request.partition(b"\r\n")
            parts = line.split(b" ")
            if len(parts) != 3:
                self.close(conn)
                return
            method, target, version = parts
            name = target.split(b"?", 1)[0].rstrip(b"/").rsplit(b"/", 1)[-1]
            route = self.routes.get(name) if method == b"GET" else None
            memory, from_file = route or self.not_found
            lowered = headers.lower()
            conn.close_after = (b"connection: close" in lowered or
                                (version == b"HTTP/1.0" and b"keep-alive" not in lowered))
            conn.out = memoryview(memory[conn.close_after])
            conn.file_off = 0
            conn.file_left = from_file
            if not self.flush(conn):
                self.ep.modify(conn.sock.fileno(), select.EPOLLOUT)
                return
            if conn.sock.fileno() < 0:
                return

    def flush(self, conn):
        """Send what is pending; True when all of it went (the connection may then be closed)."""
        sock = conn.sock
        try:
            while conn.out is not None:
                sent = sock.send(conn.out)
                conn.out = conn.out[sent:] if sent < len(conn.out) else None
            while conn.file_left:
                sent = os.sendfile(sock.fileno(), self.file_fd, conn.file_off, conn.file_left)
                if not sent:
                    raise OSError("sendfile sent nothing")
                conn.file_off += sent
                conn.file_left -= sent
        except BlockingIOError:
            return False
        except OSError:
            self.close(conn)
            conn.out, conn.file_left = None, 0
            return True
        if conn.close_after:
            self.close(conn)
        return True


def main(argv):
    service = Service(argv[0], int(argv[1]))
    sys.stdout.write("PORT %d\n" % service.listener.getsockname()[1])
    sys.stdout.flush()
    service.run()


if __name__ == "__main__":
    main(sys.argv[1:])
