"""A small TCP echo server: the bundled target of ``make run`` and of the tests.

    python -m websockify.demo.echo [host:]port
"""

import socket
import sys
import threading

from websockify.addr import parse_host_port


def serve(host: str, port: int, ready=None) -> None:
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    if ready is not None:
        ready(listener.getsockname()[1])
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo_connection, args=(conn,), daemon=True).start()


def echo_connection(conn: socket.socket) -> None:
    """Send back everything ``conn`` receives until it closes; then close it."""
    with conn:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
        except OSError:
            return


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m websockify.demo.echo [host:]port\n")
        return 2
    try:
        host, port = parse_host_port(argv[0], listen=True)
    except ValueError as exc:
        sys.stderr.write("python -m websockify.demo.echo: %s\n" % exc)
        return 2
    try:
        serve(host or "127.0.0.1", int(port),
              ready=lambda p: print("echo target listening on port %d" % p, flush=True))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
