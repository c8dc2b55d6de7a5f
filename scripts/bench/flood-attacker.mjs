// Attacker of the flood scenario: from one source address, keeps `count` connections open through
// the proxy, sending nothing, and re-opens every one that ends as soon as it ends, as fast as it
// can, until `duration` passes or stdin closes. Prints one JSON line at the end:
//   attempts   connects started
//   opened     connects that completed (on loopback the kernel completes them before the proxy
//              decides anything, so a refused connection is opened, then reset)
//   refused    opened, then ended by the proxy within REFUSED_WITHIN_MS without sending a byte
//   dropped    opened, then ended by the proxy later than that (queue_timeout, a late limit)
//   open       still open when we stopped (held by the proxy, or not yet accepted by it)
//   errors     connects that failed, by error code (EADDRNOTAVAIL = out of ephemeral ports)
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
/** An opened connection that ends sooner than this was refused at accept, not dropped later. */
const REFUSED_WITHIN_MS = 1000;

/** @type {Set<net.Socket>} */
const open = new Set();
let attempts = 0;
let opened = 0;
let refused = 0;
let dropped = 0;
let bytesReceived = 0;
/** @type {Record<string, number>} */
const errors = {};
let stopping = false;
const startedAt = performance.now();

function openOne() {
  if (stopping) return;
  attempts++;
  const socket = net.connect({ host: '127.0.0.1', port, localAddress: values.source });
  let connectedAt = 0;
  let errorCode = 'closed';
  socket.on('connect', () => {
    connectedAt = performance.now();
    opened++;
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
    if (connectedAt === 0) errors[errorCode] = (errors[errorCode] ?? 0) + 1;
    else if (performance.now() - connectedAt < REFUSED_WITHIN_MS) refused++;
    else dropped++;
    // setImmediate, not a direct call: a connect that fails synchronously-fast (no free port)
    // would otherwise re-enter at once and starve the timers that end the run.
    setImmediate(openOne);
  });
}

function stop() {
  if (stopping) return;
  stopping = true;
  const seconds = (performance.now() - startedAt) / 1000;
  const report = { attempts, opened, refused, dropped, open: open.size, errors, bytesReceived, seconds };
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
