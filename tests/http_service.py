"""An HTTP/1.1 service for the HTTP face's tests: the standard library's threaded server.

It keeps connections alive, records every request it answers (method, path,
headers, body, which connection), and answers:

* ``/echo...``: JSON of the request as it arrived (method, path, headers, body);
* ``/bytes/N``: N bytes of tests.helpers.pattern with Content-Length;
* ``/chunked/N``: N bytes of the pattern in chunked transfer coding, 64 KiB chunks;
* ``/slow-body``: reads a request body of Content-Length bytes however slowly it
  comes, answers its SHA-256;
* anything else: 200 ``hello`` (5 bytes).
"""

import hashlib
import http.server
import json
import threading

from tests.helpers import pattern


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):          # quiet: the tests read the records
        pass

    def setup(self):
        super().setup()
        # A number per connection (id() of a closed socket is used again).
        self.connection_number = self.server.service.count_connection()

    def _body(self) -> bytes:
        if (self.headers.get("transfer-encoding") or "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if not size:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self):
        body = self._body()
        service = self.server.service
        with service.lock:
            service.requests.append({"method": self.command, "path": self.path,
                                     "headers": dict(self.headers.items()), "body": body,
                                     "connection": self.connection_number})
            service.connections.add(self.connection_number)
        if self.path.startswith("/echo"):
            self._send(json.dumps({"method": self.command, "path": self.path,
                                   "headers": dict(self.headers.items()),
                                   "body": body.decode("latin-1")}).encode(),
                       "application/json")
        elif self.path.startswith("/bytes/"):
            self._send(pattern(int(self.path.split("/")[2])))
        elif self.path.startswith("/chunked/"):
            data = pattern(int(self.path.split("/")[2]))
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(data), 65536):
                piece = data[start:start + 65536]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/slow-body"):
            self._send(hashlib.sha256(body).hexdigest().encode())
        else:
            self._send(b"hello")

    def _send(self, body: bytes, content_type: str = "application/octet-stream"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _answer


class HttpService:
    """The service on 127.0.0.1, in threads of this process; ``close()`` stops it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.connections = set()
        self.accepted = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.service = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count_connection(self) -> int:
        with self.lock:
            self.accepted += 1
            return self.accepted

    def close(self):
        self.server.shutdown()
        self.server.server_close()
