"""The demo command end to end: the whole pipeline against the fake network."""

import re
import subprocess
import sys

from tests.support import ROOT


def test_the_demo_runs_the_pipeline_and_prints_a_summary():
    result = subprocess.run([sys.executable, "-m", "scripts.demo"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for key in ("reference", "cr", "pacc", "gtr", "clicks_zero_conv", "cap_fill"):
        assert re.search(rf"^  {key}\s+succeeded", out, re.M), f"load {key} did not succeed:\n{out}"
    checked = dict(re.findall(r"^  (.+?)\s+(\d+) pairs checked", out, re.M))
    assert set(checked) == {"min CR", "max CR", "negative pacc", "goal ratio", "cap fill", "clicks, zero conv"}
    assert all(int(n) > 0 for n in checked.values()), out
    changes = int(re.search(r"none -> PROBLEM\s+(\d+)", out).group(1))
    emails = int(re.search(r"Emails captured by the SMTP sink: (\d+)", out).group(1))
    calls = int(re.search(r"Approve/reject calls HasOffers received: (\d+)", out).group(1))
    assert changes > 0 and emails > 0 and calls > 0, out
    assert re.search(r"email_affiliate\s+succeeded", out) and re.search(r"reject_affiliate\s+succeeded", out)
    assert "Dead letters: metric_loader 0, trigger_checker 0, event_detector 0, action_runner 0" in out
    assert "stopped everything it started" in out
