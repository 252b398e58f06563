"""The WebSocket protocol without I/O: frames, handshakes, session state, legacy codecs.

Nothing in this package touches a socket, a file, a clock-driven loop or
gevent: every function takes bytes or plain values and returns bytes,
values or events (tests/unit/test_purity.py walks the imports).
"""
