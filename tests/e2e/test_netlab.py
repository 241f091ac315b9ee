"""The network lab itself: capture sees what hosts send each other, shape() limits a host both
ways, and the lab leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.harness import KiB
from tests.netlab import Lab, LabError, lab_namespaces

pytestmark = pytest.mark.netlab

PORT = "7000"
RECEIVE = """
import socket, sys, time
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
started, got = time.monotonic(), 0
while data := conn.recv(1 << 16):
    got += len(data)
print(got, time.monotonic() - started)
"""
SEND = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as conn:
    conn.sendall(sys.argv[3].encode() * int(sys.argv[4]))
"""


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(2, prefix=f"mpn{os.getpid() % 10000}", lan="1gbit") as lab:
        yield lab


def transfer(lab: Lab, src: str, dst: str, text: str, repeat: int = 1) -> float:
    """Send `text` * `repeat` over TCP from src to dst; the seconds dst took to receive it."""
    with subprocess.Popen([*lab.ns(dst), sys.executable, "-c", RECEIVE, lab.ip(dst), PORT],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as receiver:
        try:
            assert receiver.stdout is not None
            assert receiver.stdout.readline().strip() == "ready"
            sent = lab.run(src, sys.executable, "-c", SEND, lab.ip(dst), PORT, text, str(repeat),
                           timeout=60)
            assert sent.returncode == 0, sent.stderr
            out, err = receiver.communicate(timeout=60)
        finally:
            receiver.kill()
    got, seconds = out.split()
    assert int(got) == len(text.encode()) * repeat, err
    return float(seconds)


def test_capture_sees_tcp_payload_between_hosts(lab: Lab) -> None:
    marker, never_sent = f"marker-{uuid.uuid4().hex}", f"never-sent-{uuid.uuid4().hex}"
    with lab.capture() as cap:
        transfer(lab, "h1", "h2", marker)
    assert cap.frames > 0
    assert cap.dropped == 0
    assert marker.encode() in cap.data
    assert never_sent.encode() not in cap.data


def test_shape_limits_a_host_both_ways(lab: Lab) -> None:
    kib = "k" * KiB
    assert transfer(lab, "h1", "up", kib, 5 * KiB) < 1.2  # unshaped: the bound means shaping
    lab.shape("h2", "20mbit")
    # 5 MiB less the 1 MB burst at 20 Mbit/s: about 1.7 s each way.
    assert transfer(lab, "h1", "h2", kib, 5 * KiB) >= 1.2
    assert transfer(lab, "h2", "h1", kib, 5 * KiB) >= 1.2


def test_down_leaves_no_namespace_of_the_prefix_and_no_other(lab: Lab) -> None:
    with Lab(1, prefix=lab.prefix + "x") as neighbour:
        lab.down()
        assert lab_namespaces(lab.prefix) == []
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"{lab.prefix}-" not in names
        assert len(lab_namespaces(neighbour.prefix)) == 3


def test_failed_up_removes_what_it_made_and_says_which_command_failed(lab: Lab) -> None:
    broken = Lab(2, prefix=lab.prefix, lan="fast")
    with pytest.raises(LabError, match=r"tc -n .* rate fast .*failed.*: .+"):
        broken.up()
    assert lab_namespaces(lab.prefix) == []
