// Legitimate client of the flood scenario: from its own source address, `rate` short round trips
// per second for `duration` seconds, each on a new connection: connect, send a few bytes, read
// them back from the echo backend, close. Requests start on a fixed schedule whether or not the
// previous ones have finished (an open loop), so a stalled proxy shows up as latency and failures
// rather than as fewer requests. Latency runs from the connect call to the last echoed byte.
// Prints one JSON line at the end: attempts, ok, failures by kind, p50/p99/max in ms, and how many
// took a second or more (a dropped SYN is retried after 1 s: the mark of a full accept queue).
// Failure kinds: refused (reset or closed before the echo), timeout (no echo within
// REQUEST_DEADLINE_MS), connect_<code> (the connect itself failed), mismatch (wrong bytes back).
// Usage: node flood-legit.mjs --port PORT [--rate 100] [--duration S] [--source 127.0.0.3]
import net from 'node:net';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    port: { type: 'string' },
    rate: { type: 'string', default: '100' },
    duration: { type: 'string', default: '10' },
    source: { type: 'string', default: '127.0.0.3' },
  },
});
const port = Number(values.port);
const intervalMs = 1000 / Number(values.rate);
const total = Math.round(Number(values.duration) * Number(values.rate));
/** A request still unanswered after this fails as a timeout, so the run always ends. */
const REQUEST_DEADLINE_MS = 5000;
const SYN_RETRY_MS = 1000;

const latenciesMs = [];
/** @type {Record<string, number>} */
const failures = {};
let started = 0;
let finished = 0;
const startedAt = performance.now();

function fail(kind) {
  failures[kind] = (failures[kind] ?? 0) + 1;
}

function roundTrip(n) {
  const payload = Buffer.from(`ping ${n}\n`);
  const t0 = performance.now();
  const socket = net.connect({ host: '127.0.0.1', port, localAddress: values.source });
  let received = Buffer.alloc(0);
  let connected = false;
  let outcome = null;
  let errorCode = '';
  const deadline = setTimeout(() => settle('timeout'), REQUEST_DEADLINE_MS);
  socket.on('connect', () => {
    connected = true;
    socket.write(payload);
  });
  socket.on('data', (chunk) => {
    received = Buffer.concat([received, chunk]);
    if (received.length < payload.length) return;
    settle(received.equals(payload) ? 'ok' : 'mismatch');
  });
  socket.on('error', (err) => {
    errorCode = /** @type {NodeJS.ErrnoException} */ (err).code ?? 'error';
  });
  socket.on('close', () => settle(connected ? 'refused' : `connect_${errorCode || 'closed'}`));

  // Exactly one outcome per request, whichever event comes first.
  function settle(kind) {
    if (outcome !== null) return;
    outcome = kind;
    clearTimeout(deadline);
    if (kind === 'ok') {
      latenciesMs.push(performance.now() - t0);
      socket.end();
    } else {
      fail(kind);
      socket.destroy();
    }
    finished++;
    if (finished === total) report();
  }
}

/** Starts request `started` at its scheduled time, then schedules the next. */
function tick() {
  while (started < total && performance.now() - startedAt >= started * intervalMs) roundTrip(started++);
  if (started < total) setTimeout(tick, Math.max(0, startedAt + started * intervalMs - performance.now()));
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

function report() {
  const sorted = latenciesMs.sort((a, b) => a - b);
  const round = (ms) => (ms === null ? null : Math.round(ms * 1000) / 1000);
  process.stdout.write(
    JSON.stringify({
      attempts: started,
      ok: sorted.length,
      failures,
      p50Ms: round(percentile(sorted, 50)),
      p99Ms: round(percentile(sorted, 99)),
      maxMs: round(sorted.at(-1) ?? null),
      slow: sorted.filter((ms) => ms >= SYN_RETRY_MS).length,
      seconds: (performance.now() - startedAt) / 1000,
    }) + '\n',
  );
  process.exit(0);
}

if (total === 0) report();
else tick();
