#!/usr/bin/env bash
# Create .venv and install the project into it, once (again when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -e ".[test]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
