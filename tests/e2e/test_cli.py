"""The command line: websockify 0.13's options, refusals, usage errors, defaults."""

import os
import re
import subprocess

import pytest

from tests.helpers import ROOT, websockify_argv
from websockify import cli
from websockify.config import OPTIONS

# The options of websockify 0.13, as its --help lists them.
OPTIONS_013 = """
--verbose -v --traffic --record --daemon -D --run-once --timeout --idle-timeout
--cert --key --key-password --ssl-only --ssl-target --verify-client --cafile
--ssl-version --ssl-ciphers --unix-listen --unix-listen-mode --unix-target --inetd
--web --web-auth --wrap-mode --prefer-ipv6 -6 --libserver --target-config
--token-plugin --token-source --host-token --auth-plugin --auth-source --heartbeat
--log-file --syslog --legacy-syslog --file-only
""".split()

NEW_OPTIONS = """
--workers --worker-connections --graceful-timeout --pid-file --connect-timeout
--max-frame-size --rebind-lib
""".split()

POSITIONALS = ["6080", "localhost:5900"]



def run_cli(*args, timeout=10):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(websockify_argv(*args), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("websockify: error:")]


def assert_usage_error(result, expected):
    """Exit 2, no traceback, and exactly one error line containing ``expected``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert expected.lower() in lines[0].lower(), result.stderr
    return lines[0]


def argv_for(opt):
    """Command line arguments that give ``opt`` explicitly with a valid value."""
    flag = opt.flags[-1]
    if not opt.takes_value:
        return [flag]
    if opt.kind == "choice":
        value = [c for c in opt.choices if c != opt.default][0]
    elif opt.kind in ("int", "float"):
        value = "1"
    else:
        value = "something"
    return [flag, value]


# -- --help and --version ----------------------------------------------------

@pytest.fixture(scope="module")
def help_text():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("flag", OPTIONS_013 + NEW_OPTIONS)
def test_option_listed_in_help(help_text, flag):
    # Not as part of a longer option: --key is not --key-password.
    pattern = r"(?<![\w-])%s(?![\w-])" % re.escape(flag)
    assert re.search(pattern, help_text), "%s missing from --help:\n%s" % (flag, help_text)


def test_every_013_option_is_declared():
    declared = {flag for opt in OPTIONS for flag in opt.flags}
    assert set(OPTIONS_013 + NEW_OPTIONS) <= declared


def help_entries(help_text):
    """{flag: text of its help entry} from argparse's option list."""
    entries, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"  (-\S.*?)(?:  +|$)(.*)", line)
        if match:
            current = []
            for flag in re.findall(r"(?<![\w-])(--?[\w-]+)", match.group(1)):
                entries[flag] = current
            current.append(match.group(2))
        elif current is not None and line.startswith("   "):
            current.append(line.strip())
        else:
            current = None
    return {flag: " ".join(" ".join(parts).split()) for flag, parts in entries.items()}


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    out = (result.stdout + result.stderr).strip()
    assert re.fullmatch(r"websockify \d+\.\d+\S*", out), out


def test_wrap_command_accepted():
    # Wrapping itself is tested in test_wrap.py.
    settings = cli.parse_args(["6080", "--", "vncserver", ":1"])
    assert settings.wrap_cmd == ["vncserver", ":1"]


# -- usage errors ------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    ((), "Too few arguments"),
    (("6080",), "Too few arguments"),
    (("6080", "localhost:5900", "extra"), "Too many arguments"),
    (("notaport", "localhost:5900"), "port"),
    (("70000", "localhost:5900"), "port"),
    (("6080", "localhost:notaport"), "port"),
    (("6080", "localhost"), "target"),
    (("--timeout=-1",) + tuple(POSITIONALS), "negative"),
    (("--worker-timeout=-1",) + tuple(POSITIONALS), "--worker-timeout must not be negative"),
    (("--workers", "0") + tuple(POSITIONALS), "--workers"),
    (("--max-frame-size", "10") + tuple(POSITIONALS), "--max-frame-size"),
    (("--web", "/nonexistent/websockify-test-dir") + tuple(POSITIONALS), "--web"),
    (("--unix-listen-mode", "rw") + tuple(POSITIONALS), "mode"),
    (("--unix-listen-mode", "999") + tuple(POSITIONALS), "mode"),
], ids=["none", "no-target", "three", "bad-listen-port", "port-range", "bad-target-port",
        "target-without-port", "negative-timeout", "negative-worker-timeout", "workers-0", "max-frame-size-10",
        "web-missing", "mode-letters", "mode-not-octal"])
def test_usage_error(args, expected):
    assert_usage_error(run_cli(*args), expected)


def test_worker_timeout_default_and_value():
    assert cli.parse_args(POSITIONALS).worker_timeout == 60.0
    assert cli.parse_args(["--worker-timeout", "0"] + POSITIONALS).worker_timeout == 0.0
    assert cli.parse_args(["--worker-timeout=2.5"] + POSITIONALS).worker_timeout == 2.5


