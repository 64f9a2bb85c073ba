#!/usr/bin/env bash
# The console's browser tests drive Debian's chromium through Playwright, with the
# system's executable (Playwright downloads no browser). Install chromium when it is
# missing and this machine can (root, apt-get). Elsewhere the browser tests are skipped
# and say why; under CI a failed install fails the run.
set -euo pipefail
if [ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-browser: chromium is missing and cannot be installed here (needs root and apt-get);" \
         "the browser tests will be skipped" >&2
    [ -z "${CI:-}" ] || exit 1
    exit 0
fi
if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; then
    echo "ensure-browser: apt-get install chromium failed; the browser tests will be skipped" >&2
    [ -z "${CI:-}" ] || exit 1
    exit 0
fi
echo "ensure-browser: installed $(/usr/lib/chromium/chromium --version 2>/dev/null || echo chromium)"
