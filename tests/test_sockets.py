"""Listener and target sockets carry TCP_NODELAY and keepalive (both legs)."""

import socket

from websockify.sockets import inetd_listener, tcp_listener, unix_listener


def options(sock):
    return (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0)


def test_accepted_client_sockets_inherit_nodelay_and_keepalive():
    listener = tcp_listener("127.0.0.1", 0)
    try:
        listener.setblocking(True)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            with accepted:
                assert options(accepted) == (True, True)
    finally:
        listener.close()


def test_target_sockets_get_nodelay_and_keepalive():
    from websockify.proxy import Target, _connect
    from websockify.sockets import tune_stream
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        target = Target("127.0.0.1", server.getsockname()[1])
        sock = _connect(target, 5.0)
        tune_stream(sock)          # what ProxyService.open_target does
        try:
            assert options(sock) == (True, True)
        finally:
            sock.close()
    finally:
        server.close()


def test_unix_listener_mode(tmp_path):
    path = str(tmp_path / "ws.sock")
    listener = unix_listener(path, 0o640)
    try:
        import os
        import stat
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        listener.close()


def test_inetd_listener_refuses_a_socket_that_is_not_listening():
    import pytest
    from websockify.sockets import ListenError
    sock = socket.socket()
    try:
        with pytest.raises(ListenError):
            inetd_listener(sock.fileno())
    finally:
        sock.close()
