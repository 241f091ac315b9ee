"""`modelpeer`: the command-line client of a modelpeerd daemon (it only talks to the daemon).

Exit codes: 0 success, 1 the daemon reported a problem (e.g. verify found bad chunks),
2 bad usage, 3 the daemon cannot be reached, 4 not found.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress import Progress, TaskID
from rich.table import Column
from rich.text import Text

from modelpeer.client import view
from modelpeer.client.view import shown

if TYPE_CHECKING:
    from modelpeer.client.hfcache import BlobFile, Snapshot

DEFAULT_DAEMON = "http://127.0.0.1:6580"
API = "/_modelpeer/v1"
JOB_POLL = 0.25  # seconds between looks at a job --wait follows
EXIT_PROBLEM, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_FOUND = 1, 2, 3, 4


class Skipped(TypedDict):
    path: str
    digest: str
    error: str


class Imported(TypedDict):
    """The daemon's answer to an import, of a bundle or of an HF-cache snapshot (ingest.py)."""
    repo: str
    repo_type: str
    repo_id: str
    commit: str
    files: int
    revisions: list[str]
    bytes: int
    stored_bytes: int
    skipped: list[Skipped]
    public: bool
    confirmed_by: str
    method: str


class Reflinked(Imported):
    reflink: Literal[True]


class NoReflink(TypedDict):
    reflink: Literal[False]
    reason: str


