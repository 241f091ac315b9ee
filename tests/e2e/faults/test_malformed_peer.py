"""A member that holds the cluster key but answers the data routes of the peer API with garbage
(issue 11): for each malformation, a real huggingface_hub client downloads a file through a real
modelpeerd whose only peer for that file is the broken member (tests/hostilepeer.py). The
download completes with the right bytes within a bound, the daemon stays up, and its log names
the member for the bad answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakehub import FakeHub, expected_files, file_sha256
from tests.harness import (
    ROOT,
    HfHome,
    KiB,
    Modelpeerd,
    free_port,
    hf_client,
    http_json,
    keyed_daemon,
    wait_for,
)
from tests.hostilepeer import BLOB, MODES, STATUS, WARM, WARM_JOB
from tests.netlab import write_key

REPO = "faults/malformed-peer"
SMALL_SIZE = 700 * KiB  # travels over the peer API as one answer
SHARED_SIZE = 3 * 1024 * KiB  # relayed, or shared chunk by chunk
# wrong bytes relayed: more than the client writes at a time (huggingface_hub: 10 MiB), so it
# keeps some before the daemon finds the blob wrong
WRONG_BYTES_SIZE = 24 * 1024 * KiB
WRONG_BYTES = ("relay-wrong-bytes", "relay-wrong-offset")
BOUND = 40.0  # seconds for one download: the peer deadlines, the stall window and a margin


@dataclass
class Suite:
    daemon: Modelpeerd
    node_ids: dict[str, str]  # hostile member's node id by mode
    addresses: dict[str, str]  # its address by mode
    requests: Path  # the hostile members' request log


def file_of(mode: str) -> str:
    return f"{mode}.bin"


def size_of(mode: str) -> int:
    if mode in WRONG_BYTES:
        return WRONG_BYTES_SIZE
    return SMALL_SIZE if MODES[mode][0] == BLOB else SHARED_SIZE


def member_specs(tmp: Path, base: str) -> list[dict[str, object]]:
    blobs = tmp / "blobs"
    blobs.mkdir()
    files = expected_files(REPO)
    specs = []
    for i, mode in enumerate(MODES):
        name = file_of(mode)
        (blobs / name).write_bytes(files[name])
        address = f"{base}{10 + i}"
        specs.append({"address": address, "port": free_port(address), "mode": mode,
                      "digest": file_sha256(REPO, name), "size": len(files[name]),
                      "blob": str(blobs / name)})
    return specs


def start_hostile(tmp: Path, key: Path, specs: list[dict[str, object]],
                  requests: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    config = tmp / "hostile.json"
    config.write_text(json.dumps({"key": str(key), "dir": str(tmp), "log": str(requests),
                                  "members": specs}))
    with (tmp / "hostile.log").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.hostilepeer", str(config)],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the hostile peer did not start:\n{(tmp / 'hostile.log').read_text()}"
    return proc, json.loads(line)


@pytest.fixture(scope="module")
def suite(fakehub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """One daemon, and one hostile process playing one broken member per malformation."""
    tmp = tmp_path_factory.mktemp("malformed")
    fakehub.add_repo(REPO, {file_of(mode): {"size": size_of(mode)} for mode in MODES})
    key = write_key(tmp / "cluster.key")
    specs = member_specs(tmp, f"127.77.{os.getpid() % 250}.")
    requests = tmp / "requests.jsonl"
    hostile, ids = start_hostile(tmp, key, specs, requests)
    peers = [arg for s in specs for arg in ("--peer", f"{s['address']}:{s['port']}")]
    daemon = keyed_daemon(tmp / "cache", fakehub.url, key, *peers)
    try:
        daemon.start()
        wait_for(lambda: daemon.get(daemon.url + "/_modelpeer/v1/peers")["count"] == len(specs),
                 "every hostile member is admitted", timeout=30)
        yield Suite(daemon, {str(s["mode"]): ids[str(s["address"])] for s in specs},
                    {str(s["mode"]): str(s["address"]) for s in specs}, requests)
    finally:
        daemon.stop()
        hostile.terminate()
        hostile.wait(10)


def malformed_answers(suite: Suite, mode: str) -> list[str]:
    """The paths the member for `mode` answered with its malformation."""
    if not suite.requests.exists():
        return []
    entries = [json.loads(line) for line in suite.requests.read_text().splitlines()]
    return [e["path"] for e in entries
            if e["address"] == suite.addresses[mode] and e["mode"] == mode]


def download_through(suite: Suite, home: Path, mode: str) -> int:
    """Download the file of `mode`'s member through the daemon and check what the client got
    and that the daemon is still up; returns where the daemon's log stood before."""
    d = suite.daemon
    log_before = d.log_size()
    out = hf_client(d.url, home, "hf_hub_download", REPO, file_of(mode), timeout=BOUND)
    assert "result" in out, out
    assert Path(out["result"]).read_bytes() == expected_files(REPO)[file_of(mode)]
    assert d.proc is not None and d.proc.poll() is None, f"modelpeerd died:\n{d.log()}"
    assert d.status()["peers"]["enabled"]
    return log_before


