#!/usr/bin/env python3
"""A bare two-hop relay for scripts/bench's ceiling phase: the least work any tunnel does.

Usage: bench_bare_relay.py MODE server LINK_PORT USER_PORT   (prints "READY" once listening,
                                                               "LINKED" once the agent is)
       bench_bare_relay.py MODE agent SERVICE_PORT LINK_PORT

The "agent" connects to the service and to the "server"; the server takes
one link and one user.  Bytes from the service go service -> agent -> server
-> user; the user's bytes go back unchanged.  There is no framing beyond
what MODE needs, no multiplexing, no flow control, no liveness:

  masked   what a WebSocket client (RFC 6455 makes it mask) and its server
           cannot avoid: each hop reads into one buffer, XORs it with a
           4-byte key (numpy, word at a time, the key turned to the stream's
           offset, so the second XOR restores the bytes) and writes it out.
  splice   what a link that is not WebSocket could do on plain TCP: the agent
           moves up to 1 MiB from the service with splice(2) into a pipe,
           writes a 4-byte length and splices the pipe into the link; the
           server reads the length and splices that many bytes to the user.
           No byte enters either process.
"""

import fcntl
import os
import socket
import struct
import sys
import threading

try:
    import numpy            # masked mode only (make bench's virtualenv has it)
except ImportError:
    numpy = None

CHUNK = 1 << 20
KEY = b"\x12\x34\x56\x78"
LENGTH = struct.Struct("!I")
F_SETPIPE_SZ = 1031


def _nodelay(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def copy_back(src, dst):
    """The user's bytes (the request) toward the service, unchanged."""
    while True:
        data = src.recv(65536)
        if not data:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        dst.sendall(data)


def masked(src, dst):
    if numpy is None:
        sys.exit("bench_bare_relay.py: masked mode needs numpy")
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while True:
        n = src.recv_into(buf, CHUNK)
        if not n:
            dst.close()
            return
        phase = offset & 3
        key = KEY[phase:] + KEY[:phase]
        words = n >> 2
        array = numpy.frombuffer(buf, dtype=numpy.uint32, count=words)
        numpy.bitwise_xor(array, numpy.frombuffer(key, dtype=numpy.uint32)[0], out=array)
        for index in range(4 * words, n):
            buf[index] ^= key[index & 3]
        offset += n
        dst.sendall(view[:n])


def _pipe():
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, F_SETPIPE_SZ, CHUNK)
    return read_fd, write_fd


def _drain_pipe(read_fd, dst_fd, n):
    while n:
        n -= os.splice(read_fd, dst_fd, n)


def splice_agent(src, dst):
    read_fd, write_fd = _pipe()
    while True:
        n = os.splice(src.fileno(), write_fd, CHUNK)
        if not n:
            dst.close()
            return
        dst.send(LENGTH.pack(n), socket.MSG_MORE)
        _drain_pipe(read_fd, dst.fileno(), n)


def splice_server(src, dst):
    read_fd, write_fd = _pipe()
    head = bytearray(LENGTH.size)
    while True:
        got = 0
        while got < len(head):
            k = src.recv_into(memoryview(head)[got:])
            if not k:
                dst.close()
                return
            got += k
        left = LENGTH.unpack(head)[0]
        while left:
            k = os.splice(src.fileno(), write_fd, left)
            left -= k
            _drain_pipe(read_fd, dst.fileno(), k)


def main(argv):
    mode, role, first, second = argv[1], argv[2], int(argv[3]), int(argv[4])
    if role == "agent":
        service = _nodelay(socket.create_connection(("127.0.0.1", first)))
        link = _nodelay(socket.create_connection(("127.0.0.1", second)))
        threading.Thread(target=copy_back, args=(link, service), daemon=True).start()
        (masked if mode == "masked" else splice_agent)(service, link)
    else:
        link_listener = socket.create_server(("127.0.0.1", first))
        user_listener = socket.create_server(("127.0.0.1", second))
        print("READY", flush=True)
        link = _nodelay(link_listener.accept()[0])
        print("LINKED", flush=True)
        user = _nodelay(user_listener.accept()[0])
        threading.Thread(target=copy_back, args=(user, link), daemon=True).start()
        (masked if mode == "masked" else splice_server)(link, user)


if __name__ == "__main__":
    main(sys.argv)
