"""Drives Switchyard with the unmodified centrifuge-python SDK (PyPI
`centrifuge-python`). The channel is a server-side subscription from the
token's `channels` claim: the SDK learns it from the connect reply's `subs`
and recovers it through `connect.subs` after a reconnect.

Prints every SDK event as one JSON line on stdout for the Rust test
(tests/tests/compat.rs); exits 0 once it has received `expect`
publications of the channel, 2 on its 60 s deadline.

usage: python centrifuge_python_client.py <ws_url> <token> <channel> <expect>
"""

import asyncio
import json
import sys

from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    ConnectingContext,
    DisconnectedContext,
    ErrorContext,
    ServerPublicationContext,
    ServerSubscribedContext,
)

url, token, channel, expect = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
done = asyncio.Event()
received = 0


def out(o):
    sys.stdout.write(json.dumps(o) + "\n")
    sys.stdout.flush()


class Events(ClientEventHandler):
    async def on_connecting(self, ctx: ConnectingContext) -> None:
        out({"event": "connecting", "code": ctx.code, "reason": ctx.reason})

    async def on_connected(self, ctx: ConnectedContext) -> None:
        out({"event": "connected", "client": ctx.client})

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        out({"event": "disconnected", "code": ctx.code, "reason": ctx.reason})

    async def on_error(self, ctx: ErrorContext) -> None:
        out({"event": "error", "error": str(ctx.error)})

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        pos = ctx.stream_position
        out(
            {
                "event": "subscribed",
                "channel": ctx.channel,
                "recovered": ctx.recovered,
                "wasRecovering": ctx.was_recovering,
                "offset": pos.offset if pos else None,
                "epoch": pos.epoch if pos else None,
            }
        )

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        global received
        if ctx.channel != channel:
            return
        out({"event": "publication", "offset": ctx.pub.offset, "data": ctx.pub.data})
        received += 1
        if received >= expect:
            done.set()


async def main() -> int:
    client = Client(
        url,
        events=Events(),
        token=token,
        name="compat-py",
        min_reconnect_delay=0.5,
        max_reconnect_delay=2.0,
    )
    await client.connect()
    try:
        await asyncio.wait_for(done.wait(), 60)
    except asyncio.TimeoutError:
        out({"event": "timeout", "received": received})
        return 2
    await client.disconnect()
    return 0


sys.exit(asyncio.run(main()))
