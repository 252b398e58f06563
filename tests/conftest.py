import pytest

from tests.helpers import (PYTHON, Process, free_port, port_open, wait_for,
                           websockify_argv)


@pytest.fixture
def processes(tmp_path):
    """Start real processes; every one is stopped by its pid at teardown."""
    started = []

    def start(argv, name="proc", **kwargs):
        proc = Process(argv, str(tmp_path / ("%s-%d.log" % (name, len(started)))), **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def echo_target(processes):
    """A bundled TCP echo server on 127.0.0.1; yields its port."""
    port = free_port()
    processes([PYTHON, "-m", "websockify.demo.echo", "127.0.0.1:%d" % port], name="echo")
    wait_for(lambda: port_open(port), what="echo target on port %d" % port)
    return port


@pytest.fixture
def websockify(processes):
    """websockify(*args, port=None) -> (Process, port): started and listening."""

    def start(*args, port=None, wait=True, **kwargs):
        port = port or free_port()
        argv = websockify_argv(*[a.format(port=port) if isinstance(a, str) else a for a in args])
        proc = processes(argv, name="websockify", **kwargs)
        if wait:
            wait_for(lambda: port_open(port) or proc.proc.poll() is not None,
                     what="websockify on port %d" % port)
            assert proc.proc.poll() is None, proc.log()
            proc.wait_log(r"worker \d+ .*serving|proxying from", timeout=10)
        return proc, port

    return start


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """Certificates made once per run with openssl (skips where it is missing):
    a test CA with a server, client (alice, bob), expired client and
    password-protected server certificate, and another CA with a client."""
    from types import SimpleNamespace
    from tests.certs import CertMaker
    maker = CertMaker(str(tmp_path_factory.mktemp("pki")))
    ca = maker.ca("test-root")
    other = maker.ca("other-root")
    return SimpleNamespace(
        ca=ca, other_ca=other,
        server=maker.issue(ca, "server"),
        alice=maker.issue(ca, "alice", client=True),
        bob=maker.issue(ca, "bob", client=True),
        expired=maker.issue(ca, "expired-client", client=True, expired=True),
        stranger=maker.issue(other, "stranger", client=True),
        other_server=maker.issue(other, "other-server"),
        locked=maker.issue(ca, "locked-server", key_password="open sesame"),
    )
