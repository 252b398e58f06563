"""The systemd units in scripts/systemd/ pass `systemd-analyze verify`."""

import os
import re
import shutil
import subprocess

import pytest

from tests.helpers import ROOT, require_program

UNITS_DIR = os.path.join(ROOT, "scripts", "systemd")
UNITS = ["websockify.service", "websockify.socket", "websockify@.service"]
EXECUTABLE = "/usr/bin/websockify"


def unit_text(name):
    with open(os.path.join(UNITS_DIR, name), encoding="utf-8") as handle:
        return handle.read()


@pytest.fixture
def units_copy(tmp_path):
    """The units, with ExecStart pointing at an executable that exists here
    (verify checks it; the units name where a package installs websockify)."""
    true = shutil.which("true")
    for name in UNITS:
        (tmp_path / name).write_text(unit_text(name).replace(EXECUTABLE, true))
    return tmp_path


@pytest.mark.parametrize("name", ["websockify.service", "websockify.socket",
                                  "websockify@.service", "websockify@demo.service"])
def test_systemd_analyze_verify(units_copy, name):
    analyze = require_program("systemd-analyze", "systemd")
    if name == "websockify@demo.service":
        # An instance of the template, as systemctl would load it.
        os.symlink("websockify@.service", units_copy / name)
    result = subprocess.run([analyze, "verify", "--man=no", "./" + name], cwd=units_copy,
                            capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # Unknown keys and bad values are only warnings: any line about our units fails.
    ours = [line for line in output.splitlines() if "websockify" in line]
    assert not ours, output


@pytest.mark.parametrize("name", ["websockify.service", "websockify@.service"])
def test_services_run_websockify_with_args_and_reload_with_hup(name):
    text = unit_text(name)
    assert re.search(r"^ExecStart=%s \$WEBSOCKIFY_ARGS$" % re.escape(EXECUTABLE), text, re.M)
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert re.search(r"^Type=exec$", text, re.M)
    # A broken configuration exits 2 to 5 (errors.py): no restart loop.
    assert re.search(r"^RestartPreventExitStatus=2 3 4 5$", text, re.M)


def test_default_args_parse(tmp_path):
    """The service's default WEBSOCKIFY_ARGS is a command line websockify accepts."""
    from websockify import cli
    match = re.search(r'^Environment="WEBSOCKIFY_ARGS=(.*)"$', unit_text("websockify.service"),
                      re.M)
    args = match.group(1).split()
    web = args.index("--web") + 1
    args[web] = str(tmp_path)          # the noVNC directory of the target system
    settings = cli.parse_args(args)
    assert settings.listen_port == 6080 and settings.target_port == 5900


def test_socket_listens_on_the_services_port():
    assert re.search(r"^ListenStream=6080$", unit_text("websockify.socket"), re.M)
    assert re.search(r"^Accept=no$", unit_text("websockify.socket"), re.M)
