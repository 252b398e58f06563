"""A TLS echo server for the --ssl-target tests: ``python -m tests.tls_target
PORT CERT KEY``; logs the SNI name each client sent."""

import socket
import ssl
import sys
import threading


def serve(connection: ssl.SSLSocket) -> None:
    with connection:
        while True:
            data = connection.recv(65536)
            if not data:
                return
            connection.sendall(data)


def main() -> None:
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

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
        threading.Thread(target=serve, args=(connection,), daemon=True).start()


if __name__ == "__main__":
    main()
