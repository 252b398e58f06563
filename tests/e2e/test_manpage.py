"""man/websockify.1: lint-clean, every option with its default, the sections
users look for, and installed by setup.py and `make install`."""

import os
import re
import subprocess

import pytest

from tests.helpers import PYTHON, ROOT, require_program
from tests.unit.test_docs import MAN_PAGE, man_text
from websockify import errors
from websockify.arbiter import master
from websockify.net import sockets, tls
from websockify.config import OPTIONS

#: Options other parts of the project add; the man page documents them by
#: these names whether or not this checkout has them yet.
OPTIONS_DOCUMENTED_AHEAD = {
    "--handshake-timeout": "10", "--key-password-file": None, "--ssl-target-cafile": None,
    "--ssl-target-no-verify": None, "--rebind-lib": None, "--record": None,
    "--trusted-proxy": None,
}

SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "TARGETS AND TOKENS", "TUNNELS",
            "AUTHENTICATION", "TLS", "WRAPPING A PROGRAM", "RECORDING", "LOGGING", "METRICS",
            "SERVICE MANAGERS", "SIGNALS", "ENVIRONMENT", "FILES", "EXIT STATUS",
            "EXAMPLES", "SEE ALSO"]


def sections() -> dict:
    """{section name: its text}, roff dashes unescaped."""
    parts = re.split(r"^\.SH (.*)$", man_text(), flags=re.M)
    return {name.strip('"'): body for name, body in zip(parts[1::2], parts[2::2])}


def entry(flag: str) -> str:
    """The text of an option's entry in OPTIONS, up to the next entry."""
    options = sections()["OPTIONS"]
    match = re.search(r"^\.TP\n\.(?:BI|B|BR) (?:-\S+ \", \" )?%s(?:=| |$).*?(?=^\.TP|^\.SS|\Z)"
                      % re.escape(flag), options, re.M | re.S)
    assert match, "no entry for %s in OPTIONS" % flag
    return match.group(0)


def plain(text: str) -> str:
    """Roff text without macros and font escapes, words joined by single spaces."""
    text = re.sub(r"^\.\S+ ?", "", text, flags=re.M)
    text = re.sub(r"\\f[BIRP]|\\&|\"", "", text)
    return " ".join(text.split())


def test_mandoc_lint_reports_nothing():
    mandoc = require_program("mandoc", "mandoc")
    result = subprocess.run([mandoc, "-Tlint", "-W", "warning", MAN_PAGE],
                            capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert not output, output
    assert result.returncode == 0


def test_renders_with_man():
    man = require_program("man", "man-db")
    result = subprocess.run([man, "-l", MAN_PAGE], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING=""))
    assert result.returncode == 0, result.stderr
    assert "--trusted-proxy=CIDR[,CIDR...]" in result.stdout


def test_sections_in_order():
    names = list(sections())
    assert names == SECTIONS, names


@pytest.mark.parametrize("opt", [opt for opt in OPTIONS if opt.takes_value],
                         ids=lambda opt: opt.flags[-1])
def test_every_value_option_states_its_default(opt):
    text = plain(entry(opt.flags[-1]))
    assert "Default:" in text, text
    if opt.default is not None:
        value = opt.default
        shown = ("%g" % value) if isinstance(value, float) else str(value)
        after = text.split("Default:", 1)[1]
        assert after.split()[0].rstrip(".,") == shown, (shown, text)


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda opt: opt.flags[-1])
def test_every_option_has_an_entry(opt):
    for flag in opt.flags:
        assert entry(opt.flags[-1]).count(flag), flag


@pytest.mark.parametrize("flag, default", sorted(OPTIONS_DOCUMENTED_AHEAD.items()))
def test_options_added_elsewhere_are_documented(flag, default):
    text = plain(entry(flag))
    if default is not None:
        assert "Default: %s" % default in text, text


def test_exit_statuses_are_those_of_errors_py():
    codes = sorted(value for name, value in vars(errors).items() if name.startswith("EXIT_"))
    documented = sorted(int(code) for code in
                        re.findall(r"^\.TP\n\.B (\d+)$", sections()["EXIT STATUS"], re.M))
    assert documented == codes


def test_signals_are_those_of_the_master():
    text = sections()["SIGNALS"]
    for name in master.SIGNALS.values():
        if name == "chld":
            continue        # reaping children: not for operators
        assert re.search(r"\bSIG%s\b" % name.upper(), text), name


def test_environment_variables():
    text = sections()["ENVIRONMENT"]
    for name in (tls.KEY_PASSWORD_ENV, "WEBSOCKIFY_REBIND_LIB") + sockets.ACTIVATION_VARIABLES:
        assert name in text, name


def test_auth_plugins_are_described():
    from websockify import auth_plugins
    text = sections()["AUTHENTICATION"]
    for name in ("BasicHTTPAuth", "ExpectOrigin", "ClientCertCNAuth"):
        assert hasattr(auth_plugins, name)
        assert re.search(r"^\.B %s$" % name, text, re.M), name
    for flag in ("--auth-plugin", "--auth-source", "--web-auth"):
        assert flag in text


def test_token_plugins_are_those_of_the_registry():
    from websockify.plugins.tokens import PLUGINS
    match = re.search(r"a bare name \(([^)]*)\)", plain(entry("--token-plugin")))
    assert match, entry("--token-plugin")
    assert [name.strip() for name in match.group(1).split(",")] == list(PLUGINS)


def test_token_redis_nginx_example():
    text = sections()["EXAMPLES"]
    assert "--token-plugin TokenRedis" in text
    assert "proxy_set_header Upgrade $http_upgrade;" in text
    assert "path=novnc/websockify?token=" in text
    assert "--trusted-proxy" in text


# -- installation -------------------------------------------------------------------

def test_setup_installs_the_man_page(tmp_path):
    result = subprocess.run([PYTHON, "setup.py", "-q", "install_data", "-d", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    installed = tmp_path / "share" / "man" / "man1" / "websockify.1"
    assert installed.read_bytes() == open(MAN_PAGE, "rb").read()


def test_make_install_installs_the_man_page(tmp_path):
    make = require_program("make", "make")
    # PYTHON=true: the pip step becomes a no-op; the man page step is real.
    result = subprocess.run([make, "-s", "install", "PYTHON=true", "DESTDIR=%s" % tmp_path,
                             "PREFIX=/usr"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    installed = tmp_path / "usr" / "share" / "man" / "man1" / "websockify.1"
    assert installed.read_bytes() == open(MAN_PAGE, "rb").read()
    assert oct(installed.stat().st_mode & 0o777) == "0o644"
