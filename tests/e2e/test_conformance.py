"""The Autobahn TestSuite's cases (sections 1-10) against ``websockify --echo``.

kosoku drives Autobahn's own case files.  Every case must end OK,
NON-STRICT or INFORMATIONAL, and each 9.* (limits and performance) case must
take under 2 seconds.  The whole selection runs in well under a minute here;
`make conformance` runs it with the HTML reports kept.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, skip_or_fail

ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
SLOW_CASE_MS = 2000


def kosoku_command():
    exe = os.path.join(os.path.dirname(sys.executable), "kosoku")
    if os.access(exe, os.X_OK):
        return [exe]
    found = shutil.which("kosoku")
    if found:
        return [found]
    reason = "kosoku is not installed (pip install kosoku; it needs Python >= 3.10)"
    if sys.version_info < (3, 10):
        pytest.skip(reason)     # the test extra cannot install it here, CI or not
    skip_or_fail(reason)


def run_suite(port, outdir, include=(), exclude=("12.*", "13.*")):
    argv = kosoku_command() + ["127.0.0.1:%d" % port, "-o", str(outdir), "-p", "2"]
    for case in include:
        argv += ["-i", case]
    for case in exclude:
        argv += ["-x", case]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    index = os.path.join(str(outdir), "index.json")
    assert os.path.exists(index), "kosoku wrote no report:\n%s\n%s" % (result.stdout,
                                                                      result.stderr)
    with open(index) as handle:
        report = json.load(handle)
    (agent_cases,) = report.values()
    return agent_cases


def summary(cases):
    counts = {}
    for case in cases.values():
        counts[case["behavior"]] = counts.get(case["behavior"], 0) + 1
    return counts


@pytest.mark.parametrize("workers", ["2"])
def test_autobahn_sections_1_to_10(websockify, tmp_path, workers):
    proc, port = websockify("--echo", "--workers", workers, "127.0.0.1:{port}")
    cases = run_suite(port, tmp_path / "reports")
    failed = {case_id: (case["behavior"], case.get("behaviorClose"))
              for case_id, case in cases.items() if case["behavior"] not in ACCEPTED}
    assert not failed, "cases not passed: %s" % failed
    # Sections 1-7, 9 and 10 all ran (12 and 13 are compression, excluded).
    sections = {case_id.split(".")[0] for case_id in cases}
    assert sections == {"1", "2", "3", "4", "5", "6", "7", "9", "10"}, sections
    assert len(cases) > 290, len(cases)
    slow = {case_id: case["duration"] for case_id, case in cases.items()
            if case_id.startswith("9.") and case["duration"] >= SLOW_CASE_MS}
    assert not slow, "9.* cases over %d ms: %s" % (SLOW_CASE_MS, slow)
    # The workers survived everything the suite threw at them.
    assert proc.proc.poll() is None
    print("kosoku summary: %s; slowest 9.* case: %s" % (
        summary(cases),
        max(((case["duration"], case_id) for case_id, case in cases.items()
             if case_id.startswith("9.")))))
