// Attacker of the flood scenario: from one source address, keeps `count` connections open through
// the proxy, sending nothing, and re-opens every one that ends as soon as it ends, as fast as it
// can, until `duration` passes or stdin closes. Prints one JSON line at the end:
//   attempts   connects started
//   refused    ended by the other side (reset or EOF) before any byte arrived. On loopback the
//              kernel completes a connect before the proxy decides anything, so most refusals
//              are a connect followed by a reset; when the reset comes before we have seen the
//              connect complete, the connect itself fails with ECONNRESET, which counts here too.
//   open       still open when we stopped: held by the proxy, or not yet accepted by it
//   errors     connects that failed otherwise, by code (EADDRNOTAVAIL = out of ephemeral ports)
// Usage: node flood-attacker.mjs --port PORT --count N --duration S [--source 127.0.0.2]
import net from 'node:net';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    port: { type: 'string' },
    count: { type: 'string', default: '3000' },
    duration: { type: 'string', default: '10' },
    source: { type: 'string', default: '127.0.0.2' },
  },
});
const port = Number(values.port);
const count = Number(values.count);
const durationMs = Number(values.duration) * 1000;
/** @type {Set<net.Socket>} */
const open = new Set();
let attempts = 0;
let refused = 0;
let bytesReceived = 0;
/** @type {Record<string, number>} */
const errors = {};
let stopping = false;
const startedAt = performance.now();

function openOne() {
  if (stopping) return;
  attempts++;
  const socket = net.connect({ host: '127.0.0.1', port, localAddress: values.source });
  let connected = false;
  let errorCode = 'closed';
  socket.on('connect', () => {
    connected = true;
    open.add(socket);
  });
  socket.on('data', (chunk) => {
    bytesReceived += chunk.length;
  });
  socket.on('error', (err) => {
    errorCode = /** @type {NodeJS.ErrnoException} */ (err).code ?? 'error';
  });
  socket.on('close', () => {
    open.delete(socket);
    if (stopping) return;
    if (connected || errorCode === 'ECONNRESET') refused++;
    else errors[errorCode] = (errors[errorCode] ?? 0) + 1;
    // setImmediate, not a direct call: a connect that fails synchronously-fast (no free port)
    // would otherwise re-enter at once and starve the timers that end the run.
    setImmediate(openOne);
  });
}

function stop() {
  if (stopping) return;
  stopping = true;
  const seconds = (performance.now() - startedAt) / 1000;
  const report = { attempts, refused, open: open.size, errors, bytesReceived, seconds };
  process.stdout.write(JSON.stringify(report) + '\n');
  for (const socket of open) socket.destroy();
  process.exit(0);
}

for (let i = 0; i < count; i++) openOne();
setTimeout(stop, durationMs);
process.stdin.on('end', stop);
process.stdin.on('error', stop);
process.stdin.resume();
process.on('SIGTERM', stop);
