"""The Debian package: built with make deb from a clone, installed with apt-get, run.

The package is built once per module by `make deb` in a fresh clone of this
repository with the working tree's local changes copied over (so it is what
is being tested, and says +dirty when there are any), installed with
`apt-get install ./websockify_*.deb` so that apt resolves its dependencies
from Debian, and the installed /usr/bin/websockify is driven through a
session, a wrapped program and its man page. At the end the machine gets
back the websockify it had: none (apt-get remove) or Debian's own (noVNC's
package depends on one), reinstalled at its version.

Skipped, with the reason, where dpkg-buildpackage or debhelper is missing or
the tests do not run as root (failed under CI=true).
"""

import configparser
import glob
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

from tests.helpers import (ROOT, Process, free_port, port_open, require_module,
                           require_program, skip_or_fail, wait_for)

PACKAGE = "websockify"
REBIND = "/usr/lib/websockify/rebind.so"
APT_TIMEOUT = 300
APT_OPTIONS = ["-y", "-q", "-o", "DPkg::Lock::Timeout=%d" % (APT_TIMEOUT - 30)]
# Installed with ours replacing it (ours Conflicts/Replaces/Provides it).
REPLACED = ("websockify", "python3-websockify")


def build_deb_module():
    """scripts/build-deb as a module (its version functions)."""
    path = os.path.join(ROOT, "scripts", "build-deb")
    loader = importlib.machinery.SourceFileLoader("build_deb", path)
    spec = importlib.util.spec_from_loader("build_deb", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def console_scripts() -> list:
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return sorted(line.split("=")[0].strip() for line in lines if line.strip())


def man_pages() -> list:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "man", "*.1")))


def run(argv, timeout=120, check=True, **kwargs):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert result.returncode == 0, "%s: %s%s" % (argv, result.stdout, result.stderr)
    return result


def git(*args, cwd):
    return run(["git"] + list(args), cwd=cwd).stdout


def clean_env() -> dict:
    """The environment of an installed program: no virtualenv, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME",
                        "WEBSOCKIFY_REBIND_LIB")}
    if sys.prefix != sys.base_prefix:
        venv_bin = os.path.join(sys.prefix, "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if os.path.abspath(p) != venv_bin)
    env["DEBIAN_FRONTEND"] = "noninteractive"
    # Empty rather than absent: the processes fixture would add this tree's.
    env["PYTHONPATH"] = ""
    return env


def clone_with_local_changes(dest) -> str:
    """A fresh clone of ROOT's HEAD with ROOT's uncommitted changes applied."""
    git("clone", "-q", "--no-local", ROOT, dest, cwd=ROOT)
    changed = git("ls-files", "-z", "--modified", "--others", "--exclude-standard",
                  cwd=ROOT).split("\0")
    for name in filter(None, changed):
        source, target = os.path.join(ROOT, name), os.path.join(dest, name)
        if os.path.lexists(target) or os.path.isdir(target):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.unlink(target)
        if not os.path.lexists(source):
            continue        # deleted in the working tree
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)
    return dest


def installed_versions() -> dict:
    """{package: version} of the packages ours replaces, installed now."""
    found = {}
    for name in REPLACED:
        result = run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", name],
                     check=False)
        fields = result.stdout.split()
        if result.returncode == 0 and len(fields) == 2 and fields[0] == "ii":
            found[name] = fields[1]
    return found


def auto_installed() -> set:
    return set(run(["apt-mark", "showauto"]).stdout.split())


def apt_get(*args, cwd=None):
    return run(["apt-get"] + APT_OPTIONS + list(args), timeout=APT_TIMEOUT, env=clean_env(),
               cwd=cwd)


def in_archive(name, version) -> bool:
    result = run(["apt-cache", "madison", name], check=False)
    return any(line.split("|")[1].strip() == version
               for line in result.stdout.splitlines() if line.count("|") >= 2)


def restore(before: dict, auto: set) -> None:
    """Put back what ours replaced, at the versions it had, auto-marks included."""
    if not before:
        apt_get("remove", PACKAGE)
        return
    if not all(in_archive(name, version) for name, version in before.items()):
        warnings.warn("websockify %s was installed before and cannot be reinstalled "
                      "from the archive: the package built here stays installed" % before)
        return
    apt_get("install", "--allow-downgrades",
            *["%s=%s" % item for item in sorted(before.items())])
    marked = sorted(name for name in before if name in auto)
    if marked:
        run(["apt-mark", "auto"] + marked)


# -- building ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the .deb's path, the version it must carry, the build's output)."""
    require_program("dpkg-buildpackage", "dpkg-dev")
    require_program("dh", "debhelper")
    require_program("dh_python3", "dh-python")
    require_program("git", "git")
    require_program("make", "make")
    base = tmp_path_factory.mktemp("deb")
    src = clone_with_local_changes(str(base / "clone"))
    before = git("status", "--porcelain", "--ignored", cwd=src)
    out = base / "out"
    result = run(["make", "deb", "DEB_OUT=%s" % out], cwd=src, timeout=300, check=False,
                 env=clean_env())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # The build leaves nothing in the tree, not even ignored files.
    assert git("status", "--porcelain", "--ignored", cwd=src) == before
    debs = sorted(out.glob("%s_*.deb" % PACKAGE))
    assert len(debs) == 1, debs
    return str(debs[0]), build_deb_module().package_version(src), result.stdout