def lines_naming(suite: Suite, mode: str, since: int) -> list[str]:
    """The daemon's log lines since `since`, above debug, that name `mode`'s member."""
    node = suite.node_ids[mode][:16]
    text = suite.daemon.logged(since)
    return [line for line in text.splitlines() if node in line and " DEBUG " not in line]


def last_seen(d: Modelpeerd, node_id: str) -> float:
    peers = d.get(d.url + "/_modelpeer/v1/peers")["peers"]
    return float(next(p["last_seen"] for p in peers if p["node_id"] == node_id))


def modes_on(*routes: str) -> list[str]:
    return [mode for mode, (route, _) in MODES.items() if route in routes]


@pytest.mark.parametrize("mode", [m for m in MODES if m not in modes_on(STATUS, WARM, WARM_JOB)])
def test_a_malformed_answer_costs_the_client_nothing(suite: Suite, hub: FakeHub,
                                                     hf_home: HfHome, mode: str) -> None:
    log_before = download_through(suite, hf_home(), mode)
    assert malformed_answers(suite, mode), f"the daemon never asked the {mode} member"
    assert lines_naming(suite, mode, log_before), (
        f"no log line names the {mode} member:\n{suite.daemon.log()}")


def test_a_member_dripping_its_status_holds_up_no_other(suite: Suite, hub: FakeHub,
                                                        hf_home: HfHome) -> None:
    mode = "status-drip"
    log_before = download_through(suite, hf_home(), mode)  # asked about its blob, it turns
    wait_for(lambda: malformed_answers(suite, mode), "the member drips its status", timeout=15)
    dripping_since = time.time()
    other = suite.node_ids["map-list"]
    wait_for(lambda: last_seen(suite.daemon, other) > dripping_since + 1,
             "the other members are still checked", timeout=20)
    wait_for(lambda: any("stopped answering" in line
                         for line in lines_naming(suite, mode, log_before)),
             "the dripping member is found dead", timeout=30)


@pytest.mark.parametrize("mode", modes_on(WARM, WARM_JOB))
def test_a_malformed_warm_answer_fails_that_node_only(suite: Suite, hub: FakeHub,
                                                      mode: str) -> None:
    d = suite.daemon
    node = suite.node_ids[mode]
    log_before = d.log_size()
    control = d.url + "/_modelpeer/v1"
    started = http_json("POST", control + "/warm", {"repo": REPO, "include": [file_of(mode)],
                                                   "nodes": node}, timeout=BOUND)
    job = http_json("GET", f"{control}/jobs/{started['job']}", timeout=BOUND)
    assert malformed_answers(suite, mode), f"the daemon never asked the {mode} member"
    if MODES[mode][0] == WARM:
        assert node in started["errors"], started
        assert lines_naming(suite, mode, log_before), d.log()
    else:
        answer = job["nodes"][f"hostile-{mode}"]
        assert answer["state"] == "failed" and node[:16] in answer["error"], job
    assert d.proc is not None and d.proc.poll() is None, f"modelpeerd died:\n{d.log()}"
