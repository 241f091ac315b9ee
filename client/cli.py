"""`modelpeer`: the command-line client of a modelpeerd daemon (it only talks to the daemon).

Exit codes: 0 success, 1 the daemon reported a problem (e.g. verify found bad chunks),
2 bad usage, 3 the daemon cannot be reached, 4 not found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_DAEMON = "http://127.0.0.1:6580"
API = "/_modelpeer/v1"
EXIT_PROBLEM, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_FOUND = 1, 2, 3, 4


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def shown(value: object) -> str:
    """A value from the network, safe to print: control characters (ANSI escapes, \r, bidi
    overrides...) appear escaped (\x1b) instead of acting on the terminal."""
    return "".join(c.encode("unicode_escape").decode() if unicodedata.category(c) in ("Cc", "Cf")
                   else c for c in str(value))


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_age(ts: float) -> str:
    s = max(0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


class Daemon:
    def __init__(self, url: str, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             token: str | None = None) -> Any:
        """The daemon refuses state-changing calls without Content-Type: application/json;
        a Hub token goes in the Authorization header, as the `hf` CLI sends it."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + API + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                message = e.reason
            code = EXIT_NOT_FOUND if e.code == 404 else EXIT_PROBLEM
            raise CliError(f"the daemon answered {e.code}: {shown(message)}", code) from e
        except (urllib.error.URLError, OSError) as e:
            raise CliError(f"cannot reach modelpeerd at {self.url} ({getattr(e, 'reason', e)});"
                           " is it running? (systemctl status modelpeer, or start modelpeerd;"
                           " --daemon URL / MODELPEER_URL pick another)", EXIT_UNREACHABLE) from e


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def cmd_status(d: Daemon, args: argparse.Namespace) -> int:
    if getattr(args, "watch", False) and not args.json:
        args.watch = False
        return cmd_status_watch(d, args)
    s = d.call("GET", "/status")
    if args.json:
        _print_json(s)
        return 0
    store, served = s["store"], s["served_bytes"]
    peers = s["peers"]
    print(f"node      {shown(s['node'])}  (modelpeerd {shown(s['version'])}, "
          f"up {s['uptime']:.0f}s)")
    print(f"serving   {shown(s['listen'])}   upstream {shown(', '.join(s['upstream']))}"
          + ("   OFFLINE" if s["offline"] else ""))
    limit = human_size(s["max_cache_size"]) if s["max_cache_size"] else "no limit"
    print(f"cache     {human_size(store['bytes'])} in {store['complete_blobs']} files, "
          f"{store['chunks']} chunks ({limit})  at {shown(s['cache_dir'])}")
    print("served    " + ", ".join(f"{human_size(served[k])} from {shown(k)}" for k in served)
          + f";  {human_size(s['upstream_bytes'])} read from upstream")
    off = "" if peers["enabled"] else f"(off: {shown(peers['reason'])})"
    print(f"peers     {peers['count']} {off}")
    for t in s["transfers"]:
        pct = 100 * t["available"] / t["size"] if t["size"] else 100
        bar = "#" * int(pct / 5)
        print(f"  [{bar:20}] {pct:5.1f}%  {human_size(t['rate'])}/s from {shown(t['source'])}"
              f"  {shown(t['file'])}")
    return 0


def cmd_status_watch(d: Daemon, args: argparse.Namespace) -> int:
    """Redraw the status every --interval seconds until Ctrl-C."""
    try:
        while True:
            sys.stdout.write("\x1b[H\x1b[2J")
            cmd_status(d, args)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_ls(d: Daemon, args: argparse.Namespace) -> int:
    repos = d.call("GET", "/repos")
    if args.json:
        _print_json(repos)
        return 0
    if not repos:
        print("the cache is empty")
        return 0
    print(f"{'REPO':50} {'TYPE':8} {'FILES':>6} {'SIZE':>10}  LAST USED")
    for r in repos:
        print(f"{shown(r['repo_id']):50} {shown(r['repo_type']):8} {r['files']:>6} "
              f"{human_size(r['bytes']):>10}  {human_age(r['last_access'])}")
    return 0


def cmd_rm(d: Daemon, args: argparse.Namespace) -> int:
    repo_id = urllib.parse.quote(args.repo, safe="/")
    result = d.call("DELETE", f"/repos/{args.repo_type}/{repo_id}")
    if args.json:
        _print_json(result)
    else:
        pending = result["pending_bytes"]
        print(f"removed {shown(result['removed'])}, freed {human_size(result['freed_bytes'])}"
              + (f", {human_size(pending)} more once their readers are done" if pending else ""))
    return 0


def cmd_gc(d: Daemon, args: argparse.Namespace) -> int:
    result = d.call("POST", "/gc")
    if args.json:
        _print_json(result)
    else:
        print(f"freed {human_size(result['freed_bytes'])} ({len(result['removed'])} unreferenced,"
              f" {len(result['evicted'])} evicted)")
    return 0


