"""Ports for servers that bind later (HAProxy's, once Serve starts)."""

from __future__ import annotations

import socket

from deployments.ports import LISTEN_PORTS, free_listen_port
from serve_app.ray_env import on_free_ports

EPHEMERAL_FROM = 32768  # Linux's default ip_local_port_range starts here


def test_a_listen_port_is_free_on_every_interface_and_below_the_ephemeral_range():
    port = free_listen_port()
    assert port in LISTEN_PORTS and port < EPHEMERAL_FROM
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))  # free on every interface, not only on loopback
    ports = on_free_ports()
    assert all(int(p) < EPHEMERAL_FROM for p in ports.values())
