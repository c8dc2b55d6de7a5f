// Load generators (wrk, iperf3, the TLS handshake client) and the proxy-side meter: CPU seconds
// and RSS of the proxy's process tree, read from /proc before and after each run.
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { failureOutput, processTree, runToCompletion, sampleUsage } from './processes.mjs';
import { TLS_SERVER_NAME } from './backends.mjs';

const SCRIPTS_DIR = new URL('.', import.meta.url).pathname;
/** A load generator that overruns its duration by this much is stopped and the run fails. */
const OVERRUN_MS = 30000;
const WRK_CONNECTIONS = 50;
const TLS_CONCURRENCY = 16;
const IPERF_BUSY_ATTEMPTS = 5;
const IPERF_BUSY_RETRY_MS = 1000;

function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/**
 * Runs `load` while metering the contender's processes. For `direct` there is no proxy to meter.
 * @template {object} T
 * @param {{ child: import('./processes.mjs').Child | null }} contender
 * @param {() => Promise<T>} load
 */
export async function meterProxy(contender, load) {
  const pids = contender.child ? processTree(contender.child.pid) : [];
  const before = sampleUsage(pids);
  const startedAt = performance.now();
  const result = await load();
  const wallSeconds = (performance.now() - startedAt) / 1000;
  const after = sampleUsage(pids);
  if (contender.child && !contender.child.isRunning()) {
    throw new Error(`${contender.child.name} exited during the run: ${failureOutput(contender.child)}`);
  }
  const proxy = contender.child
    ? { cpuSeconds: after.cpuSeconds - before.cpuSeconds, rssKb: after.rssKb, wallSeconds }
    : null;
  return { ...result, proxy };
}

/**
 * wrk with one thread and 50 connections, as in the issue. `close` sends `Connection: close` so
 * every request is a new connection.
 * @param {import('./backends.mjs').BenchContext} ctx
 */
export async function runWrk(ctx, port, seconds, { close }) {
  const argv = [...ctx.machine.loadPrefix, ctx.machine.tools.wrk, '-t1', `-c${WRK_CONNECTIONS}`, `-d${seconds}s`, '--timeout', '2s'];
  if (close) argv.push('-H', 'Connection: close');
  argv.push(`http://127.0.0.1:${port}/`);
  const out = await runToCompletion('wrk', argv, seconds * 1000 + OVERRUN_MS);
  const requests = Number(/(\d+) requests in/.exec(out)?.[1]);
  const rate = Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1]);
  if (!Number.isFinite(requests) || !Number.isFinite(rate)) throw new Error(`could not read wrk output: ${out}`);
  const socketErrors = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
  const non2xx = Number(/Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1] ?? 0);
  const errors = (socketErrors ? socketErrors.slice(1).reduce((sum, n) => sum + Number(n), 0) : 0) + non2xx;
  return { rate, operations: requests, errors, errorDetail: socketErrors?.[0] ?? '' };
}

/**
 * One iperf3 stream for `seconds`, client to server. Rate in Gbit/s; operations are gigabytes
 * received, so CPU per operation is seconds per GB.
 * @param {import('./backends.mjs').BenchContext} ctx
 */
export async function runIperf(ctx, port, seconds, { reverse = false } = {}) {
  const argv = [...ctx.machine.loadPrefix, ctx.machine.tools.iperf3, '-c', '127.0.0.1', '-p', String(port), '-t', String(seconds), '-J'];
  if (reverse) argv.push('-R'); // the server sends: through a proxy, the backend -> client direction
  let report;
  for (let attempt = 1; ; attempt++) {
    try {
      report = JSON.parse(await runToCompletion('iperf3', argv, seconds * 1000 + OVERRUN_MS));
    } catch (err) {
      // iperf3 exits non-zero on failure but still prints its JSON report; keep the error it names.
      const json = /\{[\s\S]*\}/.exec(String(err.message))?.[0];
      report = json ? safeJson(json) ?? { error: err.message } : { error: err.message };
    }
    // The server serves one test at a time and finishes the previous one a moment after its
    // client has gone; a test that starts within that moment is refused as "busy".
    if (!/server is busy/.test(report.error ?? '') || attempt === IPERF_BUSY_ATTEMPTS) break;
    await sleep(IPERF_BUSY_RETRY_MS);
  }
  if (report.error) throw new Error(`iperf3: ${report.error}`);
  const received = report.end?.sum_received;
  if (!received) throw new Error('iperf3 reported no sum_received');
  return { rate: received.bits_per_second / 1e9, operations: received.bytes / 1e9, errors: 0, errorDetail: '' };
}

/**
 * Full TLS handshakes with SNI through `port` for `seconds`, from the Node handshake client.
 * @param {import('./backends.mjs').BenchContext} ctx
 */
export async function runTlsHandshakes(ctx, port, seconds) {
  const argv = [
    ...ctx.machine.loadPrefix,
    process.execPath,
    join(SCRIPTS_DIR, 'tls-client.mjs'),
    '--port', String(port),
    '--servername', TLS_SERVER_NAME,
    '--duration', String(seconds),
    '--concurrency', String(TLS_CONCURRENCY),
  ];
  const out = await runToCompletion('tls client', argv, seconds * 1000 + OVERRUN_MS);
  const { handshakes, errors, seconds: elapsed } = JSON.parse(out.trim().split('\n').pop() ?? '{}');
  return { rate: handshakes / elapsed, operations: handshakes, errors, errorDetail: errors ? `${errors} failed handshakes` : '' };
}
