"""Record the frames that enter a bridge from its ports into a pcap file, until SIGTERM.

    ip netns exec P-sw python3 -m tests.netlab_capture OUT.pcap

Run inside the lab's switch namespace: an unbound AF_PACKET socket there sees every port of
the bridge. Each frame is kept once, as it enters the bridge from a host (frames leaving by a
port, or seen again on br0, are copies). Prints "ready" once the socket is open, and
"dropped N" (frames the kernel could not queue for us) when it stops. Stdlib only.
"""

from __future__ import annotations

import signal
import socket
import struct
import sys
import time
from typing import BinaryIO

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33  # not in Python's socket module; as root, beyond net.core.rmem_max
SNAPLEN = 256 * 1024  # veth hands the bridge GSO frames of up to 64 KiB, and more with BIG TCP
RCVBUF = 64 * 1024 * 1024
LINKTYPE_ETHERNET = 1
BRIDGE = "br0"


def open_socket() -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    sock.settimeout(0.2)
    return sock


def write_pcap_header(out: BinaryIO) -> None:
    out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))


def write_frame(out: BinaryIO, frame: memoryview) -> None:
    now = time.time()
    sec, usec = int(now), int(now % 1 * 1_000_000)
    out.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)))
    out.write(frame)


def entering_bridge(addr: tuple[str, int, int, int, bytes]) -> bool:
    ifname, _proto, pkttype = addr[:3]
    return ifname != BRIDGE and pkttype != socket.PACKET_OUTGOING


def record_one(sock: socket.socket, buf: bytearray, out: BinaryIO) -> None:
    size, addr = sock.recvfrom_into(buf)
    if entering_bridge(addr):
        write_frame(out, memoryview(buf)[:size])


def dropped(sock: socket.socket) -> int:
    _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return drops


def capture(path: str) -> None:
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    buf = bytearray(SNAPLEN)
    with open_socket() as sock, open(path, "wb") as out:
        write_pcap_header(out)
        print("ready", flush=True)
        while not stopping:
            try:
                record_one(sock, buf, out)
            except TimeoutError:
                continue
        # What reached the socket before the stop is still queued: keep it too.
        sock.setblocking(False)
        try:
            while True:
                record_one(sock, buf, out)
        except BlockingIOError:
            pass
        print(f"dropped {dropped(sock)}", flush=True)


if __name__ == "__main__":
    capture(sys.argv[1])
