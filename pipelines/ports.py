"""Checking an HTTP port before Ray starts, so a taken one is a clear error and not a traceback.

Ray Serve's proxy binds its port only after Ray and the Serve controller are up; when the port is
taken it fails inside an actor, with "Failed to bind to address" at the end of a long traceback
and nothing said of what to do. Binding it here first, as the proxy would, says it in one line.
"""

from __future__ import annotations

import socket


def check_port_free(host: str, port: int) -> None:
    """Raise ValueError naming the port, and `--port` to pick another, if `host:port` is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # The proxy (uvicorn) sets SO_REUSEADDR, so a port a closed server left in TIME_WAIT is free to it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(f"port {port} on {host} is taken ({error.strerror}): another server listens "
                             f"there, perhaps an earlier `reverie serve` or `reverie demo`. Stop it, or "
                             "pass --port with a free port.") from None
