"""An embedder that runs start_server() in a thread of its own (as Ironic's console
service does) and stops it with terminate(); commands come on standard input.

argv: listen_port target_port
stdin: "again" (a second start_server() while running), "stop", "restart", "quit"
"""

import logging
import sys
import threading

import websockify

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

proxy = websockify.WebSocketProxy(listen_host="127.0.0.1", listen_port=int(sys.argv[1]),
                                  target_host="127.0.0.1", target_port=int(sys.argv[2]))


def serve():
    print("start_server returned %r" % (proxy.start_server(),), flush=True)


if __name__ == "__main__":
    thread = threading.Thread(target=serve)
    thread.start()
    for line in sys.stdin:
        command = line.strip()
        if command == "again":
            try:
                proxy.start_server()
            except RuntimeError as exc:
                print("second start_server refused: %s" % exc, flush=True)
        elif command == "stop":
            proxy.terminate()
            thread.join(30)
            print("thread alive after stop: %s" % thread.is_alive(), flush=True)
        elif command == "restart":
            thread = threading.Thread(target=serve)
            thread.start()
        elif command == "quit":
            break
