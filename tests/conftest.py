import pytest

from tests.helpers import (PYTHON, Process, free_port, port_open, wait_for,
                           websockify_argv)


class ProcessGroup:
    """Starts real processes logged into ``directory``; ``stop_all`` stops
    every one by its pid, the last started first."""

    def __init__(self, directory):
        self.directory = directory
        self.started = []

    def __call__(self, argv, name="proc", **kwargs):
        log_path = str(self.directory / ("%s-%d.log" % (name, len(self.started))))
        proc = Process(argv, log_path, **kwargs)
        self.started.append(proc)
        return proc

    def stop_all(self):
        for proc in reversed(self.started):
            proc.stop()


@pytest.fixture
def processes(tmp_path):
    """Start real processes; every one is stopped by its pid at teardown."""
    group = ProcessGroup(tmp_path)
    yield group
    group.stop_all()


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory):
    """As ``processes``, for servers a whole module shares: stopped by their
    pids at the module's teardown."""
    group = ProcessGroup(tmp_path_factory.mktemp("module"))
    yield group
    group.stop_all()


def start_echo_target(processes) -> int:
    port = free_port()
    processes([PYTHON, "-m", "websockify.demo.echo", "127.0.0.1:%d" % port], name="echo")
    wait_for(lambda: port_open(port), what="echo target on port %d" % port)
    return port


@pytest.fixture
def echo_target(processes):
    """A bundled TCP echo server on 127.0.0.1; yields its port."""
    return start_echo_target(processes)


@pytest.fixture(scope="module")
def module_echo_target(module_processes):
    """The echo target of a module's shared servers."""
    return start_echo_target(module_processes)


def websockify_starter(processes):
    """start(*args, port=None) -> (Process, port): started and listening."""

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


@pytest.fixture
def websockify(processes):
    """websockify(*args, port=None) -> (Process, port): started and listening."""
    return websockify_starter(processes)


@pytest.fixture(scope="module")
def module_websockify(module_processes):
    """As ``websockify``, for a server the module's tests share."""
    return websockify_starter(module_processes)


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
