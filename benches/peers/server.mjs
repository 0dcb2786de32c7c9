// A peer server for the side-by-side benchmarks (benches/scripts/peers.py):
// the part of Switchyard's client protocol (Centrifugo's, JSON) the load
// generator drives, on uWebSockets.js or on node `ws`, written the way each
// library is meant to be used: uWS with its topic pub/sub (a publication is
// framed once and written to every subscriber by the library), `ws` with a
// set per channel and one `send` per subscriber.
//
// It does what a real server must for the same client: verifies the
// connection JWT (HS256, node's crypto), answers `connect` and `subscribe`
// (with the channel's position: `epoch`, `offset`), keeps one offset per
// channel and puts it in every publication, and serves the HTTP API's
// `publish` (`X-API-Key`) and `history` (position only). No history, no
// recovery, no presence, no cluster: a floor for the work, not a peer of
// the features.
//
// usage: node server.mjs <uws|ws> <port> <hmac_secret> <api_key>
import { createHmac, randomUUID, timingSafeEqual } from 'node:crypto';
import { createRequire } from 'node:module';
import http from 'node:http';

const [impl, portArg, secret, apiKey] = process.argv.slice(2);
const port = Number(portArg);
const epoch = randomUUID().slice(0, 8);
const tops = new Map(); // channel → offset

function verify(token) {
  const parts = String(token || '').split('.');
  if (parts.length !== 3) return null;
  const mac = createHmac('sha256', secret).update(parts[0] + '.' + parts[1]).digest();
  const sig = Buffer.from(parts[2], 'base64url');
  if (sig.length !== mac.length || !timingSafeEqual(sig, mac)) return null;
  try {
    const claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString());
    if (claims.exp && claims.exp * 1000 < Date.now()) return null;
    return claims;
  } catch {
    return null;
  }
}

// One text frame's commands → the replies' lines; `sub(channel)` subscribes.
function handle(text, state, sub) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    let cmd;
    try {
      cmd = JSON.parse(line);
    } catch {
      return null; // close: bad request
    }
    if (cmd.connect) {
      const claims = verify(cmd.connect.token);
      if (!claims) return null;
      state.user = claims.sub || '';
      out.push(JSON.stringify({ id: cmd.id, connect: { client: randomUUID(), version: 'peer', ping: 25, pong: true } }));
    } else if (cmd.subscribe) {
      if (state.user === undefined) return null;
      const ch = cmd.subscribe.channel;
      sub(ch);
      const top = tops.get(ch) || 0;
      out.push(JSON.stringify({ id: cmd.id, subscribe: { recoverable: true, positioned: true, epoch, offset: top, was_recovering: !!cmd.subscribe.recover } }));
    } else if (cmd.id) {
      out.push(JSON.stringify({ id: cmd.id, error: { code: 108, message: 'not available' } }));
    }
  }
  return out.join('\n');
}

function publication(channel, data) {
  const offset = (tops.get(channel) || 0) + 1;
  tops.set(channel, offset);
  const push = `{"push":{"channel":${JSON.stringify(channel)},"pub":{"data":${JSON.stringify(data)},"offset":${offset}}}}`;
  return { offset, push };
}

function api(method, body) {
  let req;
  try {
    req = JSON.parse(body);
  } catch {
    return [400, ''];
  }
  if (method === 'publish') {
    return [200, null, req.channel, req.data];
  }
  if (method === 'history') {
    return [200, JSON.stringify({ result: { publications: [], epoch, offset: tops.get(req.channel) || 0 } })];
  }
  return [404, ''];
}

if (impl === 'uws') {
  const uWS = createRequire(import.meta.url)('@trufflesuite/uws-js-unofficial');
  const app = uWS.App();
  app.ws('/connection/websocket', {
    maxPayloadLength: 65536,
    idleTimeout: 0,
    maxBackpressure: 1 << 20,
    upgrade: (res, req, context) => {
      res.upgrade(
        { state: {} },
        req.getHeader('sec-websocket-key'),
        req.getHeader('sec-websocket-protocol'),
        req.getHeader('sec-websocket-extensions'),
        context,
      );
    },
    message: (ws, message) => {
      const replies = handle(Buffer.from(message).toString(), ws.getUserData().state, (ch) => ws.subscribe(ch));
      if (replies === null) ws.end(3501, 'bad request');
      else if (replies) ws.send(replies, false);
    },
  });
  app.post('/api/:method', (res, req) => {
    const method = req.getParameter(0);
    const key = req.getHeader('x-api-key');
    let body = Buffer.alloc(0);
    res.onAborted(() => {});
    res.onData((chunk, last) => {
      body = Buffer.concat([body, Buffer.from(chunk)]);
      if (!last) return;
      if (key !== apiKey) {
        res.writeStatus('401 Unauthorized').end();
        return;
      }
      const [status, text, channel, data] = api(method, body.toString());
      if (text === null) {
        const { offset, push } = publication(channel, data);
        app.publish(channel, push, false);
        res.end(JSON.stringify({ result: { offset, epoch } }));
      } else {
        res.writeStatus(String(status)).end(text);
      }
    });
  });
  app.listen('127.0.0.1', port, (ok) => {
    if (!ok) process.exit(1);
    console.log(JSON.stringify({ impl, port }));
  });
} else {
  const { WebSocketServer } = createRequire(import.meta.url)('ws');
  const channels = new Map(); // channel → Set of sockets
  const server = http.createServer((req, res) => {
    const m = /^\/api\/(\w+)$/.exec(req.url || '');
    if (req.method !== 'POST' || !m) {
      res.writeHead(404).end();
      return;
    }
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      if (req.headers['x-api-key'] !== apiKey) {
        res.writeHead(401).end();
        return;
      }
      const [status, text, channel, data] = api(m[1], Buffer.concat(chunks).toString());
      const reply = (code, body) =>
        res.writeHead(code, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body);
      if (text === null) {
        const { offset, push } = publication(channel, data);
        for (const ws of channels.get(channel) || []) ws.send(push);
        reply(200, JSON.stringify({ result: { offset, epoch } }));
      } else {
        reply(status, text);
      }
    });
  });
  const wss = new WebSocketServer({ server, path: '/connection/websocket', perMessageDeflate: false });
  wss.on('connection', (ws) => {
    const state = {};
    const mine = [];
    ws.on('message', (data) => {
      const replies = handle(data.toString(), state, (ch) => {
        if (!channels.has(ch)) channels.set(ch, new Set());
        channels.get(ch).add(ws);
        mine.push(ch);
      });
      if (replies === null) ws.close(3501, 'bad request');
      else if (replies) ws.send(replies);
    });
    ws.on('close', () => {
      for (const ch of mine) channels.get(ch)?.delete(ws);
    });
  });
  server.listen(port, '127.0.0.1', () => console.log(JSON.stringify({ impl, port })));
}
