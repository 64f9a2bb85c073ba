"""RabbitMQ permissions per service: what each process's user may configure, write and
read, and which routing keys it may publish on the exchange (topic permissions).

A service's user may declare (configure) the exchange and its own three queues, bind
its work queue (write on the queue, read on the exchange), consume its work queue, and
publish its own events on the exchange and its retries and dead letters through the
default exchange. Declaring the other services' queues is refused: declare_topology
then only checks that they exist. The console may publish the trigger events of the
held runs it releases and read (and hand back) the dead letters it shows.

`kpi broker permissions` prints these as rabbitmqctl commands.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from shared.events import METRIC_LOAD_REQUESTED, METRIC_LOADED, OPERATION_EXECUTED, TRIGGER_CHECKED, TRIGGER_EVENT_TYPES
from shared.rabbitmq.topology import SERVICE_BINDINGS, queue_names

TRIGGER_EVENTS = tuple(sorted(TRIGGER_EVENT_TYPES.values()))
# Who publishes what on the exchange (docs/DESIGN.md section 1, and the re-announcements:
# the schedule's requests, the action_runner's reminders and released held runs).
PUBLISHES: dict[str, tuple[str, ...]] = {
    "metric_loader": (METRIC_LOAD_REQUESTED, METRIC_LOADED),
    "trigger_checker": (TRIGGER_CHECKED,),
    "event_detector": TRIGGER_EVENTS,
    "action_runner": (OPERATION_EXECUTED, *TRIGGER_EVENTS),
    "console": TRIGGER_EVENTS,
}
USERS = tuple(PUBLISHES)
DEFAULT_EXCHANGE = "amq.default"


@dataclass(frozen=True)
class Permissions:
    user: str
    configure: str
    write: str
    read: str
    exchange: str
    topic_write: str
    topic_read: str = ".*"


def _any_of(names: list[str]) -> str:
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def permissions(exchange: str, role: str, user: str | None = None) -> Permissions:
    """The permissions of `role` (a service or "console") on a deployment's exchange."""
    if role not in PUBLISHES:
        raise ValueError(f"no such role: {role}")
    topic_write = _any_of(list(PUBLISHES[role]))
    if role == "console":
        dead = [queue_names(exchange, service).dead for service in SERVICE_BINDINGS]
        return Permissions(user or role, configure=_any_of([exchange]), write=_any_of([exchange]),
                           read=_any_of([exchange, *dead]), exchange=exchange, topic_write=topic_write)
    names = queue_names(exchange, role)
    return Permissions(
        user or role,
        configure=_any_of([exchange, names.work, names.retry, names.dead]),
        write=_any_of([exchange, DEFAULT_EXCHANGE, names.work]),
        read=_any_of([exchange, names.work]),
        exchange=exchange,
        topic_write=topic_write,
    )


def rabbitmqctl_commands(perms: Permissions, vhost: str = "/", password: str | None = None) -> list[list[str]]:
    """The rabbitmqctl commands that give `perms.user` these permissions (the user is
    created with `password`; None: it exists already)."""
    commands = []
    if password is not None:
        commands.append(["rabbitmqctl", "add_user", perms.user, password])
    commands += [
        ["rabbitmqctl", "set_permissions", "-p", vhost, perms.user, perms.configure, perms.write, perms.read],
        ["rabbitmqctl", "set_topic_permissions", "-p", vhost, perms.user, perms.exchange, perms.topic_write,
         perms.topic_read],
    ]
    return commands


def script(exchange: str, vhost: str = "/", prefix: str = "kpi_") -> str:
    """A shell script that creates each user with its password from the environment
    (KPI_AMQP_PASSWORD_<ROLE>) and gives it its permissions."""
    lines = ["#!/bin/sh", "# hasoffers-kpi: RabbitMQ users per service (kpi broker permissions)", "set -eu"]
    for role in USERS:
        perms = permissions(exchange, role, prefix + role)
        variable = f"KPI_AMQP_PASSWORD_{role.upper()}"
        lines.append(f"rabbitmqctl add_user {shlex.quote(perms.user)} \"${variable}\" 2>/dev/null || "
                     f"rabbitmqctl change_password {shlex.quote(perms.user)} \"${variable}\"")
        lines += [shlex.join(command) for command in rabbitmqctl_commands(perms, vhost)]
    return "\n".join(lines) + "\n"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    import base64
    import hashlib
    import os

    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(exchange: str, users: dict[str, tuple[str, str]], vhost: str = "/",
                admin: tuple[str, str] | None = None) -> dict:
    """RabbitMQ definitions (`rabbitmqctl import_definitions`, or `load_definitions` at
    boot) of the users: role -> (user name, password); with `admin` (user, password), the
    vhost and an administrator too (a node that loads definitions at boot makes neither)."""
    out: dict[str, list] = {"users": [], "permissions": [], "topic_permissions": []}
    if admin is not None:
        out["vhosts"] = [{"name": vhost}]
        out["users"].append({"name": admin[0], "password_hash": password_hash(admin[1]),
                             "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"]})
        out["permissions"].append({"user": admin[0], "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"})
    for role, (user, password) in users.items():
        perms = permissions(exchange, role, user)
        out["users"].append({"name": user, "password_hash": password_hash(password),
                             "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []})
        out["permissions"].append({"user": user, "vhost": vhost, "configure": perms.configure,
                                   "write": perms.write, "read": perms.read})
        out["topic_permissions"].append({"user": user, "vhost": vhost, "exchange": exchange,
                                         "write": perms.topic_write, "read": perms.topic_read})
    return out


def password_from_env(role: str, environ: dict[str, str] | None = None) -> str | None:
    """KPI_AMQP_PASSWORD_<ROLE>, or the content of the file KPI_AMQP_PASSWORD_<ROLE>_FILE."""
    import os
    from pathlib import Path

    environ = os.environ if environ is None else environ
    name = f"KPI_AMQP_PASSWORD_{role.upper()}"
    value, path = environ.get(name), environ.get(f"{name}_FILE")
    if value is not None and path:
        raise ValueError(f"set {name} or {name}_FILE, not both")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        except OSError as exc:
            raise ValueError(f"{name}_FILE: cannot read {path}: {exc.strerror or exc}") from None
    return value or None
