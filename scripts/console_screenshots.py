"""Screenshots of the console for the README: docs/console-problems.png, docs/console-pair.png,
docs/console-silences.png, docs/console-held.png.

Seeds a database of its own with a day of a network's history (testkit/console_world.py:
30 offers x 25 affiliates x 4 triggers, a check every 15 minutes), serves the console
and photographs the problems page and the pair page of a pair whose threshold changed
and whose state flipped several times, with Debian's chromium (headless, Playwright).

    .venv/bin/python -m scripts.console_screenshots [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import uuid
from datetime import timedelta
from pathlib import Path

from playwright.sync_api import sync_playwright
from sqlalchemy import Engine, text

from shared.console.app import create_app
from shared.console.security import Credentials
from shared.db import make_engine
from testkit import ROOT
from testkit.console import CHROMIUM_ARGS, chromium_path, running_console
from testkit.console_world import seed_console_world
from testkit.database import admin_url, temporary_database

USER, PASSWORD = "ops", uuid.uuid4().hex


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    chromium = chromium_path()
    if chromium is None:
        raise SystemExit("no chromium: run scripts/ensure-browser.sh")
    with temporary_database(admin_url("TEST_PG_ADMIN_URL"), "kpi_shots") as url:
        engine = make_engine(url)
        try:
            return _photograph(engine, chromium, Path(args.out))
        finally:
            engine.dispose()


def _photograph(engine: Engine, chromium: str, out: Path) -> int:
    """Seed a day of history, serve the console and photograph two of its pages."""
    with engine.begin() as conn:
        seed_console_world(conn, offers=30, affiliates=25, rounds=96, interval=timedelta(minutes=15))
        # A pair in PROBLEM on 'min CR' whose offer x affiliate threshold came in halfway.
        offer_id, affiliate_id = conn.execute(text("""
            SELECT e.offer_id, e.affiliate_id FROM trigger_events e
            JOIN trigger_states s ON (s.trigger_id, s.offer_id, s.affiliate_id) = (1, e.offer_id, e.affiliate_id)
            WHERE e.trigger_id = 1 AND (e.offer_id * 31 + e.affiliate_id) % 17 = 0 AND s.status = 'PROBLEM'
            GROUP BY 1, 2 ORDER BY count(*) DESC, 1, 2 LIMIT 1
        """)).one()
        # Two silences in force and one ended, and four rejects held by the hourly cap.
        conn.execute(text("""
            INSERT INTO silences (trigger_id, offer_id, affiliate_id, starts_at, ends_at, reason, created_by) VALUES
                (1, 7, NULL, now() - interval '1 hour', now() + interval '3 hours',
                 'advertiser paused the offer for a landing page fix', 'ops'),
                (NULL, NULL, 12, now() - interval '20 minutes', now() + interval '1 day',
                 'affiliate moving servers; traffic resumes tomorrow', 'anna'),
                (3, NULL, NULL, now() - interval '2 days', now() - interval '1 day', 'payout table being corrected',
                 'ops')"""))
        conn.execute(text("""
            UPDATE operation_runs SET status = 'held', detail = 'held: 25 rejects this hour (the cap)',
                   finished_at = created_at
            WHERE id IN (SELECT id FROM operation_runs WHERE kind = 'reject_affiliate' ORDER BY id DESC LIMIT 4)"""))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    app = create_app(engine, credentials=Credentials(USER, PASSWORD), bus_factory=lambda: None)
    with running_console(app) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                      viewport={"width": 1360, "height": 940}, device_scale_factor=1)
        page = context.new_page()
        page.goto(base + "/")
        page.screenshot(path=str(out / "console-problems.png"))
        page.set_viewport_size({"width": 1360, "height": 1330})
        page.goto(f"{base}/pairs/{offer_id}/{affiliate_id}")
        page.screenshot(path=str(out / "console-pair.png"))
        page.set_viewport_size({"width": 1360, "height": 720})
        page.goto(f"{base}/silences?ended=1")
        page.screenshot(path=str(out / "console-silences.png"))
        page.goto(f"{base}/held")
        page.screenshot(path=str(out / "console-held.png"))
        browser.close()
    print(f"wrote console-problems.png, console-pair.png (pair {offer_id}/{affiliate_id}), console-silences.png and "
          f"console-held.png in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
