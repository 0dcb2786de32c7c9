// Drives Switchyard with the unmodified centrifuge-js SDK (npm `centrifuge`)
// under Node. Every SDK event is printed as one JSON line on stdout for the
// Rust test (tests/tests/compat.rs) to check; the script exits 0 once it has
// received `expect` publications, 2 on its deadline. The events are
// sdk_events.js's, shared with the headless-Chromium driver.
//
// With `server` as the fifth argument the script subscribes to nothing: the
// token's `channels` claim makes the channel a server-side subscription,
// and the client-level events report it.
//
// usage: node centrifuge_client.mjs <ws_url> <token> <channel> <expect> [server]
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';
import './sdk_events.js';

const [url, token, channel, expectArg, mode] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');

globalThis.runSdk(
  Centrifuge,
  { url, token, channel, expect: Number(expectArg), serverSide: mode === 'server', websocket: WebSocket },
  out,
  () => setTimeout(() => process.exit(0), 50),
);
setTimeout(() => {
  out({ event: 'timeout' });
  process.exit(2);
}, 60000);
