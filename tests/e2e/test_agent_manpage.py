"""man/websockify-agent.1: lint-clean, the sections users look for, the exit
statuses the agent has, and installed beside man/websockify.1."""

import os
import re
import subprocess

from tests.helpers import PYTHON, ROOT, require_program
from tests.unit.test_docs import AGENT_MAN_PAGE
from websockify import errors

SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SIGNALS", "EXIT STATUS",
            "EXAMPLES", "SEE ALSO"]


def text() -> str:
    with open(AGENT_MAN_PAGE, encoding="utf-8") as handle:
        return handle.read().replace("\\-", "-")


def test_mandoc_lint_reports_nothing():
    mandoc = require_program("mandoc", "mandoc")
    result = subprocess.run([mandoc, "-Tlint", "-W", "warning", AGENT_MAN_PAGE],
                            capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert not output, output
    assert result.returncode == 0


def test_renders_with_man():
    man = require_program("man", "man-db")
    result = subprocess.run([man, "-l", AGENT_MAN_PAGE], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, MANWIDTH="80",
                                                 MAN_KEEP_FORMATTING=""))
    assert result.returncode == 0, result.stderr
    assert "ws[s]://HOST[:PORT]/tunnel/ID" in result.stdout


def test_sections_in_order():
    found = [name.strip('"') for name in re.findall(r"^\.SH (.*)$", text(), flags=re.M)]
    assert found == SECTIONS


def test_exit_statuses_are_those_of_errors_py():
    section = text().split(".SH EXIT STATUS", 1)[1].split("\n.SH ", 1)[0]
    statuses = [int(n) for n in re.findall(r"^\.B (\d+)$", section, flags=re.M)]
    assert statuses == [errors.EXIT_OK, errors.EXIT_USAGE, errors.EXIT_CONFIG]


def test_the_examples_are_the_seed_deployments():
    examples = text().split(".SH EXAMPLES", 1)[1]
    assert "--token-file" in examples and "websockify-sign agent" in examples
    assert "--token-stdin" in examples
    assert "/forward_to_me/LKLAFA151NA774655" in examples
    assert "--client-cert client.cert.pem --client-key client.key.pem" in examples
    assert "--verify-client" in examples


def test_setup_installs_the_agent_man_page(tmp_path):
    result = subprocess.run([PYTHON, "setup.py", "-q", "install_data", "-d", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    installed = tmp_path / "share" / "man" / "man1" / "websockify-agent.1"
    assert installed.read_bytes() == open(AGENT_MAN_PAGE, "rb").read()


def test_make_install_installs_the_agent_man_page(tmp_path):
    make = require_program("make", "make")
    result = subprocess.run([make, "-s", "install", "PYTHON=true", "DESTDIR=%s" % tmp_path,
                             "PREFIX=/usr"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    installed = tmp_path / "usr" / "share" / "man" / "man1" / "websockify-agent.1"
    assert installed.read_bytes() == open(AGENT_MAN_PAGE, "rb").read()
    assert oct(installed.stat().st_mode & 0o777) == "0o644"
