"""A throw-away RabbitMQ cluster of extra nodes on this machine, beside its own node.

    python3 scripts/rabbit_cluster.py up [--nodes 3]    boot and cluster the nodes, print their URLs
    python3 scripts/rabbit_cluster.py status            cluster_status as node 1 sees it
    python3 scripts/rabbit_cluster.py kill 2 | start 2  kill -9 a node's VM / boot it again (it rejoins)
    python3 scripts/rabbit_cluster.py ctl 2 stop_app    rabbitmqctl -n <node 2> stop_app
    python3 scripts/rabbit_cluster.py down              stop every node and remove its files

Nodes `<prefix>1@localhost`, `<prefix>2@localhost`, ... with AMQP on 127.0.0.1:<port base + i>
and Erlang distribution on <dist base + i>; everything they write lives under one
directory (default /tmp/kpi-rabbit-cluster), removed by `down`. The machine's own node
(rabbit@localhost, 5672) is never touched: the extra nodes only ever join node 1 of
their own cluster.

Needs root and the Debian rabbitmq-server package: the nodes run as the rabbitmq user
with its home, so they and rabbitmqctl share the machine's Erlang cookie. Each node has
its own env file, config and plugins file, because /etc/rabbitmq/rabbitmq-env.conf pins
the node name and /etc/rabbitmq/rabbitmq.conf the listener of the machine's node.
Standard library only: the test suite and the fault suite import it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")  # the real scripts: the /usr/sbin wrappers redirect output
RUN_AS = "rabbitmq"
RABBIT_HOME = "/var/lib/rabbitmq"  # holds .erlang.cookie


class ClusterError(Exception):
    pass


def missing_requirement() -> str | None:
    """Why no cluster can be made here, or None."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        return "rabbitmq-server is not installed (Debian package rabbitmq-server)"
    if os.geteuid() != 0:
        return "extra RabbitMQ nodes run as the rabbitmq user: run as root"
    return None


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_bases(nodes: int, candidates: range = range(5680, 5800, 10)) -> tuple[int, int]:
    """(AMQP port base, distribution port base) with every port of `nodes` nodes free."""
    for base in candidates:
        dist = base + 20000
        if all(port_free(base + i) and port_free(dist + i) for i in range(1, nodes + 1)):
            return base, dist
    raise ClusterError(f"no free ports for {nodes} nodes in {candidates}")


