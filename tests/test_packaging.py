"""What ships: the wheel (which the product image installs) and the image hold no test code."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.support import ROOT

SHIPPED = ("shared/", "services/", "migrations/")


def product_stage() -> list[str]:
    """The Dockerfile's last stage (the product image), line by line."""
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.M)
    return stages[-1].splitlines()


def copied_into_the_image() -> list[str]:
    """Every source of a COPY of the product stage."""
    sources = []
    for line in product_stage():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    return sources


def test_the_product_image_copies_no_test_code():
    sources = copied_into_the_image()
    assert {"shared", "services", "migrations", "pyproject.toml"} <= set(sources)
    assert not {"testkit", "tests", "scripts", "."} & set(sources), sources


def test_the_wheel_holds_the_product_only(tmp_path: Path):
    # Built from a copy of the whole tree, testkit/, tests/ and scripts/ included, so the
    # packaging rules themselves are what keeps them out; a build/ left in the working
    # tree by an earlier build could otherwise slip old files into the wheel.
    context = tmp_path / "context"
    shutil.copytree(ROOT, context, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(context), "--no-deps", "--quiet",
                             "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    outside = [n for n in code if not n.startswith(SHIPPED)]
    assert code and not outside, outside
    assert not [n for n in names if n.startswith(("testkit/", "tests/", "scripts/")) or "fake" in n.lower()]
    assert "services/metric_loader/handler.py" in names and "migrations/versions/0001_initial_schema.py" in names


def _pinned(lock: Path) -> dict[str, str]:
    """{name: version} of a lock file, each pin followed by at least one sha256 hash."""
    text = lock.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)(?: ;[^\\\n]*)? \\\n\s+--hash=sha256:[0-9a-f]{64}", text, re.M))
    assert len(pins) == len(re.findall(r"^[A-Za-z0-9_.-]+==", text, re.M)), f"{lock.name}: a pin without a hash"
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins.items()}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", r).group()).lower() for r in requirements}


def test_the_lock_files_pin_every_dependency_with_hashes_and_are_what_gets_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    product = _pinned(ROOT / "requirements.lock")
    everything = _pinned(ROOT / "requirements-test.lock")
    assert _requirement_names(project["dependencies"]) <= set(product)
    assert _requirement_names(project["dependencies"] + project["optional-dependencies"]["test"]) <= set(everything)
    # One version of each package in both files, and no test package in the product's.
    assert all(everything[name] == version for name, version in product.items())
    assert not _requirement_names(project["optional-dependencies"]["test"]) & set(product)
    install = " ".join(line for line in product_stage() if line.startswith(("RUN", " ")))
    assert "pip install --require-hashes --no-deps -r requirements.lock" in install
    assert "requirements.lock" in copied_into_the_image()
    assert "--require-hashes --no-deps -r requirements-test.lock" in (ROOT / "scripts/venv.sh").read_text()
