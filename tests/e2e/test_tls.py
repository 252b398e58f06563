"""TLS on the listening port, client certificates and TLS to the target.

Real certificates (the ``pki`` fixture, made with openssl), real servers,
and real TLS clients: Python's ssl module and ``openssl s_client``.
"""

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest

from tests.helpers import (PYTHON, RawWebSocket, SharedProcess, free_port, handshake_request,
                           mask_frame, port_open, read_http_response, require_program,
                           wait_for, websockify_argv)


def client_context(pki, cert=None, maximum=None, cafile=None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile or pki.ca.cert)
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    if maximum is not None:
        context.maximum_version = maximum
    return context


def tls_socket(port, context, host="127.0.0.1", timeout=10.0) -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=timeout)
    return context.wrap_socket(raw, server_hostname=host)


def echo_roundtrip(ws: RawWebSocket, payload: bytes) -> bytes:
    ws.send_binary(payload)
    return ws.recv_data(len(payload))


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def worker_pids(proc) -> set:
    return set(re.findall(r"worker \d+ \(pid (\d+)\) serving", proc.log()))


# -- servers the tests only talk to, shared by the module --------------------------

@pytest.fixture(scope="module")
def shared_tls_server(module_websockify, module_echo_target, pki):
    proc, port = module_websockify("-v", "--cert", pki.server.pem, "--workers", "1",
                                   "{port}", "127.0.0.1:%d" % module_echo_target)
    return SharedProcess(proc), port


@pytest.fixture
def tls_server(shared_tls_server):
    """--cert, one worker, to the echo target: (process, port), the log read
    from this test's start on."""
    proc, port = shared_tls_server
    proc.mark()
    return proc, port


@pytest.fixture(scope="module")
def shared_verifying_server(module_websockify, module_echo_target, pki):
    proc, port = verifying_server(module_websockify, module_echo_target, pki)
    return SharedProcess(proc), port


@pytest.fixture
def verifying(shared_verifying_server):
    """--verify-client with the test CA: (process, port), the log from now on."""
    proc, port = shared_verifying_server
    proc.mark()
    return proc, port


# -- ws:// and wss:// on one port -----------------------------------------------

def test_wss_and_ws_share_the_port(tls_server, pki):
    proc, port = tls_server
    secure = RawWebSocket(port, ssl_context=client_context(pki))
    assert secure.status == 101
    assert secure.sock.version() == "TLSv1.3"        # both sides' default maximum
    plain = RawWebSocket(port)
    assert plain.status == 101
    assert echo_roundtrip(secure, b"over tls") == b"over tls"
    assert echo_roundtrip(plain, b"in the clear") == b"in the clear"
    secure.close()
    plain.close()


def test_large_transfer_both_ways_over_tls(tls_server, pki):
    """Megabytes each way through the TLS stream keep every byte in order."""
    proc, port = tls_server
    ws = RawWebSocket(port, ssl_context=client_context(pki), timeout=30)
    assert ws.status == 101
    payload = os.urandom(1 << 20)
    for _ in range(4):
        ws.send_binary(payload)
        assert ws.recv_data(len(payload)) == payload
    ws.close()


