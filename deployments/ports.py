"""Loopback ports for the child servers a replica, a test or a benchmark starts."""

from __future__ import annotations

import random
import socket

# Linux hands out ports from 32768 up to connections that do not bind one: a port chosen
# below that stays free until the server that was chosen it binds it, minutes later
LISTEN_PORTS = range(20000, 32000)


def free_port() -> int:
    """A port free on 127.0.0.1 now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_listen_port() -> int:
    """A port free on every interface now, and outside the range the OS gives outgoing
    connections, for a server that binds it later (HAProxy's, when Serve starts) on all
    interfaces: a port merely free on 127.0.0.1 may be held on another address, or taken
    by a connection meanwhile."""
    for port in random.sample(LISTEN_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {LISTEN_PORTS}")
