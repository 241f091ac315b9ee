"""A keyless host that does everything a LAN attacker can without the cluster key: it announces
itself on mDNS with a real node's cluster id (and once more under a real node's id), and answers
every peer API route with plausible JSON, writing each request it receives to a log, one JSON
object per line. `python -m tests.impostor ADDRESS CLUSTER_ID REAL_NODE_ID LOG`."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import sys
from pathlib import Path

from aiohttp import web
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

SERVICE = "_modelpeer._tcp.local."
PORT = 6581


def announcement(address: str, cluster_id: str, node_id: str, name: str) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE, f"{name}.{SERVICE}", addresses=[socket.inet_aton(address)], port=PORT,
        properties={"node": node_id, "cluster": cluster_id, "peer_port": str(PORT),
                    "bt_port": "6582", "version": "0.1.0"},
        server=f"{name}.local.")


async def serve(address: str, node_id: str, log: Path) -> web.AppRunner:
    async def anything(request: web.Request) -> web.Response:
        body = await request.read()
        with log.open("a") as f:
            f.write(json.dumps({"method": request.method, "path": request.path_qs,
                                "headers": dict(request.headers),
                                "body": body.decode(errors="replace")}) + "\n")
        return web.json_response({"node_id": node_id, "name": "h9", "version": "0.1.0",
                                  "bt_port": 6582, "chunks": 99, "digest": "",
                                  "chunks_held": [], "small": True, "transfer": "upstream",
                                  "state": "running", "job": "0123456789ab"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, PORT).start()
    return runner


async def main(address: str, cluster_id: str, real_node: str, log: Path) -> None:
    own_id = secrets.token_hex(16)
    runner = await serve(address, own_id, log)
    zc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    for node_id, name in ((own_id, f"modelpeer-{own_id}"), (real_node, f"modelpeer-{own_id}-b")):
        await (await zc.async_register_service(
            announcement(address, cluster_id, node_id, name)))
    print("announced", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await zc.async_close()
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])))
