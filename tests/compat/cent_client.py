"""Drives Switchyard's HTTP API with the unmodified `cent` client (PyPI).

Prints one JSON object with what each call returned, for the Rust test
(tests/tests/compat.rs) to check.

usage: python cent_client.py <api_url> <api_key> <channel>
"""

import json
import sys
import time

from cent import (
    BroadcastRequest,
    ChannelsRequest,
    Client,
    Disconnect,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    RefreshRequest,
    SubscribeRequest,
    UnsubscribeRequest,
)

api_url, api_key, channel = sys.argv[1:4]
client = Client(api_url, api_key, timeout=10)
out = {}

r = client.publish(PublishRequest(channel=channel, data={"from": "cent", "i": 1}))
out["publish"] = {"offset": r.offset, "epoch": r.epoch}
r = client.publish(PublishRequest(channel=channel, data={"from": "cent", "i": 1}, idempotency_key="k1"))
again = client.publish(PublishRequest(channel=channel, data={"from": "cent", "i": 1}, idempotency_key="k1"))
out["idempotent"] = [r.offset, again.offset]
r = client.broadcast(BroadcastRequest(channels=[channel, channel + "-other"], data={"from": "cent", "i": 2}))
out["broadcast"] = [resp.result.offset if resp.result else None for resp in r.responses]
r = client.history(HistoryRequest(channel=channel, limit=10))
out["history"] = {"offset": r.offset, "epoch": r.epoch, "data": [p.data for p in r.publications]}
r = client.presence(PresenceRequest(channel=channel))
out["presence"] = sorted(info.user for info in r.presence.values())
r = client.presence_stats(PresenceStatsRequest(channel=channel))
out["presence_stats"] = [r.num_clients, r.num_users]
r = client.channels(ChannelsRequest(pattern="chat:*"))
out["channels"] = sorted(r.channels.keys())
r = client.info(InfoRequest())
out["info_nodes"] = len(r.nodes)
client.history_remove(HistoryRemoveRequest(channel=channel))
r = client.history(HistoryRequest(channel=channel, limit=10))
out["history_after_remove"] = len(r.publications)

try:
    Client(api_url, "wrong-key").publish(PublishRequest(channel=channel, data={}))
    out["bad_key"] = "accepted"
except Exception as e:  # the exact class is the SDK's business; report it
    out["bad_key"] = type(e).__name__
try:
    client.publish(PublishRequest(channel="nope:x", data={}))
    out["unknown_namespace"] = "accepted"
except Exception as e:
    out["unknown_namespace"] = [type(e).__name__, getattr(e, "code", None)]

# The user-wide commands, on the watcher (user "py-watcher"): a server-side
# subscription, a new expiry, an unsubscribe, then a disconnect.
user = "py-watcher"
client.subscribe(SubscribeRequest(user=user, channel=channel + "-srv"))
client.refresh(RefreshRequest(user=user, expire_at=int(time.time()) + 3600))
client.unsubscribe(UnsubscribeRequest(user=user, channel=channel + "-srv"))
client.disconnect(DisconnectRequest(user=user, disconnect=Disconnect(code=4000, reason="cent")))
out["user_commands"] = "sent"

print(json.dumps(out))
