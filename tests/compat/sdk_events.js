// The SDK's events, shared by the Node (centrifuge_client.mjs) and browser
// (centrifuge_browser.mjs) drivers: a plain script that defines
// `globalThis.runSdk`, loaded with `import` in Node and as a script tag in
// headless Chromium. Every event goes to `out` as one object; `done()` is
// called once `expect` publications of the channel arrived.
//
// serverSide: the channel is a server-side subscription from the token's
// `channels` claim (no client-side subscription; the client's events).
// fallback (`http_stream` or `sse`): the SDK is given WebSocket first, at a
// path where the upgrade fails, then that HTTP transport, as a page on a
// network that blocks WebSocket would be; its commands after the first go
// through `POST /emulation`.
globalThis.runSdk = function runSdk(Centrifuge, opts, out, done) {
  const { url, token, channel, expect, serverSide, websocket, fallback } = opts;
  let endpoint = url;
  let emulation = {};
  if (fallback) {
    const http = url.replace(/^ws/, 'http').replace(/\/connection\/websocket$/, '');
    endpoint = [
      { transport: 'websocket', endpoint: url.replace(/\/connection\/websocket$/, '/connection/blocked') },
      { transport: fallback, endpoint: `${http}/connection/${fallback}` },
    ];
    emulation = { emulationEndpoint: `${http}/emulation` };
  }
  const client = new Centrifuge(endpoint, {
    ...(websocket ? { websocket } : {}),
    ...emulation,
    token,
    name: 'compat-js',
    minReconnectDelay: 500,
    maxReconnectDelay: 2000,
    timeout: 5000,
  });
  client.on('connecting', (ctx) => out({ event: 'connecting', code: ctx.code, reason: ctx.reason }));
  client.on('connected', (ctx) => out({ event: 'connected', client: ctx.client, transport: ctx.transport }));
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
      done();
    }
  });
  if (!serverSide) {
    source.subscribe();
  }
  client.connect();
};