def cmd_verify(d: Daemon, args: argparse.Namespace) -> int:
    d.timeout = 3600
    result = d.call("POST", "/verify?full=1" if args.full else "/verify")
    if args.json:
        _print_json(result)
    else:
        checked = result["checked"]
        print(f"checked {checked['chunks']} chunks"
              + (f" and {checked['complete_blobs']} blobs (sha256/sha1)" if args.full else ""))
        for p in result["problems"]:
            where = f"chunk {p['chunk']}" if p["chunk"] is not None else "whole blob"
            print(f"  BAD {shown(p['digest'])} {where} ({shown(p['error'])}): dropped, will be "
                  "fetched again")
        print("all good" if not result["problems"] else f"{len(result['problems'])} problems")
    return EXIT_PROBLEM if result["problems"] else 0


def cmd_peers(d: Daemon, args: argparse.Namespace) -> int:
    result = d.call("GET", "/peers")
    if args.json:
        _print_json(result["peers"])
        return 0
    if not result["enabled"]:
        print(f"peers are off: {shown(result['reason'])}")
        return 0
    print(f"node {shown(result['node_id'])} in cluster {shown(result['cluster_id'])}: "
          f"{result['count']} live peers")
    print(f"{'NODE':18} {'NAME':16} {'ADDRESS':21} {'VERSION':8} {'LAST SEEN':10} "
          f"{'CHUNKS':>6} {'FROM':>9} {'TO':>9}")
    for p in result["peers"]:
        state = "banned" if p["banned"] else ("" if p["alive"] else "down")
        address = shown(f"{p['address']}:{p['peer_port']}")
        print(f"{shown(p['node_id']):18} {shown(p['name'])[:16]:16} {address:21}"
              f" {shown(p['version']):8} {human_age(p['last_seen']) if p['last_seen'] else '-':10}"
              f" {shown(p['chunks_held']):>6} {human_size(p['bytes_from']):>9}"
              f" {human_size(p['bytes_to']):>9} {state}")
    return 0


def cmd_cluster_key_new(d: Daemon, args: argparse.Namespace) -> int:
    from modelpeer.daemon.keyfile import new_key_file

    try:
        new_key_file(args.file)
    except FileExistsError as e:
        raise CliError(f"{args.file} exists already; a key is never overwritten", 1) from e
    except OSError as e:
        raise CliError(f"cannot write {args.file}: {e.strerror}", 1) from e
    print(f"wrote a new cluster key to {args.file} (mode 600). Copy it to every node of the "
          "cluster. Under systemd keep it at /etc/modelpeer/cluster.key and run "
          "systemd/install.sh again; else start modelpeerd with --cluster-key-file",
          file=sys.stderr)
    return 0


def cmd_cluster_key_check(d: Daemon, args: argparse.Namespace) -> int:
    from modelpeer.daemon.keyfile import ClusterKeyError, cluster_id_of, read_key_file

    try:
        key = read_key_file(args.file)
    except ClusterKeyError as e:
        raise CliError(str(e), EXIT_PROBLEM) from e
    print(f"{args.file}: a usable cluster key, cluster {cluster_id_of(key)}")
    return 0


def cmd_warm(d: Daemon, args: argparse.Namespace) -> int:
    body = {"repo": args.repo, "repo_type": args.repo_type, "revision": args.revision,
            "include": args.include, "exclude": args.exclude, "nodes": args.nodes}
    started = d.call("POST", "/warm", body, token=args.token or os.environ.get("HF_TOKEN"))
    if started.get("errors"):
        for node, error in started["errors"].items():
            print(f"modelpeer: node {shown(node)} did not take the job: {shown(error)}",
                  file=sys.stderr)
    if not args.wait:
        if args.json:
            _print_json(started)
        else:
            print(f"warm job {shown(started['job'])}: {started['files']} files, "
                  f"{human_size(started['bytes'])} on {len(started['nodes'])} nodes")
        return 0
    return _wait_for_job(d, started["job"], args.json)


def _wait_for_job(d: Daemon, job: str, as_json: bool) -> int:
    """Live progress, one bar per node and a total; the exit code says whether all made it."""
    started = time.monotonic()
    while True:
        status = d.call("GET", f"/jobs/{job}")
        if not as_json:
            _draw_job(status, time.monotonic() - started)
        if status["state"] != "running":
            break
        time.sleep(0.5)
    if as_json:
        _print_json(status)
    failed = {n: s.get("error", "") for n, s in status["nodes"].items() if s["state"] != "done"}
    for node, error in failed.items():
        print(f"modelpeer: node {shown(node)} failed: {shown(error)}", file=sys.stderr)
    return EXIT_PROBLEM if failed else 0


