import os
import socket

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
