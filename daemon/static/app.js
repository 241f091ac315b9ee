"use strict";
// The status page: polls the daemon's control API once a second and redraws.
const API = "/_modelpeer/v1/status";
const $ = (id) => document.getElementById(id);

function size(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function rate(n) {
  return n ? size(n) + "/s" : "no limit";
}

function ago(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return s.toFixed(0) + "s ago";
  if (s < 3600) return (s / 60).toFixed(0) + "m ago";
  return (s / 3600).toFixed(1) + "h ago";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function fill(container, items, render, emptyText) {
  container.replaceChildren();
  if (!items.length) { container.append(el("p", "empty", emptyText)); return; }
  for (const item of items) container.append(render(item));
}

function transfer(t) {
  const pct = t.size ? (100 * t.available) / t.size : 100;
  const box = el("div", "transfer");
  box.dataset.digest = t.digest;
  box.append(el("div", "name", t.file));
  const bar = el("div", "bar " + t.source);
  const inner = el("div");
  inner.style.width = pct.toFixed(1) + "%";
  bar.append(inner);
  box.append(bar);
  const meta = el("div", "meta");
  meta.append(el("span", "pct", pct.toFixed(1) + "%"),
              el("span", "", size(t.available) + " of " + size(t.size)),
              el("span", "", size(t.rate) + "/s"),
              el("span", "", "from " + t.source),
              el("span", "", t.readers + " reader" + (t.readers === 1 ? "" : "s")));
  box.append(meta);
  return box;
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

// Columns by distance from the upstream: a node fed by the upstream (or by peers over
// BitTorrent, or by no one known) is in column 1, a node relaying from it in column 2, ...
function planColumns(nodes) {
  const byId = new Map(nodes.map((n) => [n.node_id, n]));
  const depth = new Map();
  const depthOf = (n, seen) => {
    if (depth.has(n.node_id)) return depth.get(n.node_id);
    const feeder = byId.get(n.feeder);
    const d = feeder && !seen.has(feeder.node_id)
      ? depthOf(feeder, new Set([...seen, n.node_id])) + 1 : 1;
    depth.set(n.node_id, d);
    return d;
  };
  for (const n of nodes) depthOf(n, new Set([n.node_id]));
  return depth;
}

function planGraph(blob) {
  const W = 150, H = 44, GAPX = 70, GAPY = 14;
  const depth = planColumns(blob.nodes);
  const rows = new Map();
  const pos = new Map([["upstream", { x: 0, y: 0 }]]);
  for (const n of blob.nodes) {
    const d = depth.get(n.node_id);
    const r = rows.get(d) || 0;
    rows.set(d, r + 1);
    pos.set(n.node_id, { x: d * (W + GAPX), y: r * (H + GAPY) });
  }
  const width = (Math.max(...depth.values()) + 1) * (W + GAPX);
  const height = Math.max(...rows.values()) * (H + GAPY);
  const g = svg("svg", { class: "plan-graph", width, height, viewBox: `0 0 ${width} ${height}` });
  const best = Math.max(1, ...blob.nodes.map((n) => n.rate));
  const box = (id, title, sub, cls) => {
    const p = pos.get(id);
    g.append(svg("rect", { x: p.x + 1, y: p.y + 1, width: W - 2, height: H - 2, rx: 6,
                           class: "plan-node " + cls }));
    g.append(svg("text", { x: p.x + 8, y: p.y + 18, class: "plan-name" }, title));
    g.append(svg("text", { x: p.x + 8, y: p.y + 34, class: "plan-sub" }, sub));
  };
  box("upstream", "upstream", "the Hub or its mirror", "upstream");
  for (const n of blob.nodes) {
    const from = n.source === "upstream" ? "upstream" : n.feeder;
    const a = pos.get(from), b = pos.get(n.node_id);
    const slow = n.rate < best / 2;
    if (a) {
      g.append(svg("line", { x1: a.x + W, y1: a.y + H / 2, x2: b.x, y2: b.y + H / 2,
                             class: "plan-edge" + (slow ? " slow" : "") }));
      g.append(svg("text", { x: (a.x + W + b.x) / 2 - 28, y: (a.y + b.y + H) / 2 - 4,
                             class: "plan-rate" + (slow ? " slow" : "") }, size(n.rate) + "/s"));
    }
    const pct = blob.size ? (100 * n.available) / blob.size : 100;
    const via = a ? "" : n.source === "peer" ? " · BitTorrent" : " · " + n.source;
    const role = n.probing ? " · probing" : n.leaf ? " · leaf" : "";
    box(n.node_id, n.name || n.node_id.slice(0, 12), pct.toFixed(0) + "%" + via + role,
        (slow ? "slow" : "") + (n.leaf ? " leaf" : ""));
  }
  return g;
}

function planBlob(blob) {
  const box = el("div", "transfer plan");
  box.dataset.digest = blob.digest;
  box.append(el("div", "name", blob.file + " · " + size(blob.size)));
  const scroll = el("div", "scroll");
  scroll.append(planGraph(blob));
  box.append(scroll);
  return box;
}

function peerRow(p) {
  const tr = el("tr");
  const state = p.banned ? "banned" : p.alive ? "live" : "down";
  for (const v of [p.name || p.node_id, p.address + ":" + p.peer_port, p.version || "–",
                   ago(p.last_seen), p.chunks_held, size(p.bytes_from), size(p.bytes_to), state]) {
    tr.append(el("td", "", String(v)));
  }
  return tr;
}

function job(j) {
  const box = el("div", "transfer");
  box.append(el("div", "name", j.repo + " (" + j.state + ")"));
  return box;
}

function errorLine(e) {
  return el("div", "error", new Date(e.time * 1000).toLocaleTimeString() + " " + e.level +
            " " + e.logger + ": " + e.message);
}

function render(s) {
  $("node").textContent = s.node + " · v" + s.version;
  $("cache").textContent = size(s.store.bytes);
  $("cache-sub").textContent = s.store.complete_blobs + " files, " + s.store.chunks + " chunks, " +
    (s.max_cache_size ? (100 * s.store.bytes / s.max_cache_size).toFixed(0) + "% of limit " +
     size(s.max_cache_size) : "no limit");
  $("pinned").textContent = size(s.pinned_bytes);
  $("pinned-sub").textContent = s.pins + " pin" + (s.pins === 1 ? "" : "s") + ", " +
    s.pinned_files + " files" + (s.over_limit_bytes ? " · " + size(s.over_limit_bytes) +
    " over the limit, kept by pins" : "");
  $("pinned-sub").className = "sub" + (s.over_limit_bytes ? " warn" : "");
  const served = s.served_bytes;
  $("served").textContent = size(served.store + served.peer + served.upstream);
  $("served-sub").textContent = size(served.store) + " store · " + size(served.peer) +
    " peers · " + size(served.upstream) + " upstream";
  $("peer-count").textContent = s.peers.enabled ? String(s.peers.count) : "off";
  $("peer-sub").textContent = s.peers.enabled ? "cluster " + s.peers.cluster_id : s.peers.reason;
  $("upstream").textContent = s.offline ? "offline" : size(s.upstream_bytes);
  $("upstream-sub").textContent = s.upstream.join(", ");
  $("caps").textContent = rate(s.upstream_rate);
  $("caps-sub").textContent = "from the upstream · to peers: " + rate(s.peer_upload_rate) +
    (s.peers.upload_split && s.peers.upload_split.peer_api ? " (half for relays now)" : "");
  fill($("transfers"), s.transfers, transfer, "nothing is moving");
  fill($("plan"), s.plan, planBlob, "no blob in transfer on the cluster");
  const body = $("peers").querySelector("tbody");
  body.replaceChildren(...s.peer_list.map(peerRow));
  if (!s.peer_list.length) {
    const tr = el("tr");
    const td = el("td", "empty", s.peers.enabled ? "no peers seen yet" : s.peers.reason);
    td.colSpan = 8;
    tr.append(td);
    body.append(tr);
  }
  fill($("jobs"), s.jobs, job, "no warm jobs");
  fill($("errors"), s.recent_errors, errorLine, "none");
  $("about").textContent = "serving " + s.listen + " · cache " + s.cache_dir + " · up " +
    Math.round(s.uptime) + "s";
}

async function poll() {
  try {
    const resp = await fetch(API, { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    $("conn").textContent = "live";
    $("conn").className = "badge ok";
  } catch (e) {
    $("conn").textContent = "daemon unreachable";
    $("conn").className = "badge bad";
  }
  setTimeout(poll, 1000);
}

poll();
