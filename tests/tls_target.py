"""A TLS server for the --ssl-target tests: ``python -m tests.tls_target
PORT CERT KEY [MODE]``; logs the SNI name each client sent.

Modes: ``echo`` (the default) echoes; ``banner`` speaks first (like a VNC
server) over TLS 1.2, so the greeting follows the handshake's last message
closely, then echoes; ``bye`` sends a line, then close_notify and closes;
``slam`` sends a line and closes the socket without close_notify.
"""

import socket
import ssl
import sys
import threading

LINE = b"goodbye from the target\n"


def serve(connection: ssl.SSLSocket, mode: str) -> None:
    with connection:
        if mode == "bye":
            connection.sendall(LINE)
            connection.unwrap().close()
            return
        if mode == "slam":
            connection.sendall(LINE)
            return
        if mode == "banner":
            connection.sendall(b"RFB 003.008\n")
        while True:
            data = connection.recv(65536)
            if not data:
                return
            connection.sendall(data)


def main() -> None:
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "echo"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if mode == "banner":
        context.maximum_version = ssl.TLSVersion.TLSv1_2

    def note_sni(sslobj, name, ctx):
        print("SNI %s" % name, flush=True)
    context.sni_callback = note_sni
    listener = socket.create_server(("127.0.0.1", port))
    print("listening", flush=True)
    while True:
        raw, _ = listener.accept()
        try:
            connection = context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            print("handshake failed: %s" % exc, flush=True)
            raw.close()
            continue
        threading.Thread(target=serve, args=(connection, mode), daemon=True).start()


if __name__ == "__main__":
    main()
