"""The console under test: a real uvicorn server on a free port, and the system's
chromium for the browser tests."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette

from testkit.ports import free_port
from testkit.waiting import wait_for

# Debian's chromium: the real binary (the /usr/bin/chromium launcher script works too).
CHROMIUM_CANDIDATES = ["/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@contextmanager
def running_console(app: Starlette) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name=f"console-{port}", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 15, what="the console to listen")
    assert thread.is_alive(), "the console's server thread died at start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def chromium_path() -> str | None:
    explicit = os.environ.get("KPI_TEST_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for candidate in CHROMIUM_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")