def test_negative_timeout_as_separate_argument():
    # websockify 0.13 (optparse) takes "--timeout -1" as the value -1; the
    # refusal must say what is wrong with it, not that a value is missing.
    assert_usage_error(run_cli("--timeout", "-1", *POSITIONALS), "negative")


@pytest.mark.parametrize("args, expected", [
    ([], "Too few arguments"),
    (["6080", "localhost:5900", "extra"], "Too many arguments"),
    (["--timeout=-1"] + POSITIONALS, "negative"),
    (["--workers", "0"] + POSITIONALS, "workers"),
    (["--max-frame-size", "10"] + POSITIONALS, "max-frame-size"),
    (["--web", "/nonexistent/websockify-test-dir"] + POSITIONALS, "web"),
    (["--unix-listen-mode", "rw"] + POSITIONALS, "mode"),
    (["6080", "localhost"], "target"),
    (["x6080", "localhost:5900"], "port"),
])
def test_parse_args_usage_error(args, expected):
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(args)
    assert expected.lower() in str(info.value).lower()


# -- parse_args results ------------------------------------------------------

def test_ipv6_listen_address():
    settings = cli.parse_args(["[::1]:6080", "localhost:5900"])
    assert settings.listen_host == "::1"
    assert settings.listen_port == 6080


def test_bare_port_listens_everywhere():
    settings = cli.parse_args(["6080", "localhost:5900"])
    assert settings.listen_host == ""
    assert settings.listen_port == 6080


def test_host_and_port_listen_address():
    settings = cli.parse_args(["127.0.0.1:6080", "localhost:5900"])
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 6080)


def test_target():
    settings = cli.parse_args(["6080", "host:5900"])
    assert settings.target_host == "host"
    assert settings.target_port == 5900
    assert settings.unix_target is None
    assert settings.wrap_cmd is None


def test_ipv6_target():
    settings = cli.parse_args(["6080", "[::1]:5900"])
    assert (settings.target_host, settings.target_port) == ("::1", 5900)


def test_unix_target_needs_no_target_positional(tmp_path):
    path = str(tmp_path / "vnc.sock")
    settings = cli.parse_args(["--unix-target", path, "6080"])
    assert settings.unix_target == path
    assert settings.listen_port == 6080
    assert settings.target_host is None


def test_defaults():
    settings = cli.parse_args(POSITIONALS)
    assert settings.heartbeat == 0
    assert settings.connect_timeout == 10
    assert settings.max_frame_size == 16 * 1024 * 1024
    assert settings.graceful_timeout == 30
    assert settings.wrap_mode == "exit"
    assert settings.cert == os.path.abspath("self.pem")
    assert settings.timeout == 0
    assert settings.idle_timeout == 0
    assert settings.unix_listen_mode == 0o600
    assert settings.workers is None
    assert settings.web is None
    for flag in ("verbose", "traffic", "daemon", "run_once", "inetd", "file_only",
                 "libserver", "prefer_ipv6"):
        assert getattr(settings, flag) is False, flag


def test_values_given():
    settings = cli.parse_args(["--heartbeat", "5", "--connect-timeout", "2.5",
                               "--max-frame-size", "1000", "--graceful-timeout", "3",
                               "--wrap-mode", "respawn", "--workers", "3",
                               "--unix-listen-mode", "0660", "-v", "--traffic"]
                              + POSITIONALS)
    assert settings.heartbeat == 5
    assert settings.connect_timeout == 2.5
    assert settings.max_frame_size == 1000
    assert settings.graceful_timeout == 3
    assert settings.wrap_mode == "respawn"
    assert settings.workers == 3
    assert settings.unix_listen_mode == 0o660
    assert settings.verbose is True
    assert settings.traffic is True


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "www").mkdir()
    monkeypatch.chdir(tmp_path)
    settings = cli.parse_args(["--web", "www", "--log-file", "logs/ws.log",
                               "--pid-file", "ws.pid"] + POSITIONALS)
    assert settings.web == str(tmp_path / "www")
    assert settings.log_file == str(tmp_path / "logs" / "ws.log")
    assert settings.pid_file == str(tmp_path / "ws.pid")
    for path in (settings.web, settings.log_file, settings.pid_file):
        assert os.path.isabs(path)


# -- a real server -------------------------------------------------------------

def test_libserver_accepted_with_warning(websockify, echo_target):
    proc, port = websockify("--libserver", "--workers", "1", "127.0.0.1:{port}",
                            "127.0.0.1:%d" % echo_target)
    proc.wait_log(r"proxying from")
    lines = [line for line in proc.log().splitlines() if "--libserver" in line]
    assert len(lines) == 1, proc.log()
    assert "WARNING" in lines[0]
    assert "no effect" in lines[0]
    assert proc.proc.poll() is None