@pytest.fixture(scope="module")
def installed(built):
    """The built package installed with apt-get; what it replaced put back after."""
    if os.geteuid() != 0:
        skip_or_fail("installing the package needs root")
    require_program("apt-get", "apt")
    deb, version, _ = built
    before, auto = installed_versions(), auto_installed()
    apt_get("install", "./" + os.path.basename(deb), cwd=os.path.dirname(deb))
    try:
        yield version
    finally:
        restore(before, auto)
        after = installed_versions()
        assert after == before, (after, before)


def dpkg_field(field, package=PACKAGE) -> str:
    return run(["dpkg-query", "-W", "-f", "${%s}" % field, package]).stdout


def test_version_and_dependencies(built):
    deb, version, _ = built
    fields = run(["dpkg-deb", "-f", deb, "Version", "Depends", "Recommends", "Suggests",
                  "Architecture"]).stdout
    assert re.search(r"^Version: %s$" % re.escape(version), fields, re.M), fields
    depends = {d.split()[0] for d in re.search(r"^Depends: (.*)$", fields, re.M)
               .group(1).split(", ")}
    # Debian's packages only: the Python ones and what dh_shlibdeps finds for rebind.so.
    assert depends == {"python3-daemon", "python3-gevent", "python3-gevent-websocket",
                       "python3-setproctitle", "python3:any", "libc6"}, depends
    assert re.search(r"^Recommends: python3-jwcrypto$", fields, re.M), fields
    assert re.search(r"^Suggests: novnc, python3-redis$", fields, re.M), fields


def test_lintian_reports_no_error(built):
    lintian = require_program("lintian", "lintian")
    deb, _, output = built
    # make deb ran it (the target fails on an error); run it again to read the tags.
    result = run([lintian, deb], timeout=300, check=False, env=clean_env())
    tags = result.stdout + result.stderr
    assert not re.search(r"^E: ", tags, re.M), tags
    assert result.returncode == 0, tags


def test_installed_files(installed):
    files = set(run(["dpkg", "-L", PACKAGE]).stdout.split("\n"))
    expected = {"/usr/bin/%s" % name for name in console_scripts()}
    assert {"/usr/bin/websockify", "/usr/bin/websockify-sign"} <= expected
    expected |= {REBIND, "/etc/default/websockify"}
    expected |= {"/usr/share/man/man1/%s.gz" % page for page in man_pages()}
    units = {"/lib/systemd/system/%s" % unit for unit in
             ("websockify.service", "websockify.socket", "websockify@.service")}
    # debhelper puts units in /lib or /usr/lib, depending on the Debian release.
    expected |= {u for u in units if u in files} or {"/usr" + u for u in units}
    assert expected <= files, sorted(expected - files)
    assert not [f for f in files if f.startswith("/usr/local")]
    assert not [f for f in files if re.search(r"/_rebind[^/]*\.so$", f)]
    assert dpkg_field("Conffiles").split()[0] == "/etc/default/websockify"
    assert dpkg_field("Version") == installed
    for name in console_scripts():
        first = open("/usr/bin/%s" % name).readline()
        assert first == "#!/usr/bin/python3\n", first


def test_installed_server_carries_a_session(installed, processes, tmp_path):
    websocket = require_module("websocket", "pip install websocket-client")
    env = clean_env()
    result = run(["/usr/bin/websockify", "--version"], env=env, cwd=str(tmp_path))
    assert result.stdout.strip() == "websockify %s" % build_deb_module().python_version(ROOT)
    # The echo target from the installed package too.
    target = free_port()
    processes(["/usr/bin/python3", "-m", "websockify.demo.echo", "127.0.0.1:%d" % target],
              name="echo", env=env, cwd=str(tmp_path))
    wait_for(lambda: port_open(target), what="echo target")
    port = free_port()
    server = processes(["/usr/bin/websockify", str(port), "127.0.0.1:%d" % target],
                       name="websockify", env=env, cwd=str(tmp_path))
    wait_for(lambda: port_open(port), what="the installed websockify on port %d" % port)
    assert_installed_code(server.pid)
    ws = websocket.create_connection("ws://127.0.0.1:%d/" % port, subprotocols=["binary"],
                                     timeout=10)
    try:
        ws.send_binary(b"through the installed package")
        assert ws.recv() == b"through the installed package"
    finally:
        ws.close()