class Deduped(TypedDict):
    """The daemon's answer to /hf-cache/dedupe (daemon/hfcache.py)."""
    reflink: bool
    reason: str
    shared_files: int
    shared_bytes: int
    freed_bytes: int
    problems: list[dict[str, str]]


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


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

    def call(self, method: str, path: str, body: dict[str, object] | None = None,
             token: str | None = None) -> Any:  # JSON: its shape is the caller's endpoint's
        """The daemon refuses state-changing calls without Content-Type: application/json;
        a Hub token goes in the Authorization header, as the `hf` CLI sends it."""
        data = json.dumps(body).encode() if body is not None else None
        with self.open(method, path, data, token) as resp:
            return json.loads(resp.read() or b"null")

    def open(self, method: str, path: str, data: bytes | Iterable[bytes] | None = None,
             token: str | None = None, content_type: str = "application/json",
             length: int | None = None) -> http.client.HTTPResponse:
        """The daemon's answer to one request, to read (or stream) from; `data` may be an
        iterable of bytes sent as it is produced, `length` bytes in all."""
        headers = {"Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if length is not None:
            headers["Content-Length"] = str(length)
        req = urllib.request.Request(self.url + API + path, data=data, method=method,
                                     headers=headers)
        try:
            # urlopen's stub answers Any; for the daemon's http(s) URL it is an HTTPResponse
            return cast(http.client.HTTPResponse, urllib.request.urlopen(req, timeout=self.timeout))
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


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def cmd_status(d: Daemon, args: argparse.Namespace) -> int:
    if args.watch and not args.json:
        return cmd_status_watch(d, args)
    s = d.call("GET", "/status")
    if args.json:
        _print_json(s)
    else:
        view.console().print(_status_view(s))
    return 0


def _status_view(s: dict[str, Any]) -> Group:  # Any: the daemon's JSON
    store, served = s["store"], s["served_bytes"]
    peers = s["peers"]
    off = "" if peers["enabled"] else f"(off: {shown(peers['reason'])})"
    lines = [
        f"node      {shown(s['node'])}  (modelpeerd {shown(s['version'])}, "
        f"up {s['uptime']:.0f}s)",
        f"serving   {shown(s['listen'])}   upstream {shown(', '.join(s['upstream']))}"
        + ("   OFFLINE" if s["offline"] else ""),
        f"cache     {human_size(store['bytes'])} in {store['complete_blobs']} files, "
        f"{store['chunks']} chunks ({_of_limit(store['bytes'], s)})  at {shown(s['cache_dir'])}",
        f"pinned    {human_size(s['pinned_bytes'])} in {s['pinned_files']} files "
        f"({s['pins']} pins)" + (f";  {human_size(s['over_limit_bytes'])} over the limit "
                                 "that pins keep (unpin, or raise max_cache_size)"
                                 if s["over_limit_bytes"] else ""),
        f"caps      upstream {_rate(s['upstream_rate'])}, peer upload "
        f"{_rate(s['peer_upload_rate'])}{_upload_split(peers)}",
        "served    " + ", ".join(f"{human_size(served[k])} from {shown(k)}" for k in served)
        + f";  {human_size(s['upstream_bytes'])} read from upstream",
        *_startup_lines(s.get("startup", {})),
        f"peers     {peers['count']} {off}",
    ]
    parts: list[RenderableType] = [Text(line) for line in lines]
    if s["transfers"]:
        parts.append(view.indented(view.table(
            ["", view.right("DONE"), view.right("RATE"), "FROM", "FILE"],
            ([view.bar(t["available"], t["size"]), view.percent(t["available"], t["size"]),
              f"{human_size(t['rate'])}/s", shown(t["source"]), shown(t["file"])]
             for t in s["transfers"]))))
    for blob in s.get("plan", []):
        parts += _plan_view(blob)
    return Group(*parts)


def _rate(rate: int) -> str:
    return f"{human_size(rate)}/s ({rate * 8 / 1e6:.0f} Mbit/s)" if rate else "no limit"


def _upload_split(peers: dict[str, Any]) -> str:  # Any: the daemon's JSON
    split = peers.get("upload_split") or {}
    if not split.get("peer_api"):
        return ""
    return (f" (now {human_size(split['bittorrent'])}/s BitTorrent, "
            f"{human_size(split['peer_api'])}/s relays)")


def _plan_view(blob: dict[str, Any]) -> list[RenderableType]:  # Any: the daemon's JSON
    """Who feeds whom for one blob on the cluster, a row per node."""
    def feed(n: dict[str, Any]) -> str:  # Any: the daemon's JSON
        source = (shown(n["feeder_name"]) if n["feeder"]
                  else "peers (BitTorrent)" if n["source"] == "peer" else shown(n["source"]))
        role = (" (probing the upstream)" if n.get("probing")
                else " (leaf: feeds nobody)" if n.get("leaf") else "")
        return f"{source} -> {shown(n['name'] or n['node_id'][:12])}{role}"

    size = blob["size"]
    return [Text(f"plan      {shown(blob['file'])} ({human_size(size)})"),
            view.indented(view.table(
                ["FEED", view.right("RATE"), "", view.right("DONE")],
                ([feed(n), f"{human_size(n['rate'])}/s", view.bar(n["available"], size),
                  view.percent(n["available"], size)] for n in blob["nodes"])))]


def _startup_lines(startup: dict[str, Any]) -> list[str]:  # Any: the daemon's JSON
    """What the start (and the chunk check behind it) found wrong, if anything."""
    problems, unchecked = startup.get("problems", []), startup.get("unchecked_chunks", 0)
    if not problems and not unchecked:
        return []
    return [f"start     {len(problems)} problems found in the cache at start"
            + (f"; {unchecked} chunks still to check" if unchecked else ""),
            *(f"  {shown(problem)}" for problem in problems[:5])]


def _of_limit(used: int, s: dict[str, Any]) -> str:  # Any: the daemon's JSON
    limit = s["max_cache_size"]
    return f"{100 * used / limit:.0f}% of {human_size(limit)}" if limit else "no limit"


def cmd_status_watch(d: Daemon, args: argparse.Namespace) -> int:
    """Redraw the status in place every --interval seconds until Ctrl-C."""
    # Ctrl-C is the only way out: honour it even when started with SIGINT ignored (as a
    # non-interactive shell starts background commands, and they pass it on)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Live(console=view.console(), auto_refresh=False) as live:
        try:
            while True:
                live.update(_status_view(d.call("GET", "/status")), refresh=True)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def cmd_ls(d: Daemon, args: argparse.Namespace) -> int:
    repos = d.call("GET", "/repos")
    for r in repos:
        r["pins"] = []
    by_repo = {(r["repo_type"], r["repo_id"]): r for r in repos}
    for p in d.call("GET", "/pins"):
        pin = {k: p[k] for k in ("revision", "commit", "files", "cached_files")}
        by_repo[(p["repo_type"], p["repo_id"])]["pins"].append(pin)
    if args.json:
        _print_json(repos)
        return 0
    if not repos:
        print("the cache is empty")
        return 0
    rows: list[list[str]] = []
    for r in repos:
        pinned = ", ".join(p["revision"] for p in r["pins"])
        rows.append([shown(r["repo_id"]), shown(r["repo_type"]), str(r["files"]),
                     human_size(r["bytes"]), human_age(r["last_access"]), shown(pinned)])
        rows += [[_signed_revision(rev)] for rev in r.get("revisions", [])
                 if rev["signed_by"] or rev["signature_error"]]
    view.console().print(view.table(["REPO", "TYPE", view.right("FILES"), view.right("SIZE"),
                                     "LAST USED", "PINNED"], rows))
    return 0


def cmd_pin(d: Daemon, args: argparse.Namespace) -> int:
    p = d.call("POST", "/pins", {"repo": args.repo, "repo_type": args.repo_type,
                                 "revision": args.revision})
    if args.json:
        _print_json(p)
        return 0
    print(f"pinned {args.repo}@{p['revision']} (commit {p['commit'][:12]}): {p['files']} files, "
          f"{human_size(p['bytes'])}")
    if p["cached_files"] < p["files"]:
        print(f"modelpeer: {p['files'] - p['cached_files']} of its files are not cached yet; "
              f"`modelpeer warm --pin {args.repo}` fetches them", file=sys.stderr)
    return 0


def cmd_unpin(d: Daemon, args: argparse.Namespace) -> int:
    query = f"?revision={urllib.parse.quote(args.revision)}" if args.revision else ""
    repo_id = urllib.parse.quote(args.repo, safe="/")
    result = d.call("DELETE", f"/pins/{args.repo_type}/{repo_id}{query}")
    if args.json:
        _print_json(result)
    else:
        print(f"unpinned {result['repo']} ({result['unpinned']} pins)")
    return 0


def _signed_revision(rev: dict[str, Any]) -> str:  # Any: the daemon's JSON
    names = ", ".join(rev["revisions"]) or "-"
    signed = (f"signed by {rev['signed_by']}" if rev["signed_by"]
              else f"NOT VERIFIED: {rev['signature_error']}")
    return f"  @{shown(rev['commit'][:12])} ({shown(names)}) {shown(signed)}"


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
    query = urllib.parse.urlencode({"full": int(args.full), "signatures": int(args.signatures)})
    result = d.call("POST", f"/verify?{query}")
    refused = result.get("signature_problems", [])
    problems = len(result["problems"]) + len(refused)
    if args.json:
        _print_json(result)
    else:
        checked = result["checked"]
        print(f"checked {checked['chunks']} chunks"
              + (f" and {checked['complete_blobs']} blobs (sha256/sha1)" if args.full else "")
              + (" and the publisher signatures" if args.signatures else ""))
        for p in result["problems"]:
            where = f"chunk {p['chunk']}" if p["chunk"] is not None else "whole blob"
            print(f"  BAD {shown(p['digest'])} {where} ({shown(p['error'])}): dropped, will be "
                  "fetched again")
        for p in refused:
            print(f"  REFUSED {shown(p['repo'])}/{shown(p['path'])}@{shown(p['commit'][:12])}: "
                  f"{shown(p['error'])}")
        print("all good" if not problems else f"{problems} problems")
    return EXIT_PROBLEM if problems else 0


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
    rows = ([shown(p["node_id"]), shown(p["name"]), shown(f"{p['address']}:{p['peer_port']}"),
             shown(p["version"]), human_age(p["last_seen"]) if p["last_seen"] else "-",
             shown(p["chunks_held"]), human_size(p["bytes_from"]), human_size(p["bytes_to"]),
             "banned" if p["banned"] else ("" if p["alive"] else "down")]
            for p in result["peers"])
    view.console().print(view.table(
        ["NODE", Column("NAME", max_width=16, no_wrap=True), "ADDRESS", "VERSION", "LAST SEEN",
         view.right("CHUNKS"), view.right("FROM"), view.right("TO"), "STATE"], rows))
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
    from modelpeer.daemon.errors import ClusterKeyError
    from modelpeer.daemon.keyfile import cluster_id_of, read_key_file

    try:
        key = read_key_file(args.file)
    except ClusterKeyError as e:
        raise CliError(str(e), EXIT_PROBLEM) from e
    print(f"{args.file}: a usable cluster key, cluster {cluster_id_of(key)}")
    return 0


def cmd_warm(d: Daemon, args: argparse.Namespace) -> int:
    body = {"repo": args.repo, "repo_type": args.repo_type, "revision": args.revision,
            "include": args.include, "exclude": args.exclude, "nodes": args.nodes,
            "pin": args.pin}
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
    """Live progress, a row per node and a total; the exit code says whether all made it."""
    tasks: dict[str | None, TaskID] = {}  # node -> its row; None: the total
    with view.transfer_progress(view.console(), disable=as_json) as progress:
        while True:
            asked = time.monotonic()
            # the daemon answers at once when a node's part of the job ends
            status = d.call("GET", f"/jobs/{job}?wait={JOB_POLL}")
            _show_job(progress, tasks, status)
            if status["state"] != "running":
                break
            time.sleep(max(0.0, JOB_POLL - (time.monotonic() - asked)))
    if as_json:
        _print_json(status)
    failed = {n: s.get("error", "") for n, s in status["nodes"].items() if s["state"] != "done"}
    for node, error in failed.items():
        print(f"modelpeer: node {shown(node)} failed: {shown(error)}", file=sys.stderr)
    return EXIT_PROBLEM if failed else 0


def _show_job(progress: Progress, tasks: dict[str | None, TaskID],
              status: dict[str, Any]) -> None:  # Any: the daemon's JSON
    """Updates the row of each node and the total's, adding the rows not there yet."""
    nodes = status["nodes"]
    rows: dict[str | None, tuple[str, dict[str, Any]]] = {  # Any: the daemon's JSON
        node: (shown(node), s) for node, s in sorted(nodes.items())}
    rows[None] = ("total", {"state": status["state"],
                            "bytes": sum(s.get("bytes", 0) for s in nodes.values()),
                            "have_bytes": sum(s.get("have_bytes", 0) for s in nodes.values())})
    for key, (name, s) in rows.items():
        size, state = s.get("bytes", 0), shown(s["state"])
        if key not in tasks:
            tasks[key] = progress.add_task(name, total=size, state=state)
        progress.update(tasks[key], total=size, completed=s.get("have_bytes", 0), state=state)


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
        return 0
    view.console().print(view.table(
        ["JOB", "STATE", "REPO", view.right("FILES"), view.right("BYTES")],
        ([shown(j["job"]), shown(j["state"]), shown(j["repo"]), f"{j['done_files']}/{j['files']}",
          f"{human_size(j['have_bytes'])} of {human_size(j['bytes'])}"] for j in jobs)))
    return 0


def cmd_export(d: Daemon, args: argparse.Namespace) -> int:
    d.timeout = 3600
    repo_id = urllib.parse.quote(args.repo, safe="/")
    query = urllib.parse.urlencode({"revision": args.revision})
    part = args.output.with_name(args.output.name + ".part")
    with d.open("GET", f"/bundles/{args.repo_type}/{repo_id}?{query}",
                token=_token(args)) as resp:
        expected = int(resp.headers["Content-Length"])
        try:
            with open(part, "wb") as out:
                with contextlib.suppress(http.client.IncompleteRead, ConnectionError):
                    while data := resp.read(1024 * 1024):
                        out.write(data)
                written = out.tell()
        except OSError as e:
            part.unlink(missing_ok=True)
            raise CliError(f"cannot write {part}: {e.strerror}", EXIT_PROBLEM) from e
    if written != expected:
        part.unlink()
        raise CliError(f"the daemon stopped after {written} of {expected} bytes (see its log); "
                       f"nothing written to {args.output}", EXIT_PROBLEM)
    part.replace(args.output)
    if args.json:
        _print_json({"file": str(args.output), "bytes": written})
    else:
        print(f"wrote {args.output} ({human_size(written)})")
    return 0


def cmd_import(d: Daemon, args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as f:
            result = _send_bundle(d, iter(lambda: f.read(1024 * 1024), b""),
                                  os.fstat(f.fileno()).st_size, _token(args), lenient=False,
                                  what=str(args.file))
    except OSError as e:
        raise CliError(f"cannot read {args.file}: {e.strerror}", EXIT_USAGE) from e
    if args.json:
        _print_json(result)
    else:
        print(_imported_line(result))
    return 0


def cmd_import_hf_cache(d: Daemon, args: argparse.Namespace) -> int:
    from modelpeer.client import hfcache

    snaps = [snap for root in _hf_cache_dirs(args) for snap in hfcache.snapshots(root)]
    results: list[Imported] = []
    problems: list[str] = []
    no_reflink = ""  # why the daemon cannot clone these files; then every snapshot is copied
    with view.transfer_progress(view.console(stderr=True)) as progress:
        total = progress.add_task("all", total=sum(s.manifest.archive_size() for s in snaps),
                                  state=f"{len(snaps)} snapshots")
        for snap in snaps:
            m = snap.manifest
            label = f"{m.repo_id}@{m.commit[:12]}"
            problems += [f"{label}/{p}" for p in snap.problems]
            rows = (progress.add_task(shown(label), total=m.archive_size(),
                                      state=f"{len(m.files)} files"), total)
            try:
                result, no_reflink = _import_snapshot(d, snap, label, _token(args), no_reflink,
                                                      progress, rows)
            except CliError as e:
                if e.code == EXIT_UNREACHABLE:
                    raise
                problems.append(f"{label}: {e}")
                continue
            finally:
                progress.remove_task(rows[0])
            problems += [f"{label}/{s['path']}: {s['error']}" for s in result["skipped"]]
            results.append(result)
            progress.console.print(f"  {_imported_line(result)}")
    repos = len({r["repo"] for r in results})
    files = sum(r["files"] for r in results)
    nbytes = sum(r["bytes"] for r in results)
    stored_bytes = sum(r["stored_bytes"] for r in results)
    if args.json:
        _print_json({"repos": repos, "files": files, "bytes": nbytes, "stored_bytes": stored_bytes,
                     "skipped": problems, "method": "copy" if no_reflink else "reflink",
                     "no_reflink": no_reflink, "imports": results})
    else:
        how = f"copied into the store ({no_reflink})" if no_reflink else "reflinked: no copy"
        print(f"imported {repos} repos, {files} files, "
              f"{human_size(nbytes)} ({human_size(stored_bytes)} new, "
              f"{how}); skipped {len(problems)}")
        for p in problems:
            print(f"  skipped {p}")
    return EXIT_PROBLEM if problems else 0


def _import_snapshot(d: Daemon, snap: Snapshot, label: str, token: str | None,
                     no_reflink: str, progress: Progress,
                     rows: tuple[TaskID, ...]) -> tuple[Imported, str]:
    """The snapshot reflinked into the store, or else copied (streamed, advancing `rows`), and
    why the daemon cannot reflink if it said so: then later snapshots are copied at once."""
    from modelpeer.client import hfcache

    m = snap.manifest
    if not no_reflink:
        answer: Reflinked | NoReflink = d.call(
            "POST", "/hf-cache/reflink", {"manifest": m.to_json(), "sources": {
                k: str(v) for k, v in snap.sources.items()}}, token=token)
        if answer["reflink"] is True:
            for row in rows:
                progress.advance(row, m.archive_size())
            return answer, no_reflink
        no_reflink = answer["reason"]
        progress.console.print(f"  {no_reflink}; copying instead")
    sent = _advancing(hfcache.archive(snap), progress, rows)
    return _send_bundle(d, sent, m.archive_size(), token, lenient=True, what=label), no_reflink


def _advancing(data: Iterable[bytes], progress: Progress,
               rows: tuple[TaskID, ...]) -> Iterator[bytes]:
    for block in data:
        for row in rows:
            progress.advance(row, len(block))
        yield block


def cmd_dedupe(d: Daemon, args: argparse.Namespace) -> int:
    from modelpeer.client import hfcache

    d.timeout = 3600
    shared_files = shared_bytes = freed_bytes = 0
    problems: list[str] = []
    reflink, reason = True, ""
    repos = [repo for root in _hf_cache_dirs(args) for repo in hfcache.blob_files(root)]
    with view.transfer_progress(view.console(stderr=True)) as progress:
        row = progress.add_task("dedupe", total=sum(_bytes_of(files) for _, files in repos),
                                state=f"{len(repos)} repos")
        for repo_dir, files in repos:
            result: Deduped = d.call("POST", "/hf-cache/dedupe", {"files": files})
            if not result["reflink"]:
                reflink, reason = False, result["reason"]
                break
            shared_files += result["shared_files"]
            shared_bytes += result["shared_bytes"]
            freed_bytes += result["freed_bytes"]
            problems += [f"{repo_dir}: {p['path']}: {p['error']}" for p in result["problems"]]
            progress.advance(row, _bytes_of(files))
    if args.json:
        _print_json({"shared_files": shared_files, "shared_bytes": shared_bytes,
                     "freed_bytes": freed_bytes, "problems": problems, "reflink": reflink,
                     "reason": reason})
    elif not reflink:
        print(f"{reason}; nothing changed")
    else:
        print(f"{shared_files} files ({human_size(shared_bytes)}) now share the "
              f"store's blocks; {human_size(freed_bytes)} freed")
        for p in problems:
            print(f"  left as is: {p}")
    return EXIT_PROBLEM if problems or not reflink else 0


def _bytes_of(files: list[BlobFile]) -> int:
    return sum(f["size"] for f in files)


def _hf_cache_dirs(args: argparse.Namespace) -> list[Path]:
    from modelpeer.client import hfcache

    dirs = args.dirs or hfcache.default_dirs()
    for root in dirs:
        if not root.is_dir():
            raise CliError(f"{root} is not a directory (an HF hub cache holds models--* "
                           "directories)", EXIT_USAGE)
    return [root.absolute() for root in dirs]


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get("HF_TOKEN")


def _send_bundle(d: Daemon, data: Iterable[bytes], size: int, token: str | None, *,
                 lenient: bool, what: str) -> Imported:
    d.timeout = 3600
    path = "/bundles" + ("?lenient=1" if lenient else "")
    try:
        with d.open("POST", path, data, token, content_type="application/x-tar",
                    length=size) as resp:
            result: Imported = json.loads(resp.read())
            return result
    except CliError as e:
        raise CliError(f"{what}: {e}", e.code) from e


def _imported_line(r: Imported) -> str:
    names = ", ".join(r["revisions"]) or r["commit"][:12]
    access = "public" if r["public"] else "gated/private: only tokens with access"
    return (f"{r['repo']}@{names}: {r['files']} files, {human_size(r['bytes'])} "
            f"({human_size(r['stored_bytes'])} new, copied), {access}; entries confirmed by "
            f"the {r['confirmed_by']}")


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
    v.add_argument("--signatures", action="store_true",
                   help="also check every cached repo under a require_signature rule against "
                        "its publisher's model.sig")
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
    w.add_argument("--pin", action="store_true",
                   help="pin the revision on every node of the job: never evicted (see "
                        "`modelpeer pin`)")
    w.set_defaults(func=cmd_warm)
    for name, func, text in (("pin", cmd_pin, "keep a cached revision whatever the size limit"),
                             ("unpin", cmd_unpin, "let a pinned repo be evicted again")):
        pn = sub.add_parser(name, parents=[common], help=text)
        pn.add_argument("repo")
        pn.add_argument("--revision", default="main" if name == "pin" else None,
                        help="branch, tag or commit" + (" (default main)" if name == "pin"
                                                        else " (default: every pin of REPO)"))
        pn.add_argument("--repo-type", default="model", choices=("model", "dataset", "space"))
        pn.set_defaults(func=func)
    ex = sub.add_parser("export", parents=[common], help="write a cached revision to a bundle")
    ex.add_argument("repo")
    ex.add_argument("--revision", default="main")
    ex.add_argument("--repo-type", default="model", choices=("model", "dataset", "space"))
    ex.add_argument("-o", "--output", type=Path, required=True, help="the bundle file (a tar)")
    ex.add_argument("--token", help="Hub token, for gated or private repos (default $HF_TOKEN)")
    ex.set_defaults(func=cmd_export)
    im = sub.add_parser("import", parents=[common], help="add a bundle to the cache")
    im.add_argument("file", type=Path)
    im.add_argument("--token", help="Hub token with access to a gated or private repo "
                                    "(default $HF_TOKEN); it alone reads it offline")
    im.set_defaults(func=cmd_import)
    hc = sub.add_parser("import-hf-cache", parents=[common],
                        help="add the models of local Hugging Face caches to the cache")
    hc.add_argument("dirs", nargs="*", type=Path, metavar="DIR",
                    help="HF hub cache dirs (default $HF_HUB_CACHE, $HF_HOME/hub or "
                         "~/.cache/huggingface/hub)")
    hc.add_argument("--token", help="Hub token with access to gated or private repos among "
                                    "them (default $HF_TOKEN)")
    hc.set_defaults(func=cmd_import_hf_cache)
    dd = sub.add_parser("dedupe", parents=[common],
                        help="make HF-cache files share the store's blocks (reflinks)")
    dd.add_argument("dirs", nargs="*", type=Path, metavar="DIR",
                    help="HF hub cache dirs (default as for import-hf-cache)")
    dd.set_defaults(func=cmd_dedupe)
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
