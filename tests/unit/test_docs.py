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
