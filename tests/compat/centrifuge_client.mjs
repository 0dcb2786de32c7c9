// Drives Switchyard with the unmodified centrifuge-js SDK (npm `centrifuge`)
// under Node. Every SDK event is printed as one JSON line on stdout for the
// Rust test (tests/tests/compat.rs) to check; the script exits 0 once it has
// received `expect` publications, 2 on its deadline.
//
// With `server` as the fifth argument the script subscribes to nothing: the
// token's `channels` claim makes the channel a server-side subscription,
// and the client-level events report it.
//
// usage: node centrifuge_client.mjs <ws_url> <token> <channel> <expect> [server]
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const [url, token, channel, expectArg, mode] = process.argv.slice(2);
const serverSide = mode === 'server';
const expect = Number(expectArg);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

const client = new Centrifuge(url, {
  websocket: WebSocket,
  token,
  name: 'compat-js',
  minReconnectDelay: 500,
  maxReconnectDelay: 2000,
  timeout: 5000,
});
client.on('connecting', (ctx) => out({ event: 'connecting', code: ctx.code, reason: ctx.reason }));
client.on('connected', (ctx) => out({ event: 'connected', client: ctx.client }));
client.on('disconnected', (ctx) => out({ event: 'disconnected', code: ctx.code, reason: ctx.reason }));
client.on('error', (ctx) => out({ event: 'error', error: String(ctx.error?.message ?? ctx.error) }));

// The same events for a client-side subscription and for the client's
// server-side ones.
const source = serverSide ? client : client.newSubscription(channel, { recoverable: true, positioned: true });
let received = 0;
source.on('subscribed', (ctx) =>
  out({
    event: 'subscribed',
    channel: ctx.channel ?? channel,
    recovered: ctx.recovered,
    wasRecovering: ctx.wasRecovering,
    offset: ctx.streamPosition?.offset,
    epoch: ctx.streamPosition?.epoch,
  }),
);
source.on('subscribing', (ctx) => out({ event: 'subscribing', code: ctx.code, reason: ctx.reason }));
if (!serverSide) {
  source.on('error', (ctx) => out({ event: 'sub_error', error: String(ctx.error?.message ?? ctx.error) }));
}
source.on('publication', (ctx) => {
  if ((ctx.channel ?? channel) !== channel) return;
  out({ event: 'publication', offset: ctx.offset, data: ctx.data });
  received += 1;
  if (received >= expect) {
    client.disconnect();
    setTimeout(() => process.exit(0), 50);
  }
});
if (!serverSide) {
  source.subscribe();
}
client.connect();
setTimeout(() => {
  out({ event: 'timeout', received });
  process.exit(2);
}, 60000);
