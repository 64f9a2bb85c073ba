"""The demo command end to end: the whole pipeline against the fake network, the console
left running with --keep until Ctrl-C, and the backtest and explain it ends with."""

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from testkit.ports import port_open
from tests.support import ROOT

KEPT = "press Ctrl-C to stop them"


# The whole pipeline, its ~400 emails and a backtest: minutes on a busy machine.
@pytest.mark.timeout(600)
def test_the_demo_runs_the_pipeline_prints_a_summary_and_keeps_the_console_running():
    demo = subprocess.Popen([sys.executable, "-m", "scripts.demo", "--keep"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in demo.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 480
        while not seen or KEPT not in seen[-1]:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "the demo ended before it said it keeps running:\n" + "".join(seen)
            seen.append(line)
        out = "".join(seen)
        # --keep: the console answers, with the credentials the demo printed and not without.
        url, user, password = re.search(r"^Console: (http://127\.0\.0\.1:\d+/) \(user (\S+), password (\S+) ",
                                        out, re.M).groups()
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("/").status_code == 401
            problems = client.get("/api/problems", auth=(user, password)).json()
            assert client.get("/silences", auth=(user, password)).status_code == 200
        assert problems["total"] == int(re.search(r"it answers: (\d+) pairs in PROBLEM", out).group(1)) > 0
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
    finally:
        if demo.poll() is None:  # a failed check: Ctrl-C still stops what the demo started
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(60)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    out = "".join(seen)
    assert not port_open(urlsplit(url).port), "the console still runs after Ctrl-C"

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

    # The ending: the backtest of the demo's own history agrees with what the services did,
    # and the explain of a rejected pair says why its reject ran.
    assert re.search(r"^\$ kpi backtest --from \S+$", out, re.M), out
    replayed = int(re.search(r"^    state changes: (\d+) ", out, re.M).group(1))
    services, rejected = map(int, re.search(r"the services recorded: (\d+) state changes, (\d+) affiliates rejected",
                                            out).groups())
    would_reject = int(re.search(r"^  reject_affiliate\s+(\d+)\s+\d+\s+\d+\s+\d+$", out, re.M).group(1))
    assert replayed == services == changes and would_reject == rejected > 0, out
    trigger, offer, affiliate = re.search(r"^\$ kpi explain --trigger '([^']+)' --offer (\d+) --affiliate (\d+)$",
                                          out, re.M).groups()
    assert re.search(rf"^  {re.escape(trigger)} \(.*\) for offer {offer} \(.*\) / affiliate {affiliate} ", out, re.M)
    assert re.search(r"^        run \d+ reject_affiliate: succeeded", out, re.M), out
    assert "stopped everything it started" in out
