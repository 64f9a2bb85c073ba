"""Certificates for TLS tests, made on the spot with the openssl command (a CA of their
own and a server certificate it signed for localhost and 127.0.0.1), and PostgreSQL and
RabbitMQ servers of their own that present it, beside the machine's."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    ca: Path     # the CA certificate a client trusts
    cert: Path   # the server's certificate, for `localhost` and 127.0.0.1
    key: Path    # its private key (mode 0600, as PostgreSQL requires)
    other_ca: Path  # a CA that signed nothing here: a client trusting only it must refuse


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", key, "-out", cert)
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _make_ca(directory, "test-ca")
    other_ca, _ = _make_ca(directory, "other-ca")
    key, request, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", key, "-out", request)
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                          "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
             "-extfile", extensions, "-out", cert)
    key.chmod(0o600)
    return Certificates(ca=ca, cert=cert, key=key, other_ca=other_ca)


# -- servers with TLS listeners of their own, beside the machine's (never reconfigured) ----

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def missing_requirement() -> str | None:
    """Why no TLS server of our own can be started here, or None."""
    import os
    import shutil

    if os.geteuid() != 0:
        return "the TLS servers run as the postgres and rabbitmq users: run as root"
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL server binaries are not in {PG_BIN}"
    if shutil.which("rabbitmq-server") is None:
        return "rabbitmq-server is not installed"
    return None


def _as_user(user: str, command: list[str], timeout: float = 120) -> None:
    import shlex

    result = subprocess.run(["su", user, "-s", "/bin/sh", "-c", shlex.join(command)], capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]}: exit {result.returncode}: {(result.stderr or result.stdout)[-800:]}")


def _copy_for(user: str, certificates: Certificates, directory: Path) -> tuple[Path, Path, Path]:
    """The CA, certificate and key, owned by `user` (the key readable by it alone)."""
    import shutil

    copies = []
    for source in (certificates.ca, certificates.cert, certificates.key):
        target = directory / source.name
        shutil.copy(source, target)
        shutil.chown(target, user, user)
        copies.append(target)
    copies[2].chmod(0o600)
    return copies[0], copies[1], copies[2]


@contextmanager
def tls_postgres(certificates: Certificates) -> Iterator[int]:
    """A PostgreSQL cluster of its own (initdb, pg_ctl) on a free port of 127.0.0.1 that
    takes TLS connections only (pg_hba: hostssl trust, hostnossl reject); its port."""
    import shutil
    import tempfile

    from testkit.ports import free_port

    directory = Path(tempfile.mkdtemp(prefix="kpi-pg-tls-"))
    shutil.chown(directory, "postgres", "postgres")
    data = directory / "data"
    port = free_port()
    _as_user("postgres", [str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"])
    ca, cert, key = _copy_for("postgres", certificates, data)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{directory}'\n"
                   f"ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\nssl_ca_file = '{ca}'\n"
                   "fsync = off\nshared_buffers = 16MB\nmax_connections = 20\n")
    (data / "pg_hba.conf").write_text("local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
                                      "hostnossl all all 127.0.0.1/32 reject\n")
    try:
        _as_user("postgres", [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(directory / "log"), "-w", "-t", "60",
                              "start"])
        yield port
    finally:
        try:
            _as_user("postgres", [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        except RuntimeError:
            pass
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def tls_rabbitmq(certificates: Certificates) -> Iterator[int]:
    """An extra RabbitMQ node of its own (scripts/rabbit_cluster.py, one node, a config of
    its own) with a TLS listener on a free port of 127.0.0.1; that port."""
    from testkit.ports import free_port

    tls_port = free_port()

    def configure(directory: Path) -> str:
        from scripts.rabbit_cluster import RUN_AS

        ca, cert, key = _copy_for(RUN_AS, certificates, directory)
        return (f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
                f"ssl_options.cacertfile = {ca}\nssl_options.certfile = {cert}\n"
                f"ssl_options.keyfile = {key}\nssl_options.verify = verify_none\n"
                "ssl_options.fail_if_no_peer_cert = false\n")

    with extra_rabbitmq(configure):
        yield tls_port


@contextmanager
def extra_rabbitmq(configure: Callable[[Path], str]) -> Iterator[int]:
    """One extra RabbitMQ node (scripts/rabbit_cluster.py) whose rabbitmq.conf also holds
    what `configure(its directory)` returns; its AMQP port on 127.0.0.1."""
    import shutil
    import uuid

    from scripts.rabbit_cluster import RabbitCluster, free_port_bases

    run = uuid.uuid4().hex[:8]
    port_base, dist_base = free_port_bases(1, range(5900, 6100, 10))

    class Node(RabbitCluster):
        def _prepare(self, i: int) -> None:
            super()._prepare(i)
            with open(self.directory(i) / "rabbitmq.conf", "a") as conf:
                conf.write(configure(self.directory(i)))

    node = Node(nodes=1, base=Path(f"/tmp/kpi-rabbit-extra-{run}"), prefix=f"kpi-x{run}-",
                port_base=port_base, dist_base=dist_base)
    try:
        node.up()
        yield node.port(1)
    finally:
        node.down()
        shutil.rmtree(node.base, ignore_errors=True)
