// Drives Switchyard with the unmodified centrifuge-js SDK (its browser
// bundle, node_modules/centrifuge/dist/centrifuge.js) in headless Chromium
// (Debian's `chromium`, driven by puppeteer-core): the browser's own
// WebSocket, the events of sdk_events.js printed as JSON lines on stdout.
// Exits 0 once `expect` publications arrived, 2 on its deadline.
//
// usage: node centrifuge_browser.mjs <ws_url> <token> <channel> <expect> [server|http_stream|sse]
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';

const [url, token, channel, expectArg, mode] = process.argv.slice(2);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const here = (p) => fileURLToPath(new URL(p, import.meta.url));

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
const deadline = setTimeout(async () => {
  out({ event: 'timeout' });
  await browser.close();
  process.exit(2);
}, 60000);
const page = await browser.newPage();
let finished;
const done = new Promise((resolve) => (finished = resolve));
await page.exposeFunction('report', (o) => out(o));
await page.exposeFunction('finished', () => finished());
await page.addScriptTag({ path: here('node_modules/centrifuge/dist/centrifuge.js') });
await page.addScriptTag({ path: here('sdk_events.js') });
await page.evaluate(
  (opts) => {
    out({ event: 'browser', userAgent: navigator.userAgent });
    function out(o) {
      window.report(o);
    }
    window.runSdk(window.Centrifuge, opts, out, () => window.finished());
  },
  {
    url,
    token,
    channel,
    expect: Number(expectArg),
    serverSide: mode === 'server',
    fallback: ['http_stream', 'sse'].includes(mode) ? mode : undefined,
  },
);
await done;
clearTimeout(deadline);
await new Promise((r) => setTimeout(r, 50));
await browser.close();
process.exit(0);