def _draw_job(status: dict[str, Any], elapsed: float) -> None:
    lines = []
    total = have = 0
    for node, s in sorted(status["nodes"].items()):
        size, got = s.get("bytes", 0), s.get("have_bytes", 0)
        total, have = total + size, have + got
        pct = 100 * got / size if size else 100.0
        lines.append(f"  {shown(node):16} [{'#' * int(pct / 5):20}] {pct:5.1f}% "
                     f"{human_size(got):>9} {shown(s['state'])}")
    rate = human_size(have / elapsed if elapsed else 0)
    lines.append(f"  {'total':16} {human_size(have)} of {human_size(total)}, {rate}/s, "
                 f"{shown(status['state'])}")
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[H\x1b[2J")
    print("\n".join(lines), flush=True)


def cmd_jobs(d: Daemon, args: argparse.Namespace) -> int:
    if args.action == "cancel":
        result = d.call("POST", f"/jobs/{args.job}/cancel", {})
        print(f"cancelled {shown(result['cancelled'])}")
        return 0
    jobs = d.call("GET", "/jobs")
    if args.json:
        _print_json(jobs)
        return 0
    if not jobs:
        print("no warm jobs")
    for j in jobs:
        print(f"{shown(j['job'])}  {shown(j['state']):9} {shown(j['repo']):40} "
              f"{j['done_files']}/{j['files']} files "
              f"{human_size(j['have_bytes'])} of {human_size(j['bytes'])}")
    return 0


def cmd_env(d: Daemon, args: argparse.Namespace) -> int:
    if args.json:
        _print_json({"HF_ENDPOINT": d.url})
    else:
        print(f"export HF_ENDPOINT={d.url}")
    return 0


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """--daemon and --json, accepted before and after the command; after it they must not
    reset what was given before it, hence SUPPRESS there."""
    common = argparse.ArgumentParser(add_help=False)
    daemon_default = os.environ.get("MODELPEER_URL", DEFAULT_DAEMON)
    common.add_argument("--daemon", default=argparse.SUPPRESS if suppress else daemon_default,
                        help=f"URL of the modelpeerd to talk to (default: $MODELPEER_URL or "
                             f"{DEFAULT_DAEMON})")
    common.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="print JSON for scripts")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(suppress=True)
    p = argparse.ArgumentParser(prog="modelpeer", parents=[_common_options(suppress=False)],
                                description="Talk to the local modelpeerd: status, cache, peers.")
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", parents=[common], help="this node: cache, transfers, peers")
    st.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    st.set_defaults(func=cmd_status)
    sub.add_parser("ls", parents=[common], help="cached repos, sizes, last use"
                   ).set_defaults(func=cmd_ls)
    rm = sub.add_parser("rm", parents=[common], help="remove a repo from the cache")
    rm.add_argument("repo", help="repo id, e.g. org/model")
    rm.add_argument("--repo-type", default="model", choices=("model", "dataset", "space"))
    rm.set_defaults(func=cmd_rm)
    sub.add_parser("gc", parents=[common], help="drop unreferenced blobs, evict to the limit"
                   ).set_defaults(func=cmd_gc)
    v = sub.add_parser("verify", parents=[common], help="check every chunk's xxh3")
    v.add_argument("--full", action="store_true", help="also check every blob's sha256/sha1")
    v.set_defaults(func=cmd_verify)
    sub.add_parser("peers", parents=[common], help="the LAN peers this node sees"
                   ).set_defaults(func=cmd_peers)
    ck = sub.add_parser("cluster-key", parents=[common], help="make or check a cluster key")
    ck_sub = ck.add_subparsers(dest="action", required=True)
    new = ck_sub.add_parser("new", help="write a fresh random key to FILE (never overwrites)")
    new.add_argument("file", type=Path)
    new.set_defaults(func=cmd_cluster_key_new)
    check = ck_sub.add_parser("check", help="is FILE a key modelpeerd accepts; its cluster id")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_cluster_key_check)
    w = sub.add_parser("warm", parents=[common], help="put a repo on nodes of the cluster")
    w.add_argument("repo")
    w.add_argument("--revision", default="main")
    w.add_argument("--repo-type", default="model", choices=("model", "dataset", "space"))
    w.add_argument("--include", action="append", default=[], metavar="GLOB")
    w.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    w.add_argument("--nodes", default="all", help="all, local, or NODE,NODE (names or ids)")
    w.add_argument("--token", help="Hub token for gated or private repos (default $HF_TOKEN)")
    w.add_argument("--wait", action="store_true", help="show progress until every node is done")
    w.set_defaults(func=cmd_warm)
    j = sub.add_parser("jobs", parents=[common], help="list warm jobs, or cancel one")
    j.add_argument("action", nargs="?", choices=("list", "cancel"), default="list")
    j.add_argument("job", nargs="?")
    j.set_defaults(func=cmd_jobs)
    sub.add_parser("env", parents=[common], help="print the HF_ENDPOINT line for your shell"
                   ).set_defaults(func=cmd_env)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(Daemon(args.daemon), args))
    except CliError as e:
        print(f"modelpeer: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
