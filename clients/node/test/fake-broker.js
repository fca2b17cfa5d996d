'use strict';

// A scripted stand-in for the broker, for the unit tests of the client and the storage only
// (one layer each); the end-to-end tests use the real `tokenwal serve`.

const http = require('node:http');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

async function fakeBroker(handler) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tokenwal-fake-'));
  const socketPath = path.join(dir, 'fake.sock');
  const requests = [];
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString();
      const r = { method: req.method, url: req.url, headers: req.headers, body: text ? JSON.parse(text) : undefined };
      requests.push(r);
      const answer = handler(r);
      if (answer === 'hang') return;
      const [status, body, headers = {}] = answer;
      res.writeHead(status, { 'content-type': 'application/json', ...headers });
      res.end(typeof body === 'string' ? body : JSON.stringify(body));
    });
  });
  await new Promise((r) => server.listen(socketPath, r));
  return {
    socketPath,
    requests,
    async close() {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

function tokenBody(shop, accessToken, secondsLeft = 3000) {
  return {
    shop,
    access_token: accessToken,
    expires_at: new Date(Date.now() + secondsLeft * 1000).toISOString().replace(/\.\d{3}Z$/, 'Z'),
    expires_in: secondsLeft,
    scope: 'read_products',
  };
}

module.exports = { fakeBroker, tokenBody };
