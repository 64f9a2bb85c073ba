"""`kpi web` as a process: when it refuses to start, and that it serves what it should."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from testkit.ports import free_port
from testkit.waiting import wait_for
from tests.support import ROOT

NO_CREDENTIALS = {"KPI_WEB_USER": "", "KPI_WEB_PASSWORD": ""}


def kpi_web(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", "web", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("env, args, says", [
    (NO_CREDENTIALS, [], "set KPI_WEB_USER and KPI_WEB_PASSWORD"),
    (NO_CREDENTIALS, ["--host", "0.0.0.0"], "set KPI_WEB_USER and KPI_WEB_PASSWORD"),
    ({"KPI_WEB_USER": "ops", "KPI_WEB_PASSWORD": ""}, [], "set KPI_WEB_USER and KPI_WEB_PASSWORD"),
    (NO_CREDENTIALS, ["--no-auth", "--host", "0.0.0.0"], "--no-auth is only allowed with --host 127.0.0.1"),
    ({"KPI_WEB_USER": "ops", "KPI_WEB_PASSWORD": "pw"}, ["--port", "70000"], "--port must be from 1 to 65535"),
])
def test_kpi_web_refuses_to_start_with_one_line_and_exit_2(service_env, env, args, says):
    result = kpi_web({**service_env, **env}, *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kpi: error: ") and says in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_kpi_web_exits_3_when_postgresql_is_unreachable(service_env):
    env = {**service_env, "KPI_WEB_USER": "ops", "KPI_WEB_PASSWORD": "pw",
           "DATABASE_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/kpi"}
    result = kpi_web(env)
    assert result.returncode == 3 and "PostgreSQL not reachable" in result.stderr
    assert result.stderr.count("\n") == 1


def serve(env: dict[str, str], *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "shared.cli", "web", "--port", str(port), *args], cwd=ROOT,
                               env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def listening() -> bool:
        if process.poll() is not None:
            return True
        try:
            httpx.get(base + "/static/console.css", timeout=1)
            return True
        except httpx.TransportError:
            return False

    wait_for(listening, 20, what="kpi web to listen")
    assert process.poll() is None, process.stdout.read()
    return process, base


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=15)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Finished server process" in output
    return output


def test_kpi_web_serves_with_basic_auth(service_env):
    password = "a long password with spaces"
    process, base = serve({**service_env, "KPI_WEB_USER": "ops", "KPI_WEB_PASSWORD": password})
    try:
        assert httpx.get(base + "/").status_code == 401
        assert httpx.get(base + "/", auth=("ops", "nope")).status_code == 401
        page = httpx.get(base + "/", auth=("ops", password))
        assert page.status_code == 200 and "Pairs in PROBLEM" in page.text
        assert httpx.get(base + "/api/problems", auth=("ops", password)).json()["total"] >= 0
        assert "server" not in page.headers
    finally:
        output = stop(process)
    assert password not in output


def test_kpi_web_no_auth_serves_on_loopback_without_credentials(service_env):
    process, base = serve({**service_env, **NO_CREDENTIALS}, "--no-auth")
    try:
        page = httpx.get(base + "/loads")
        assert page.status_code == 200 and "Load runs" in page.text
        assert 'class="user"' in page.text and ">local<" in page.text
    finally:
        output = stop(process)
    assert "without authentication" in output