WRAPPED = textwrap.dedent("""\
    import socket, sys
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", int(sys.argv[1])))
    sock.listen()
    print("wrapped program listening", flush=True)
    while True:
        conn, _ = sock.accept()
        conn.sendall(b"wrapped:" + conn.recv(100))
        conn.close()
    """)


def test_installed_server_wraps_a_program(installed, processes, tmp_path):
    websocket = require_module("websocket", "pip install websocket-client")
    program = tmp_path / "wrapped.py"
    program.write_text(WRAPPED)
    port = free_port()
    # No --rebind-lib and no WEBSOCKIFY_REBIND_LIB (clean_env drops it).
    server = processes(["/usr/bin/websockify", str(port), "--", "/usr/bin/python3",
                        str(program), str(port)], name="websockify", env=clean_env(),
                       cwd=str(tmp_path))
    match = server.wait_log(r"wrapped program .* started \(pid (\d+)\); its port %d is "
                            r"moved to 127\.0\.0\.1:(\d+)" % port)
    server.wait_log(r"wrapped program listening")
    with open("/proc/%s/maps" % match.group(1)) as handle:
        assert REBIND in handle.read()
    wait_for(lambda: port_open(port), what="the installed websockify on port %d" % port)
    ws = websocket.create_connection("ws://127.0.0.1:%d/" % port, subprotocols=["binary"],
                                     timeout=10)
    try:
        ws.send_binary(b"hello")
        assert ws.recv() == b"wrapped:hello"
    finally:
        ws.close()


def test_installed_man_pages(installed):
    man = require_program("man", "man-db")
    for page in man_pages():
        name = page[:-2]
        result = run([man, "-w", name], env=clean_env())
        assert result.stdout.strip() == "/usr/share/man/man1/%s.gz" % page


def assert_installed_code(pid):
    """The process runs websockify from /usr/lib/python3/dist-packages: Debian's
    python3 on the installed script, with nothing on its path from this tree."""
    # (its command line is its process title now: setproctitle)
    assert os.readlink("/proc/%d/exe" % pid) == os.path.realpath("/usr/bin/python3")
    with open("/proc/%d/environ" % pid, "rb") as handle:
        environ = handle.read().split(b"\0")
    assert [v for v in environ if v.startswith(b"PYTHONPATH=") and v != b"PYTHONPATH="] == []
    where = run(["/usr/bin/python3", "-c", "import websockify; print(websockify.__file__)"],
                env=clean_env(), cwd=os.readlink("/proc/%d/cwd" % pid)).stdout.strip()
    assert where == "/usr/lib/python3/dist-packages/websockify/__init__.py", where


# -- the version of a tree with local changes (no build) ----------------------------

def test_version_says_local_changes(tmp_path):
    require_program("git", "git")
    build_deb = build_deb_module()
    clean = build_deb.debian_version(build_deb.python_version(ROOT))
    # The working tree as a commit of its own: a clean checkout to start from.
    clone = clone_with_local_changes(str(tmp_path / "clone"))
    git("add", "-A", cwd=clone)
    git("-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-q",
        "--allow-empty", "-m", "the working tree", cwd=clone)
    script = os.path.join(clone, "scripts", "build-deb")

    def version():
        return run([sys.executable, script, "--print-version"], cwd=clone).stdout.strip()

    assert version() == clean
    with open(os.path.join(clone, "README.md"), "a") as handle:
        handle.write("\na local change\n")
    assert version() == clean + "+dirty"
    git("checkout", "README.md", cwd=clone)
    assert version() == clean
    (tmp_path / "clone" / "notes.txt").write_text("untracked\n")
    assert version() == clean + "+dirty"


def test_changelog_carries_the_package_version():
    build_deb = build_deb_module()
    assert build_deb.changelog_version(ROOT) == build_deb.debian_version(
        build_deb.python_version(ROOT))


@pytest.mark.parametrize("python, debian", [
    ("0.14.0", "0.14.0"), ("0.14.0.dev0", "0.14.0~dev0"), ("1.0rc1", "1.0~rc1"),
    ("1.0a1.dev2", "1.0~a1~dev2"), ("1.0b3", "1.0~b3"), ("1.0.post1", "1.0+post1"),
    ("1.0+local.7", "1.0+local.7")])
def test_debian_spelling_of_versions(python, debian):
    assert build_deb_module().debian_version(python) == debian


def test_every_command_has_a_man_page():
    assert sorted(name + ".1" for name in console_scripts()) == man_pages()
