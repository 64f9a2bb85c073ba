"""Screenshots of the console for the README: docs/console-problems.png, docs/console-pair.png.

Seeds a database of its own with a day of a network's history (tests/console_world.py:
30 offers x 25 affiliates x 4 triggers, a check every 15 minutes), serves the console
and photographs the problems page and the pair page of a pair whose threshold changed
and whose state flipped several times, with Debian's chromium (headless, Playwright).

    .venv/bin/python scripts/console_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from shared import migrate  # noqa: E402
from shared.console.app import create_app  # noqa: E402
from shared.console.security import Credentials  # noqa: E402
from shared.db import make_engine  # noqa: E402
from tests.conftest import create_database, drop_database  # noqa: E402
from tests.console_support import CHROMIUM_ARGS, chromium_path, running_console  # noqa: E402
from tests.console_world import seed_console_world  # noqa: E402

USER, PASSWORD = "ops", uuid.uuid4().hex


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    chromium = chromium_path()
    if chromium is None:
        raise SystemExit("no chromium: run scripts/ensure-browser.sh")
    name = f"kpi_shots_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    engine = make_engine(url)
    try:
        migrate.upgrade(url)
        with engine.begin() as conn:
            seed_console_world(conn, offers=30, affiliates=25, rounds=96, interval=timedelta(minutes=15))
            # A pair in PROBLEM on 'min CR' whose offer x affiliate threshold came in halfway.
            offer_id, affiliate_id = conn.execute(text("""
                SELECT e.offer_id, e.affiliate_id FROM trigger_events e
                JOIN trigger_states s ON (s.trigger_id, s.offer_id, s.affiliate_id) = (1, e.offer_id, e.affiliate_id)
                WHERE e.trigger_id = 1 AND (e.offer_id * 31 + e.affiliate_id) % 17 = 0 AND s.status = 'PROBLEM'
                GROUP BY 1, 2 ORDER BY count(*) DESC, 1, 2 LIMIT 1
            """)).one()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
        app = create_app(engine, credentials=Credentials(USER, PASSWORD), bus_factory=lambda: None)
        out = Path(args.out)
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
            browser.close()
        print(f"wrote {out / 'console-problems.png'} and {out / 'console-pair.png'} (pair {offer_id}/{affiliate_id})")
        return 0
    finally:
        engine.dispose()
        drop_database(name)


if __name__ == "__main__":
    sys.exit(main())
