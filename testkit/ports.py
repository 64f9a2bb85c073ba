"""Local TCP ports for the servers the tests start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on right now (the OS's choice), for a server about to start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0
