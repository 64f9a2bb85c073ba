#!/usr/bin/env bash
# Create .venv with the pinned, hash-checked dependencies of requirements-test.lock and the
# project itself (editable).
# The lock files come from `uv pip compile` (see the comment at the top of
# requirements.lock for the command); pip alone installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
    echo "venv.sh: error: $python not found; hasoffers-kpi needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 2
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "venv.sh: error: $("$python" -V 2>&1) is too old; hasoffers-kpi needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 2
fi
# The dependencies are reinstalled from scratch when the lock file changes; the project
# (its entry points, its package list) again when pyproject.toml changes.
dependencies=.venv/.dependencies-$(sha1sum requirements-test.lock | cut -c1-12)
project=.venv/.project-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$dependencies" ]; then
    rm -rf .venv
    "$python" -m venv .venv
    .venv/bin/pip install --quiet --require-hashes --no-deps -r requirements-test.lock
    touch "$dependencies"
fi
if [ ! -f "$project" ]; then
    .venv/bin/pip install --quiet --no-deps -e .
    # A dependency in pyproject.toml that the lock file lacks: regenerate the lock files.
    .venv/bin/pip check >/dev/null || { .venv/bin/pip check >&2; echo "venv.sh: error: requirements-test.lock does not satisfy pyproject.toml;" \
        "regenerate it (the command is at its top)" >&2; exit 1; }
    rm -f .venv/.project-*
    touch "$project"
fi
