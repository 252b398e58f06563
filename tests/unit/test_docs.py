"""Every option is documented: --help and the man page come from one table."""

import os
import re
import subprocess

from tests.helpers import PYTHON, ROOT
from websockify.config import OPTIONS

MAN_PAGE = os.path.join(ROOT, "man", "websockify.1")


def man_text() -> str:
    with open(MAN_PAGE, encoding="utf-8") as handle:
        # roff escapes the dashes of options: \-\-web
        return handle.read().replace("\\-", "-")


def test_every_option_is_in_the_man_page():
    text = man_text()
    missing = [flag for opt in OPTIONS for flag in opt.flags
               if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), text)]
    assert not missing, "options missing from man/websockify.1: %s" % missing


def test_every_option_in_help_is_in_the_man_page():
    help_text = subprocess.run([PYTHON, "-m", "websockify", "--help"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+|-[a-zA-Z0-9])(?![\w-])", help_text))
    text = man_text()
    missing = sorted(flag for flag in flags
                     if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), text))
    assert not missing, "in --help but not in the man page: %s" % missing


def test_man_page_defaults_match_the_option_table():
    text = man_text()
    for opt in OPTIONS:
        if opt.kind in ("int", "float") and opt.default:
            value = opt.default
            shown = ("%g" % value) if isinstance(value, float) else str(value)
            # the option's own entry: ".BI --name= VALUE"
            section = text.split(".BI %s=" % opt.flags[-1], 1)[1][:1200]
            assert "Default: %s" % shown in section, (opt.flags[-1], shown)


def test_readme_architecture_names_every_module():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    package = os.path.join(ROOT, "websockify")
    missing = []
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py") and name not in ("__init__.py", "__main__.py"):
                if name not in section:
                    missing.append(os.path.relpath(os.path.join(folder, name), ROOT))
        sub = os.path.relpath(folder, package)
        if sub != "." and "__pycache__" not in sub and os.path.basename(folder) + "/" not in section:
            missing.append(sub + "/")
    assert not missing, "not in the README's Architecture section: %s" % sorted(missing)


AGENT_MAN_PAGE = os.path.join(ROOT, "man", "websockify-agent.1")


def agent_help_flags() -> set:
    help_text = subprocess.run([PYTHON, "-m", "websockify.agent", "--help"],
                               capture_output=True, text=True, cwd=ROOT, check=True).stdout
    options = help_text.split("options:", 1)[1]
    # Only the option names at the start of each entry (not ones the help text names).
    return set(re.findall(r"^  (?:-[a-zA-Z], )?(--[a-z][a-z0-9-]+|-[a-zA-Z])", options,
                          re.MULTILINE)) | set(re.findall(r"^  (-[a-zA-Z]), --", options,
                                                          re.MULTILINE))


def test_every_agent_option_is_in_its_man_page_and_the_readme():
    flags = agent_help_flags()
    assert {"--service", "--server", "--token-file", "--token-stdin", "--ca-cert",
            "--client-cert", "--client-key", "--connect-timeout", "-v", "--verbose",
            "--log-file", "--http", "--url-file", "-h", "--help", "--version"} <= flags
    with open(AGENT_MAN_PAGE, encoding="utf-8") as handle:
        man = handle.read().replace("\\-", "-")
    options = man.split(".SH OPTIONS", 1)[1].split("\n.SH ", 1)[0]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    section = readme.split("### websockify-agent", 1)[1].split("\n## ", 1)[0]
    for where, text in (("man/websockify-agent.1 OPTIONS", options),
                        ("the README's websockify-agent section", section)):
        missing = sorted(flag for flag in flags
                         if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), text))
        assert not missing, "in websockify-agent --help but not in %s: %s" % (where, missing)


def test_agent_man_page_defaults_match_its_help():
    from websockify.agent.cli import build_parser
    with open(AGENT_MAN_PAGE, encoding="utf-8") as handle:
        man = handle.read().replace("\\-", "-")
    for action in build_parser()._actions:
        if isinstance(action.default, float):
            flag = action.option_strings[-1]
            entry = man.split(".BI %s " % flag, 1)[1].split(".TP", 1)[0]
            assert "Default: %g." % action.default in entry, flag