@dataclass
class RabbitCluster:
    nodes: int = 3
    base: Path = Path("/tmp/kpi-rabbit-cluster")
    prefix: str = "kpi-t"
    port_base: int = 5680
    dist_base: int = 25680
    host: str = "localhost"
    timings: dict[str, float] = field(default_factory=dict)

    # -- names ------------------------------------------------------------------------

    @property
    def indexes(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    def node_name(self, i: int) -> str:
        return f"{self.prefix}{i}@{self.host}"

    def port(self, i: int) -> int:
        return self.port_base + i

    def url(self, i: int, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port(i)}/%2F"

    def urls_from(self, i: int) -> str:
        """Every node's URL, comma-separated, node i first: an AMQP_URL for a replica of node i."""
        order = self.indexes[i - 1:] + self.indexes[:i - 1]
        return ",".join(self.url(j) for j in order)

    def directory(self, i: int) -> Path:
        return self.base / f"n{i}"

    def env(self, i: int) -> dict[str, str]:
        d = self.directory(i)
        return {
            "RABBITMQ_NODENAME": self.node_name(i),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port(i)),
            "RABBITMQ_DIST_PORT": str(self.dist_base + i),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    # -- commands ---------------------------------------------------------------------

    def _as_rabbit(self, command: list[str], env: dict[str, str] | None = None, timeout: float = 120,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
        # `su` keeps the environment; HOME must be the rabbitmq user's for the cookie.
        line = " ".join(_quote(part) for part in command)
        result = subprocess.run(
            ["su", RUN_AS, "-s", "/bin/sh", "-c", f"cd {RABBIT_HOME} && HOME={RABBIT_HOME} exec {line}"],
            env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"{line}: exit {result.returncode}: {(result.stderr or result.stdout).strip()[-500:]}")
        return result

    def ctl(self, i: int, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """rabbitmqctl -n <node i> args..."""
        return self._as_rabbit([str(RABBIT_BIN / "rabbitmqctl"), "-q", "-n", self.node_name(i), *args],
                               timeout=timeout, check=check)

    def pid(self, i: int) -> int | None:
        try:
            return int((self.directory(i) / "rabbit.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    # -- life cycle -------------------------------------------------------------------

    def up(self) -> RabbitCluster:
        """Boot the nodes (in parallel) and cluster them; idempotent (tears down first)."""
        problem = missing_requirement()
        if problem:
            raise ClusterError(problem)
        started = time.monotonic()
        self.down()
        for i in self.indexes:
            for port in (self.port(i), self.dist_base + i):
                if not port_free(port):
                    raise ClusterError(f"port {port} is in use")
        for i in self.indexes:
            self._prepare(i)
        for i in self.indexes:
            self._boot(i)
        with ThreadPoolExecutor(self.nodes) as pool:
            list(pool.map(self.wait_started, self.indexes))
        self.timings["boot"] = time.monotonic() - started
        for i in self.indexes[1:]:
            self.ctl(i, "stop_app")
            self.ctl(i, "join_cluster", self.node_name(self.indexes[0]))
            self.ctl(i, "start_app")
        self.ctl(self.indexes[0], "await_online_nodes", str(self.nodes), "--timeout", "60")
        self.timings["up"] = time.monotonic() - started
        return self

    def _prepare(self, i: int) -> None:
        d = self.directory(i)
        (d / "mnesia").mkdir(parents=True)
        (d / "log").mkdir()
        (d / "rabbitmq-env.conf").write_text(
            f"# extra node {self.node_name(i)} (scripts/rabbit_cluster.py)\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n')
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port(i)}\n"
            "loopback_users = none\n"
            "log.file.level = info\n"
            "log.console = false\n"
            "vm_memory_high_watermark.relative = 0.2\n"
            "disk_free_limit.absolute = 50MB\n")
        (d / "enabled_plugins").write_text("[].\n")  # no management plugin: no port 15672 clash
        shutil.chown(self.base, RUN_AS, RUN_AS)
        for path in [d, *d.rglob("*")]:
            shutil.chown(path, RUN_AS, RUN_AS)

    def _boot(self, i: int) -> None:
        self._as_rabbit([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], env=self.env(i), timeout=60)

    def wait_started(self, i: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.ctl(i, "await_startup", "--timeout", "60", check=False, timeout=90).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.node_name(i)} did not start; see {self.directory(i) / 'log'}")
            time.sleep(0.5)

    def start(self, i: int) -> None:
        """Boot a node that was killed or stopped again: it rejoins its cluster by itself."""
        self._boot(i)
        self.wait_started(i)

    def kill(self, i: int) -> None:
        """kill -9 the node's Erlang VM: the node is lost, as with a machine gone."""
        pid = self.pid(i)
        if pid is None:
            raise ClusterError(f"{self.node_name(i)} has no pid file")
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10)

    def stop_node(self, i: int) -> None:
        pid = self.pid(i)
        self.ctl(i, "stop", check=False, timeout=60)
        if pid is not None and not _wait_gone(pid, 15):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(pid, 10)

    def down(self) -> None:
        """Stop every node (in parallel) and remove the directory; nothing to do if it is absent."""
        if not self.base.exists():
            return
        started = time.monotonic()
        running = [i for i in self.indexes if self.directory(i).exists()]
        with ThreadPoolExecutor(max(len(running), 1)) as pool:
            list(pool.map(self.stop_node, running))
        shutil.rmtree(self.base, ignore_errors=True)
        self.timings["down"] = time.monotonic() - started

    def __enter__(self) -> RabbitCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _quote(part: str) -> str:
    return part if part.replace("/", "").replace("-", "").replace("_", "").replace("@", "").replace(".", "").isalnum() \
        else "'" + part.replace("'", "'\\''") + "'"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["up", "down", "status", "kill", "start", "ctl"])
    p.add_argument("args", nargs="*")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--base", type=Path, default=Path("/tmp/kpi-rabbit-cluster"))
    p.add_argument("--port-base", type=int, default=5680, help="node i listens on this + i (distribution: + 20000)")
    args = p.parse_args(argv)
    cluster = RabbitCluster(nodes=args.nodes, base=args.base, port_base=args.port_base,
                            dist_base=args.port_base + 20000)
    try:
        if args.command == "up":
            cluster.up()
            print(f"up: {cluster.nodes} nodes booted in {cluster.timings['boot']:.1f}s, "
                  f"clustered in {cluster.timings['up']:.1f}s")
            for i in cluster.indexes:
                print(f"  {cluster.node_name(i)}  {cluster.url(i)}  pid {cluster.pid(i)}")
            print(f"AMQP_URL={cluster.urls_from(1)}")
        elif args.command == "down":
            existed = cluster.base.exists()
            cluster.down()
            print(f"down: stopped and removed {cluster.base}" if existed else f"down: nothing to do ({cluster.base} absent)")
        elif args.command == "status":
            print(cluster.ctl(1, "cluster_status").stdout)
        elif args.command == "kill":
            cluster.kill(int(args.args[0]))
        elif args.command == "start":
            cluster.start(int(args.args[0]))
        elif args.command == "ctl":
            result = cluster.ctl(int(args.args[0]), *args.args[1:], check=False)
            print(result.stdout, end="")
            print(result.stderr, end="", file=sys.stderr)
            return result.returncode
    except ClusterError as exc:
        print(f"rabbit_cluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
