// Client of the tls scenario: full TLS handshakes with SNI, no session resumption (a fresh
// connection never gets a session to offer), `concurrency` at a time, for `duration` seconds.
// Each connection ends as soon as the handshake completes. Prints one JSON line at the end.
// Usage: node tls-client.mjs --port PORT --servername NAME --duration SECONDS [--concurrency N]
import tls from 'node:tls';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    port: { type: 'string' },
    servername: { type: 'string', default: 'api.example.com' },
    duration: { type: 'string', default: '5' },
    concurrency: { type: 'string', default: '16' },
  },
});
const port = Number(values.port);
const durationMs = Number(values.duration) * 1000;
/** A handshake stuck longer than this is counted as an error, so the loop always ends. */
const HANDSHAKE_DEADLINE_MS = 5000;

const startedAt = performance.now();
const deadline = startedAt + durationMs;
let handshakes = 0;
let errors = 0;
let active = 0;

function handshakeLoop() {
  if (performance.now() >= deadline) {
    if (active === 0) finish();
    return;
  }
  active++;
  // The benchmark's certificate is self-signed; skipping chain validation keeps the client's
  // own CPU down (the handshake signature is still checked).
  const socket = tls.connect({ host: '127.0.0.1', port, servername: values.servername, rejectUnauthorized: false });
  let ok = false;
  socket.setTimeout(HANDSHAKE_DEADLINE_MS, () => socket.destroy());
  socket.on('secureConnect', () => {
    ok = true;
    handshakes++;
    socket.end();
  });
  socket.on('error', () => {});
  socket.on('close', () => {
    if (!ok) errors++;
    active--;
    handshakeLoop();
  });
}

let finished = false;
function finish() {
  if (finished) return;
  finished = true;
  const seconds = (performance.now() - startedAt) / 1000;
  process.stdout.write(JSON.stringify({ handshakes, errors, seconds }) + '\n');
  process.exit(0);
}

for (let i = 0; i < Number(values.concurrency); i++) handshakeLoop();
