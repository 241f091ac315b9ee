"""The `modelpeer` CLI against a real daemon: status, ls, rm, gc, verify, env."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

from modelpeer.client.cli import human_size
from tests.fakehub import MODEL, FakeHub, expected_files
from tests.harness import (
    ROOT,
    StartDaemon,
    cli,
    free_port,
    get_body,
    http_json,
    raw,
    transferring,
    wait_for,
)


def test_status_ls_rm_gc(start_daemon: StartDaemon, hub: FakeHub) -> None:
    d = start_daemon()
    assert get_body(f"{d.url}/{MODEL}/resolve/main/sub/folder/weights.bin") == \
        expected_files(MODEL)["sub/folder/weights.bin"]
    wait_for(lambda: d.status()["store"]["complete_blobs"] == 1, "the blob stored complete")
    status = json.loads(cli(d, "status", "--json").stdout)
    assert status["store"]["complete_blobs"] == 1
    assert status["peers"]["enabled"] is False and status["peers"]["reason"]
    text = cli(d, "status")
    assert text.returncode == 0 and "cache" in text.stdout

    repos = json.loads(cli(d, "ls", "--json").stdout)
    assert [(r["repo_id"], r["repo_type"]) for r in repos] == [(MODEL, "model")]
    assert repos[0]["bytes"] == len(expected_files(MODEL)["sub/folder/weights.bin"])
    assert MODEL in cli(d, "ls").stdout

    assert cli(d, "rm", "acme/not-cached").returncode == 4
    rm = cli(d, "rm", MODEL, "--json")
    assert rm.returncode == 0, rm.stderr
    assert json.loads(rm.stdout)["freed_bytes"] > 0
    assert json.loads(cli(d, "ls", "--json").stdout) == []
    gc = cli(d, "gc", "--json")
    assert gc.returncode == 0 and "freed_bytes" in json.loads(gc.stdout)


def test_verify_finds_a_corrupted_chunk(start_daemon: StartDaemon, hub: FakeHub) -> None:
    d = start_daemon()
    get_body(f"{d.url}/{MODEL}/resolve/main/model.safetensors")
    ok = cli(d, "verify", "--full")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    chunk = next(p for p in (d.cache_dir / "chunks").rglob("*.2"))
    raw = bytearray(chunk.read_bytes())
    raw[1000] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    bad = cli(d, "verify", "--json")
    assert bad.returncode == 1
    problems = json.loads(bad.stdout)["problems"]
    assert [p["chunk"] for p in problems] == [2]
    # dropped, and fetched again on the next request: the client still gets correct bytes
    assert get_body(f"{d.url}/{MODEL}/resolve/main/model.safetensors") == \
        expected_files(MODEL)["model.safetensors"]


def test_env_and_unreachable_daemon() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = cli(url, "env")
    assert env.stdout.strip() == f"export HF_ENDPOINT={url}"
    down = cli(url, "status")
    assert down.returncode == 3
    assert "cannot reach modelpeerd" in down.stderr


def test_warm_wait_shows_each_node_and_the_total_then_jobs_lists_it(
        start_daemon: StartDaemon, hub: FakeHub) -> None:
    d = start_daemon()
    warmed = cli(d, "warm", MODEL, "--nodes", "local", "--wait")
    assert warmed.returncode == 0, warmed.stderr
    amount, unit = human_size(sum(len(b) for b in expected_files(MODEL).values())).split()
    rows = [line.split() for line in warmed.stdout.splitlines()]
    assert len(rows) == 2 and rows[0][0] != "total" and rows[1][0] == "total", warmed.stdout
    for row in rows:  # name, bar, bytes done/of, rate, time left, state
        assert f"{amount}/{amount}" in row and unit in row and row[-1] == "done", row
    job = json.loads(cli(d, "jobs", "--json").stdout)[0]
    listed = [line.split() for line in cli(d, "jobs").stdout.splitlines()]
    assert listed[0] == ["JOB", "STATE", "REPO", "FILES", "BYTES"]
    assert listed[1][:4] == [job["job"], "done", job["repo"], f"{job['files']}/{job['files']}"]


def test_a_job_status_that_waits_answers_when_the_job_ends(
        start_daemon: StartDaemon, hub: FakeHub) -> None:
    """`warm --wait` asks with ?wait=S: the answer comes as the job ends, not S later."""
    d = start_daemon()
    hub.faults(cdn_rate=4 * 1024 * 1024)  # per connection: the 54 MB repo takes about 3 s
    job = json.loads(cli(d, "warm", MODEL, "--nodes", "local", "--json").stdout)["job"]
    url = f"{d.url}/_modelpeer/v1/jobs/{job}"
    asked = time.time()
    status = http_json("GET", url + "?wait=0.2")
    assert status["state"] == "running" and time.time() - asked >= 0.2
    asked = time.time()
    status = http_json("GET", url + "?wait=5")
    seen = time.time()
    finished = status["nodes"][next(iter(status["nodes"]))]["finished"]
    assert status["state"] == "done" and asked < finished, status
    assert seen - finished < 1.0, f"the end was answered {seen - finished:.2f} s late"
    asked = time.time()
    assert http_json("GET", url + "?wait=5")["state"] == "done"  # over: no wait
    assert time.time() - asked < 1.0
    for bad in ("-1", "6", "nan", "soon"):
        assert raw(d, "GET", f"/_modelpeer/v1/jobs/{job}?wait={bad}")[0] == 400, bad


def test_status_watch_redraws_in_place_in_a_terminal(start_daemon: StartDaemon) -> None:
    d = start_daemon()
    leader, follower = pty.openpty()
    watch = subprocess.Popen([sys.executable, "-m", "modelpeer.client.cli", "--daemon", d.url,
                              "status", "--watch", "--interval", "0.2"],
                             stdin=follower, stdout=follower, stderr=follower, cwd=ROOT)
    os.close(follower)
    shown = bytearray()

    def read_shown() -> None:
        if select.select([leader], [], [], 0.1)[0]:
            with contextlib.suppress(OSError):  # EIO once the watcher has exited
                shown.extend(os.read(leader, 65536))

    def redrawn() -> bool:
        read_shown()
        return shown.count(b"cache     ") >= 2

    def exited() -> bool:
        read_shown()  # a terminal nobody reads blocks the watcher's last writes
        return watch.poll() is not None

    try:
        wait_for(redrawn, "the status drawn twice", timeout=30)
    finally:
        watch.send_signal(signal.SIGINT)
        wait_for(exited, "the watcher exiting after Ctrl-C", timeout=10)
        code = watch.returncode
        os.close(leader)
    assert code == 0, bytes(shown)
    assert b"\x1b[2J" not in shown, "the screen was cleared instead of the lines redrawn"


def test_warm_on_one_node_survives_a_restart(start_daemon: StartDaemon, hub: FakeHub) -> None:
    d = start_daemon()
    hub.faults(cdn_rate=2 * 1024 * 1024)
    started = cli(d, "warm", MODEL, "--nodes", "local", "--json")
    assert started.returncode == 0, started.stderr
    job = json.loads(started.stdout)["job"]
    wait_for(lambda: transferring(d), "the warm job fetching")
    assert d.stop() == 0
    hub.reset()
    d2 = start_daemon(cache_dir=d.cache_dir)

    def ended_jobs() -> list[dict[str, str]]:
        jobs = json.loads(cli(d2, "jobs", "--json").stdout)
        return jobs if jobs and jobs[0]["state"] != "running" else []

    jobs = wait_for(ended_jobs, "the resumed warm job ends", timeout=60)
    assert [(j["job"], j["state"]) for j in jobs] == [(job, "done")]
    assert "resuming warm job" in d2.log()
    # the warm job taught the catalog the files: they resolve with the upstream gone
    hub.stop()
    try:
        assert get_body(f"{d2.url}/{MODEL}/resolve/main/model.safetensors") == \
            expected_files(MODEL)["model.safetensors"]
    finally:
        hub.restart()
