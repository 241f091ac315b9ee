"""sd_notify spoken directly over $NOTIFY_SOCKET (a datagram socket), no dependency."""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    """Send state lines to the service manager; False when not run under one."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def ready() -> bool:
    return notify("READY=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")
