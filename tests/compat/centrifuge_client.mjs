// Drives Switchyard with the unmodified centrifuge-js SDK (npm `centrifuge`)
// under Node. Every SDK event is printed as one JSON line on stdout for the
// Rust test (tests/tests/compat.rs) to check; the script exits 0 once it has
// received `expect` publications, 2 on its deadline.
//
// usage: node centrifuge_client.mjs <ws_url> <token> <channel> <expect>
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const [url, token, channel, expectArg] = process.argv.slice(2);
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

const sub = client.newSubscription(channel, { recoverable: true, positioned: true });
let received = 0;
sub.on('subscribed', (ctx) =>
  out({
    event: 'subscribed',
    recovered: ctx.recovered,
    wasRecovering: ctx.wasRecovering,
    offset: ctx.streamPosition?.offset,
    epoch: ctx.streamPosition?.epoch,
  }),
);
sub.on('subscribing', (ctx) => out({ event: 'subscribing', code: ctx.code, reason: ctx.reason }));
sub.on('error', (ctx) => out({ event: 'sub_error', error: String(ctx.error?.message ?? ctx.error) }));
sub.on('publication', (ctx) => {
  out({ event: 'publication', offset: ctx.offset, data: ctx.data });
  received += 1;
  if (received >= expect) {
    client.disconnect();
    setTimeout(() => process.exit(0), 50);
  }
});
sub.subscribe();
client.connect();
setTimeout(() => {
  out({ event: 'timeout', received });
  process.exit(2);
}, 60000);
