"""websockify.protocol does no I/O: every import of its modules, followed through
the project's own modules, stays clear of sockets, files, processes and gevent."""

import ast
import os
import sys

import pytest

from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "websockify", "protocol")
# What protocol code may import: pure standard-library modules and its own package.
ALLOWED_STDLIB = {"base64", "binascii", "codecs", "collections", "dataclasses", "enum",
                  "hashlib", "hmac", "ipaddress", "json", "re", "struct", "sys", "typing",
                  "__future__"}
FORBIDDEN = {"socket", "_socket", "ssl", "os", "select", "selectors", "fcntl", "subprocess",
             "threading", "gevent", "geventwebsocket", "asyncio", "io", "time", "logging"}
# Project modules protocol code may use (pure themselves).
ALLOWED_PROJECT = {"websockify.errors", "websockify.addr"}
# Modules allowed by their full name only: the http package is its status
# enums (errors.reason_phrase), where http.client and http.server do I/O.
ALLOWED_EXACT = {"http"}


def imports_of(path):
    """Every module name imported anywhere in the file (nested imports too)."""
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError("%s: relative import" % path)
            yield node.module


def module_path(name):
    parts = name.split(".")
    base = os.path.join(ROOT, *parts)
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(candidate):
            return candidate
    return None


def protocol_files():
    return sorted(os.path.join(PACKAGE, name) for name in os.listdir(PACKAGE)
                  if name.endswith(".py"))


def test_the_package_has_the_pure_modules():
    names = {os.path.basename(path) for path in protocol_files()}
    assert {"frames.py", "handshake.py", "session.py", "codec.py", "legacy.py",
                     "mux.py"} <= names


@pytest.mark.parametrize("path", protocol_files(), ids=os.path.basename)
def test_no_io_import(path):
    seen = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in imports_of(current):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, "%s imports %s" % (os.path.relpath(current, ROOT), name)
            if top == "websockify":
                assert name.startswith("websockify.protocol") or name in ALLOWED_PROJECT, \
                    "%s imports %s, outside websockify.protocol" % (
                        os.path.relpath(current, ROOT), name)
                target = module_path(name)
                assert target is not None, name
                todo.append(target)
            else:
                # numpy is the optional unmasking accelerator (pure computation).
                assert top in ALLOWED_STDLIB or top == "numpy" or name in ALLOWED_EXACT, \
                    "%s imports %s" % (os.path.relpath(current, ROOT), name)


def test_importing_the_package_loads_no_io_module():
    # A fresh interpreter: what importing every protocol module pulls in.
    import subprocess
    code = ("import sys; before = set(sys.modules); "
            "import websockify.protocol.frames, websockify.protocol.handshake, "
            "websockify.protocol.session, websockify.protocol.codec, "
            "websockify.protocol.legacy, websockify.protocol.forwarded, "
            "websockify.protocol.mux; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True).stdout
    loaded = set(out.split())
    assert not {name.split(".")[0] for name in loaded} & {"gevent", "geventwebsocket", "socket",
                                                         "ssl", "select"}, loaded
    assert "http.client" not in loaded
