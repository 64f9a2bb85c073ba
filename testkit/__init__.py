"""What the tests, the demo, the benchmarks and the fault suite run the product with.

Each piece exists once here: the fake HasOffers (`python -m testkit.fake_hasoffers`),
the SMTP sink, the service process launcher, database and exchange set-up and
teardown, the free-port finder and the deadline wait.

None of it ships: the wheel (and so the Docker image) is built from shared/, services/
and migrations/ only (pyproject.toml), and tests/test_packaging.py checks it. Its
dependencies come with the `test` extra; the package itself is imported from the source
tree, which is on sys.path wherever it is used: pytest adds the repository root
(`pythonpath` in pyproject.toml) and the scripts run as `python -m ...` from there.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
