"""SIGKILL at random points of a write: the daemon always comes up on the same cache dir, a client
always gets the right bytes, and the store stays consistent for `ls`, `gc` and `verify --full`.

CI runs KILL_ROUNDS rounds (3); a soak run sets MODELPEER_TEST_KILL_ROUNDS=20 (or more), and
MODELPEER_TEST_KILL_SEED to replay a failing run."""

from __future__ import annotations

import json
import logging
import os
import random
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tests.fakehub import FakeHub, expected_files
from tests.harness import HfHome, MiB, Modelpeerd, StartDaemon, cli, download, hf_client, wait_for

REPO, FILE = "faults/killed-mid-write", "big.bin"
SIZE = 64 * MiB
KILL_ROUNDS = int(os.environ.get("MODELPEER_TEST_KILL_ROUNDS", "3"))
# 4 upstream connections at 8 MiB/s each: the 64 MiB are written in about 2 s
CDN_RATE = 8 * MiB

log = logging.getLogger(__name__)


def written(d: Modelpeerd) -> int:
    """Bytes of the file's transfer written so far (0 when no transfer runs)."""
    return sum(int(t["available"]) for t in d.status()["transfers"])


def kill_when_written(d: Modelpeerd, target: int, client: Future[dict[str, Any]]) -> None:
    """SIGKILL the daemon once `target` bytes of the transfer are written, or the client is
    done first."""
    wait_for(lambda: client.done() or written(d) >= target, f"{target} bytes written",
             timeout=60)
    d.kill()


def assert_store_consistent(d: Modelpeerd) -> None:
    for args in (("ls", "--json"), ("gc", "--json"), ("verify", "--full", "--json")):
        out = cli(d, *args)
        assert out.returncode == 0, f"modelpeer {' '.join(args)}: {out.stderr}"
        json.loads(out.stdout)


def test_sigkill_at_random_points_of_a_write(start_daemon: StartDaemon, hub: FakeHub,
                                             hf_home: HfHome) -> None:
    hub.add_repo(REPO, {FILE: {"size": SIZE}})
    want = expected_files(REPO)[FILE]
    seed = int(os.environ.get("MODELPEER_TEST_KILL_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    d = start_daemon("--chunk-size", "32MiB")  # 2 chunks, each with a checkpoint inside
    with ThreadPoolExecutor(1) as pool:
        for round_ in range(KILL_ROUNDS):
            hub.faults(cdn_rate=CDN_RATE)
            for kill in range(rng.randint(1, 2)):  # a second kill lands in the resumed write
                target = rng.randrange(SIZE)
                client = pool.submit(hf_client, d.url, hf_home(), "hf_hub_download", REPO, FILE)
                kill_when_written(d, target, client)
                log.info("seed %d round %d kill %d: after %d bytes written", seed, round_, kill,
                         target)
                out = client.result()
                if "result" in out:  # the client finished, or resumed from the new daemon
                    with open(out["result"], "rb") as f:
                        assert f.read() == want, f"seed {seed} round {round_}: wrong bytes"
                d.start(wait=False)
                d.wait_healthy(timeout=10)
            hub.reset()
            assert download(d, hf_home(), REPO, FILE) == want, f"seed {seed} round {round_}"
            assert_store_consistent(d)
            assert cli(d, "rm", REPO).returncode == 0  # the next round writes from scratch
            assert_store_consistent(d)