def test_many_concurrent_tls_sessions_keep_their_bytes_apart(tls_server, pki):
    """Sessions on one worker, each with its own TLS stream and random sizes."""
    import random
    import threading
    proc, port = tls_server
    context = client_context(pki)
    failures = []

    def session(seed: int) -> None:
        rng = random.Random(seed)
        try:
            ws = RawWebSocket(port, ssl_context=context, timeout=30)
            assert ws.status == 101
            for _ in range(5):
                payload = rng.randbytes(rng.choice([1, 100, 20000, 300000]))
                ws.send_binary(payload)
                assert ws.recv_data(len(payload)) == payload
            ws.close()
        except Exception as exc:        # collected: a thread cannot fail the test
            failures.append("session %d: %r" % (seed, exc))
    threads = [threading.Thread(target=session, args=(seed,)) for seed in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert not any(thread.is_alive() for thread in threads)


def test_openssl_s_client_gets_101(tls_server, pki):
    openssl = require_program("openssl", "openssl")
    proc, port = tls_server
    # The close frame ends the session, so s_client sees the connection close.
    request = handshake_request("/", "127.0.0.1") + mask_frame(0x8, b"\x03\xe8")
    done = subprocess.run(
        [openssl, "s_client", "-connect", "127.0.0.1:%d" % port, "-CAfile", pki.ca.cert,
         "-verify_return_error", "-quiet", "-ign_eof"],
        input=request, capture_output=True, timeout=20)
    assert b"HTTP/1.1 101 Switching Protocols" in done.stdout, done.stderr[-500:]


def test_static_files_over_https(websockify, echo_target, pki, tmp_path):
    (tmp_path / "index.html").write_text("<p>secure page</p>")
    proc, port = websockify("--cert", pki.server.pem, "--web", str(tmp_path),
                            "--workers", "1", "{port}", "127.0.0.1:%d" % echo_target)
    sock = tls_socket(port, client_context(pki))
    sock.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = read_http_response(sock)
    assert status == 200 and b"secure page" in body
    sock.close()


def test_tls_client_on_a_server_without_certificate(websockify, echo_target, tmp_path):
    """No certificate: a TLS hello is refused at once with a reason, not after a timeout."""
    proc, port = websockify("--cert", str(tmp_path / "missing.pem"), "--workers", "1",
                            "{port}", "127.0.0.1:%d" % echo_target)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    with pytest.raises((ssl.SSLError, OSError)):
        tls_socket(port, context)
    assert time.monotonic() - started < 5
    proc.wait_log(r"refused .*400 TLS handshake received, but this server has no certificate")
    assert RawWebSocket(port).status == 101


# -- --ssl-only --------------------------------------------------------------------

def test_ssl_only_refuses_plain_http_with_403(websockify, echo_target, pki):
    proc, port = websockify("--cert", pki.server.pem, "--ssl-only", "--workers", "1",
                            "{port}", "127.0.0.1:%d" % echo_target)
    plain = RawWebSocket(port)
    assert plain.status == 403
    assert b"TLS" in plain.buffer
    assert plain.at_eof()
    proc.wait_log(r"refused 'plain connection': 403")
    assert count(r"refused 'plain connection'", proc.log()) == 1
    secure = RawWebSocket(port, ssl_context=client_context(pki))
    assert secure.status == 101
    assert echo_roundtrip(secure, b"still serving") == b"still serving"


def test_ssl_only_without_certificate_stops_at_start(processes, tmp_path):
    missing = tmp_path / "nowhere.pem"
    port = free_port()
    proc = processes(websockify_argv("--ssl-only", "--cert", str(missing),
                                     str(port), "127.0.0.1:9"), name="ws")
    assert proc.wait(15) == 5
    errors = [line for line in proc.log().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(missing) in errors[0], proc.log()


@pytest.mark.parametrize("content", ["not a certificate\n", ""])
def test_unusable_certificate_stops_at_start(processes, tmp_path, content):
    bad = tmp_path / "bad.pem"
    bad.write_text(content)
    proc = processes(websockify_argv("--cert", str(bad), str(free_port()), "127.0.0.1:9"),
                     name="ws")
    assert proc.wait(15) == 5
    errors = [line for line in proc.log().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(bad) in errors[0], proc.log()


# -- versions and ciphers ------------------------------------------------------------

def test_hello_below_minimum_version_is_refused(websockify, echo_target, pki):
    proc, port = websockify("--cert", pki.server.pem, "--ssl-version", "tlsv1_3",
                            "--workers", "1", "{port}", "127.0.0.1:%d" % echo_target)
    with pytest.raises(ssl.SSLError):
        tls_socket(port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    proc.wait_log(r"TLS handshake failed: .*(version|protocol)")
    assert count(r"TLS handshake failed", proc.log()) == 1
    ws = RawWebSocket(port, ssl_context=client_context(pki))
    assert ws.status == 101 and ws.sock.version() == "TLSv1.3"


def test_ssl_ciphers_restricts_the_choice(websockify, echo_target, pki):
    proc, port = websockify("--cert", pki.server.pem, "--ssl-ciphers",
                            "ECDHE-RSA-AES128-GCM-SHA256", "--ssl-version", "tlsv1_2",
                            "--workers", "1", "{port}", "127.0.0.1:%d" % echo_target)
    context = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
    sock = tls_socket(port, context)
    assert sock.cipher()[0] == "ECDHE-RSA-AES128-GCM-SHA256"
    sock.close()


def test_bad_cipher_list_stops_at_start(processes, pki):
    proc = processes(websockify_argv("--cert", pki.server.pem, "--ssl-ciphers", "NO-SUCH-CIPHER",
                                     str(free_port()), "127.0.0.1:9"), name="ws")
    assert proc.wait(15) == 5
    assert "--ssl-ciphers" in proc.log()


# -- key passwords ---------------------------------------------------------------------

def test_key_password_from_file_first_line_only(websockify, echo_target, pki, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("open sesame\n# rotated 2026-11\n")
    proc, port = websockify("--cert", pki.locked.cert, "--key", pki.locked.key,
                            "--key-password-file", str(secret), "--workers", "1",
                            "{port}", "127.0.0.1:%d" % echo_target)
    assert RawWebSocket(port, ssl_context=client_context(pki)).status == 101
    # The password is not on the command line, so ps does not show it.
    with open("/proc/%d/cmdline" % proc.pid, "rb") as handle:
        assert b"sesame" not in handle.read()


def test_empty_key_password_file_stops_at_start(processes, pki, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    bad = processes(websockify_argv("--cert", pki.locked.cert, "--key", pki.locked.key,
                                    "--key-password-file", str(empty), str(free_port()),
                                    "127.0.0.1:9"), name="ws-empty")
    assert bad.wait(15) == 5
    assert "is empty" in bad.log()


def test_key_password_from_environment(websockify, echo_target, pki):
    proc, port = websockify("--cert", pki.locked.cert, "--key", pki.locked.key,
                            "--workers", "1", "{port}", "127.0.0.1:%d" % echo_target,
                            env={"WEBSOCKIFY_KEY_PASSWORD": "open sesame"})
    assert RawWebSocket(port, ssl_context=client_context(pki)).status == 101


def test_key_password_on_command_line(websockify, echo_target, pki):
    proc, port = websockify("--cert", pki.locked.cert, "--key", pki.locked.key,
                            "--key-password", "open sesame", "--workers", "1",
                            "{port}", "127.0.0.1:%d" % echo_target)
    assert RawWebSocket(port, ssl_context=client_context(pki)).status == 101


@pytest.mark.parametrize("password", [None, "wrong"])
def test_encrypted_key_without_the_right_password_stops_at_start(processes, pki, password):
    args = ["--cert", pki.locked.cert, "--key", pki.locked.key]
    if password:
        args += ["--key-password", password]
    proc = processes(websockify_argv(*args, str(free_port()), "127.0.0.1:9"), name="ws",
                     stdin=subprocess.DEVNULL)
    assert proc.wait(15) == 5           # never a prompt on the terminal
    errors = [line for line in proc.log().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "key" in errors[0], proc.log()


# -- client certificates -----------------------------------------------------------------

def verifying_server(websockify, echo_target, pki, *extra):
    return websockify("--cert", pki.server.pem, "--verify-client", "--cafile", pki.ca.cert,
                      "--workers", "1", *extra, "{port}", "127.0.0.1:%d" % echo_target)


def test_client_certificate_accepted(verifying, pki):
    proc, port = verifying
    ws = RawWebSocket(port, ssl_context=client_context(pki, pki.alice))
    assert ws.status == 101
    assert echo_roundtrip(ws, b"alice here") == b"alice here"


def test_client_certificate_with_openssl_s_client(verifying, pki):
    openssl = require_program("openssl", "openssl")
    proc, port = verifying
    done = subprocess.run(
        [openssl, "s_client", "-connect", "127.0.0.1:%d" % port, "-CAfile", pki.ca.cert,
         "-cert", pki.alice.cert, "-key", pki.alice.key, "-quiet", "-ign_eof"],
        input=handshake_request() + mask_frame(0x8, b"\x03\xe8"), capture_output=True,
        timeout=20)
    assert b"101 Switching Protocols" in done.stdout, done.stderr[-500:]


def _refused_client(proc, port, context, why):
    # TLS 1.3 reports the server's verdict on the client certificate after
    # the client's handshake returns: the first read sees the alert.
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError, EOFError)):
        ws = RawWebSocket(port, ssl_context=context)
        if ws.status is None:
            raise EOFError("closed")
    proc.wait_log(r"TLS handshake failed: .*%s" % why)


def test_client_certificate_from_another_ca_is_refused(verifying, pki):
    proc, port = verifying
    _refused_client(proc, port, client_context(pki, pki.stranger), "certificate verify failed")
    assert count(r"TLS handshake failed", proc.log()) == 1


def test_expired_client_certificate_is_refused(verifying, pki):
    proc, port = verifying
    _refused_client(proc, port, client_context(pki, pki.expired), "expired")
    assert count(r"TLS handshake failed", proc.log()) == 1


def test_missing_client_certificate_is_refused(verifying, pki):
    proc, port = verifying
    _refused_client(proc, port, client_context(pki), "certificate")
    ws = RawWebSocket(port, ssl_context=client_context(pki, pki.bob))
    assert ws.status == 101


# -- the handshake deadline ------------------------------------------------------------------

def test_half_a_tls_hello_is_dropped_at_the_deadline_and_frees_its_slot(
        websockify, echo_target, pki):
    proc, port = websockify("--cert", pki.server.pem, "--handshake-timeout", "1",
                            "--worker-connections", "1", "--workers", "1",
                            "{port}", "127.0.0.1:%d" % echo_target)
    staller = socket.create_connection(("127.0.0.1", port))
    staller.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01")    # a hello cut short
    started = time.monotonic()
    staller.settimeout(10)
    assert staller.recv(100) == b""                         # dropped by the server
    assert 0.8 < time.monotonic() - started < 6
    proc.wait_log(r"TLS handshake not completed within 1 s")
    # The one connection slot is free again.
    ws = RawWebSocket(port, ssl_context=client_context(pki))
    assert ws.status == 101


def test_silent_tcp_client_is_dropped_at_the_deadline(websockify, echo_target, pki):
    proc, port = websockify("--cert", pki.server.pem, "--handshake-timeout", "1",
                            "--worker-connections", "1", "--workers", "1",
                            "{port}", "127.0.0.1:%d" % echo_target)
    silent = socket.create_connection(("127.0.0.1", port))
    silent.settimeout(10)
    started = time.monotonic()
    status, _, _ = read_http_response(silent)
    assert status == 408
    assert time.monotonic() - started < 6
    assert RawWebSocket(port).status == 101


def test_handshake_timeout_must_be_positive(processes):
    proc = processes(websockify_argv("--handshake-timeout", "0", str(free_port()),
                                     "127.0.0.1:9"), name="ws")
    assert proc.wait(10) == 2


# -- certificates re-read on SIGHUP --------------------------------------------------------

def test_sighup_rereads_the_certificate(websockify, echo_target, pki, tmp_path):
    live = tmp_path / "live.pem"
    shutil.copy(pki.server.pem, live)
    proc, port = websockify("--cert", str(live), "--workers", "1",
                            "{port}", "127.0.0.1:%d" % echo_target)
    sock = tls_socket(port, client_context(pki))
    assert dict(x[0] for x in sock.getpeercert()["subject"])["commonName"] == "server"
    sock.close()
    shutil.copy(pki.other_server.pem, live)
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"TLS certificate .* reloaded")
    other = client_context(pki, cafile=pki.other_ca.cert)

    def new_certificate_served():
        try:
            with tls_socket(port, other) as fresh:
                return dict(x[0] for x in fresh.getpeercert()["subject"])["commonName"]
        except ssl.SSLError:
            return None
    wait_for(lambda: new_certificate_served() == "other-server", timeout=15,
             what="the new certificate after SIGHUP")


def test_sighup_with_the_certificate_missing_keeps_tls(websockify, echo_target, pki, tmp_path):
    live = tmp_path / "live.pem"
    shutil.copy(pki.server.pem, live)
    proc, port = websockify("-v", "--cert", str(live), "--workers", "1",
                            "{port}", "127.0.0.1:%d" % echo_target)
    live.unlink()                       # a renewal script between two steps
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"ERROR certificate file .*live.pem not found; new workers keep")
    proc.wait_log(r"worker 1 \(pid \d+\) serving[\s\S]*worker 1 \(pid \d+\) serving")
    ws = RawWebSocket(port, ssl_context=client_context(pki))
    assert ws.status == 101
    assert echo_roundtrip(ws, b"still wss") == b"still wss"


# -- TLS to the target --------------------------------------------------------------------------

def start_tls_target(processes, pki, mode="echo"):
    """A TLS server (tests/tls_target.py) with a certificate from ``pki.other_ca``."""
    port = free_port()
    proc = processes([PYTHON, "-m", "tests.tls_target", str(port), pki.other_server.cert,
                      pki.other_server.key, mode], name="tls-target-" + mode)
    wait_for(lambda: port_open(port), what="TLS target")
    return port, proc


@pytest.fixture
def tls_target(processes, pki):
    """A TLS echo server; yields (port, process)."""
    return start_tls_target(processes, pki)


def trusting_target(websockify, pki, target_port):
    return websockify("--ssl-target", "--ssl-target-cafile", pki.other_ca.cert,
                      "--workers", "1", "{port}", "127.0.0.1:%d" % target_port)


@pytest.mark.parametrize("mode", ["bye", "slam"])
def test_target_that_ends_its_tls_after_a_line(websockify, processes, pki, mode):
    """close_notify then FIN (bye), or FIN alone right after data (slam): the line
    arrives, then the close, and the worker is not left spinning."""
    target_port, _ = start_tls_target(processes, pki, mode)
    proc, port = trusting_target(websockify, pki, target_port)
    for _ in range(3):
        ws = RawWebSocket(port, timeout=5)
        assert ws.status == 101
        assert ws.recv_data(len(b"goodbye from the target\n")) == b"goodbye from the target\n"
        assert ws.expect_close()[0] == 1000
        ws.close()


def test_target_that_speaks_first_is_heard_at_once(websockify, processes, pki):
    """A greeting right behind the TLS handshake reaches the client unasked."""
    target_port, _ = start_tls_target(processes, pki, "banner")
    proc, port = trusting_target(websockify, pki, target_port)
    for _ in range(5):
        ws = RawWebSocket(port, timeout=5)
        assert ws.status == 101
        assert ws.recv_data(12) == b"RFB 003.008\n"
        assert echo_roundtrip(ws, b"after the banner") == b"after the banner"
        ws.close()


def test_frame_in_the_same_tls_record_as_a_long_request_head(tls_server, pki):
    """Plaintext the handshake reader left in the TLS object reaches the relay."""
    proc, port = tls_server
    sock = tls_socket(port, client_context(pki))
    payload = os.urandom(5000)
    padding = "X-Padding: %s" % ("p" * 3000)
    sock.sendall(handshake_request(extra=[padding]) + mask_frame(0x2, payload))
    status, _, rest = read_http_response(sock)
    assert status == 101
    ws = RawWebSocket.__new__(RawWebSocket)
    ws.sock, ws.buffer = sock, rest
    assert ws.recv_data(len(payload)) == payload


def test_ssl_target_verified_with_a_ca_file_and_sni(websockify, tls_target, pki):
    target_port, target = tls_target
    proc, port = websockify("--ssl-target", "--ssl-target-cafile", pki.other_ca.cert,
                            "--workers", "1", "{port}", "localhost:%d" % target_port)
    ws = RawWebSocket(port)
    assert ws.status == 101
    assert echo_roundtrip(ws, b"through tls to the target" * 1000) == \
        b"through tls to the target" * 1000
    target.wait_log(r"SNI localhost")


def test_ssl_target_carries_megabytes_both_ways(websockify, tls_target, pki):
    target_port, _ = tls_target
    proc, port = trusting_target(websockify, pki, target_port)
    ws = RawWebSocket(port, timeout=30)
    assert ws.status == 101
    payload = os.urandom(3 << 20)
    ws.send_binary(payload)
    assert ws.recv_data(len(payload)) == payload


def test_ssl_target_that_does_not_verify_is_502(websockify, tls_target):
    target_port, _ = tls_target
    proc, port = websockify("--ssl-target", "--workers", "1",
                            "{port}", "127.0.0.1:%d" % target_port)
    ws = RawWebSocket(port)
    assert ws.status == 502
    proc.wait_log(r"502 TLS to target 127.0.0.1:%d failed: certificate verify failed"
                  % target_port)
    assert count(r"refused", proc.log()) == 1


def test_ssl_target_no_verify_connects_and_warns(websockify, tls_target):
    target_port, _ = tls_target
    proc, port = websockify("--ssl-target", "--ssl-target-no-verify", "--workers", "1",
                            "{port}", "127.0.0.1:%d" % target_port)
    assert "WARNING" in proc.log() and "NOT verified" in proc.log()
    ws = RawWebSocket(port)
    assert ws.status == 101
    assert echo_roundtrip(ws, b"self-signed is fine") == b"self-signed is fine"


def test_ssl_target_to_a_plain_target_is_502(websockify, echo_target, pki):
    """A plain target answers the TLS hello with bytes that are not TLS (the
    echo target sends the hello back): 502 at once.  The connect timeout is far
    longer than that answer takes, so it cannot turn into a 504."""
    proc, port = websockify("--ssl-target", "--ssl-target-cafile", pki.ca.cert,
                            "--connect-timeout", "30", "--workers", "1",
                            "{port}", "127.0.0.1:%d" % echo_target)
    ws = RawWebSocket(port)
    why = "TLS to target 127.0.0.1:%d failed: unexpected message" % echo_target
    assert (ws.status, ws.buffer) == (502, why.encode() + b"\n")
    proc.wait_log(r"(?m)refused 'GET / HTTP/1\.1': 502 %s$" % re.escape(why))
    assert count(r"refused", proc.log()) == 1


def test_ssl_target_that_never_answers_the_hello_is_504(websockify, pki):
    """A target that accepts (the kernel does, from the backlog) but never
    answers the TLS hello: 504 once the connect timeout has passed."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    target_port = silent.getsockname()[1]
    try:
        proc, port = websockify("--ssl-target", "--ssl-target-cafile", pki.ca.cert,
                                "--connect-timeout", "1", "--workers", "1",
                                "{port}", "127.0.0.1:%d" % target_port)
        started = time.monotonic()
        ws = RawWebSocket(port)
        why = ("TLS handshake with target 127.0.0.1:%d not completed within 1 s"
               % target_port)
        assert (ws.status, ws.buffer) == (504, why.encode() + b"\n")
        assert time.monotonic() - started >= 1.0
        proc.wait_log(r"(?m)refused 'GET / HTTP/1\.1': 504 %s$" % re.escape(why))
    finally:
        silent.close()


@pytest.mark.parametrize("args", [["--ssl-target-no-verify"], ["--ssl-target-cafile", "x"]])
def test_target_tls_options_need_ssl_target(processes, args):
    proc = processes(websockify_argv(*args, str(free_port()), "127.0.0.1:9"), name="ws")
    assert proc.wait(10) == 2
