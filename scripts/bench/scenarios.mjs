// The scenarios of the issue (the flood scenario lives in flood-scenario.mjs). A rate scenario starts its backend once, every contender once,
// warms each up, then measures repetitions with the contenders in a rotated order per
// repetition. The idle scenario starts a fresh proxy for every run, because memory freed after one
// run's connections is not returned to the OS and would hide the next run's growth.
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { startHoldBackend, startHttpBackend, startIperfBackend, startTlsBackend } from './backends.mjs';
import { meterProxy, runIperf, runTlsHandshakes, runWrk } from './measure.mjs';
import { failureOutput, processTree, sampleUsage, spawnChild, stopChild } from './processes.mjs';
import { startContender } from './proxies.mjs';
import { formatNumber } from './report.mjs';

const SCRIPTS_DIR = new URL('.', import.meta.url).pathname;
const PAUSE_BETWEEN_RUNS_MS = 500;
/** Pause after start-up, and the default pause between opening the connections and sampling RSS. */
const IDLE_SETTLE_MS = 1000;
const IDLE_OPEN_TIMEOUT_MS = 90000;
const IDLE_DRAIN_TIMEOUT_MS = 30000;

/**
 * @typedef {object} RateScenario
 * @property {string} name
 * @property {string} what           one line for the report
 * @property {string} rateUnit
 * @property {string} cpuUnit
 * @property {number} cpuScale       CPU seconds per operation -> printed unit
 * @property {string[]} tools        machine tools it needs
 * @property {boolean} routeBySni
 * @property {(ctx: any) => Promise<{ port: number, kind: string, child: any }>} startBackend
 * @property {(ctx: any, port: number, seconds: number) => Promise<{ rate: number, operations: number, errors: number, errorDetail: string }>} load
 */

/**
 * One iperf3 stream; `reverse` makes the server send, so through a proxy the bytes go backend ->
 * client. CPU per operation is seconds per GB.
 * @returns {RateScenario}
 */
function iperfScenario(name, what, reverse) {
  return {
    name,
    what,
    rateUnit: 'Gbit/s',
    cpuUnit: 's/GB',
    cpuScale: 1,
    tools: ['iperf3'],
    routeBySni: false,
    startBackend: startIperfBackend,
    load: (ctx, port, seconds) => runIperf(ctx, port, seconds, { reverse }),
  };
}

/** @type {Record<string, RateScenario>} */
export const RATE_SCENARIOS = {
  throughput: iperfScenario('throughput', 'iperf3, 1 stream, client -> server', false),
  download: iperfScenario('download', 'iperf3 -R, 1 stream, server -> client', true),
  connect: {
    name: 'connect',
    what: "wrk -t1 -c50 -H 'Connection: close' (one connection per request)",
    rateUnit: 'conn/s',
    cpuUnit: 'µs/conn',
    cpuScale: 1e6,
    tools: ['wrk'],
    routeBySni: false,
    startBackend: startHttpBackend,
    load: (ctx, port, seconds) => runWrk(ctx, port, seconds, { close: true }),
  },
  keepalive: {
    name: 'keepalive',
    what: 'wrk -t1 -c50, keep-alive requests',
    rateUnit: 'req/s',
    cpuUnit: 'µs/req',
    cpuScale: 1e6,
    tools: ['wrk'],
    routeBySni: false,
    startBackend: startHttpBackend,
    load: (ctx, port, seconds) => runWrk(ctx, port, seconds, { close: false }),
  },
  tls: {
    name: 'tls',
    what: 'full TLS 1.3 handshakes, SNI api.example.com, routed by SNI, 16 concurrent',
    rateUnit: 'hs/s',
    cpuUnit: 'µs/hs',
    cpuScale: 1e6,
    tools: ['openssl'],
    routeBySni: true,
    startBackend: startTlsBackend,
    load: runTlsHandshakes,
  },
};

export const SCENARIO_NAMES = ['throughput', 'download', 'connect', 'keepalive', 'idle', 'tls', 'flood'];
/** What runs without --only: flood takes about 3 minutes on its own, so it runs when asked for. */
export const DEFAULT_SCENARIO_NAMES = SCENARIO_NAMES.filter((name) => name !== 'flood');

/** Contenders in the order of repetition `rep`: rotated by one each time. */
function rotated(list, rep) {
  const shift = rep % list.length;
  return [...list.slice(shift), ...list.slice(0, shift)];
}

/**
 * Runs one rate scenario for every contender. Returns per-contender run records; a contender that
 * fails stops being measured in this scenario and carries the error instead.
 * @param {any} ctx
 * @param {RateScenario} scenario
 * @param {string[]} contenderNames
 * @param {{ runs: number, duration: number, warmup: number, log: (line: string) => void }} options
 */
export async function runRateScenario(ctx, scenario, contenderNames, { runs, duration, warmup, log }) {
  const backend = await scenario.startBackend(ctx);
  /** @type {Map<string, { runs: any[], error: string | null }>} */
  const results = new Map(contenderNames.map((name) => [name, { runs: [], error: null }]));
  const live = new Map();
  try {
    for (const name of contenderNames) {
      try {
        live.set(name, await startContender(ctx, name, { backendPort: backend.port, routeBySni: scenario.routeBySni }));
      } catch (err) {
        fail(name, err);
      }
    }
    if (warmup > 0) {
      for (const [name, contender] of live) {
        try {
          await scenario.load(ctx, contender.port, warmup);
        } catch (err) {
          fail(name, err);
        }
        await sleep(PAUSE_BETWEEN_RUNS_MS);
      }
    }
    for (let rep = 0; rep < runs; rep++) {
      for (const name of rotated(contenderNames, rep)) {
        const contender = live.get(name);
        if (!contender) continue;
        try {
          const run = await meterProxy(contender, () => scenario.load(ctx, contender.port, duration));
          results.get(name)?.runs.push(run);
          log(`  [${scenario.name} ${rep + 1}/${runs}] ${name.padEnd(10)} ${describeRun(scenario, run)}`);
        } catch (err) {
          fail(name, err);
        }
        await sleep(PAUSE_BETWEEN_RUNS_MS);
      }
    }
  } finally {
    await Promise.all([...live.values()].map((contender) => contender.child && stopChild(contender.child)));
    await stopChild(backend.child);
  }
  return { backend: backend.kind, results };

  function fail(name, err) {
    const entry = results.get(name);
    if (entry && !entry.error) entry.error = String(err?.message ?? err);
    const child = live.get(name)?.child;
    // Stopped in the background: the other contenders go on measuring meanwhile.
    if (child) void stopChild(child);
    live.delete(name);
    log(`  [${scenario.name}] ${name}: FAILED: ${entry?.error}`);
  }
}

function describeRun(scenario, run) {
  const rate = `${formatNumber(run.rate)} ${scenario.rateUnit}`;
  if (!run.proxy) return rate + (run.errors ? `  errors ${run.errors}` : '');
  const cpu = (run.proxy.cpuSeconds / run.operations) * scenario.cpuScale;
  const busy = Math.round((run.proxy.cpuSeconds / run.proxy.wallSeconds) * 100);
  return `${rate}  proxy CPU ${formatNumber(cpu)} ${scenario.cpuUnit} (core ${busy}%)` + (run.errors ? `  errors ${run.errors}` : '');
}

/**
 * The idle scenario: for each size, `runs` fresh proxies per contender (direct has no proxy and is
 * left out), each holding `size` idle connections. Memory is the growth of the proxy's RSS.
 * @param {any} ctx
 * @param {string[]} contenderNames
 * @param {{ runs: number, sizes: number[], settleMs?: number, log: (line: string) => void }} options
 */
export async function runIdleScenario(ctx, contenderNames, { runs, sizes, settleMs = IDLE_SETTLE_MS, log }) {
  const names = contenderNames.filter((name) => name !== 'direct');
  const hold = await startHoldBackend(ctx);
  /** @type {Map<number, Map<string, { runs: any[], error: string | null }>>} */
  const bySize = new Map();
  try {
    for (const size of sizes) {
      const results = new Map(names.map((name) => [name, { runs: [], error: null }]));
      bySize.set(size, results);
      for (let rep = 0; rep < runs; rep++) {
        for (const name of rotated(names, rep)) {
          const entry = results.get(name);
          if (!entry || entry.error) continue;
          try {
            const run = await idleRun(ctx, hold, name, size, settleMs);
            entry.runs.push(run);
            log(
              `  [idle ${size} ${rep + 1}/${runs}] ${name.padEnd(10)} ${formatNumber(run.kbPerConnection)} KB/conn ` +
                `(RSS ${formatNumber(run.rssBeforeKb / 1024)} -> ${formatNumber(run.rssAfterKb / 1024)} MB, held ${run.held}/${size})`,
            );
          } catch (err) {
            entry.error = String(err?.message ?? err);
            log(`  [idle ${size}] ${name}: FAILED: ${entry.error}`);
          }
        }
      }
    }
  } finally {
    await stopChild(hold.child);
  }
  return { backend: hold.kind, bySize };
}

async function idleRun(ctx, hold, name, size, settleMs) {
  const contender = await startContender(ctx, name, { backendPort: hold.port, routeBySni: false });
  let client = null;
  try {
    await sleep(IDLE_SETTLE_MS);
    const pids = processTree(contender.child.pid);
    const before = sampleUsage(pids);
    // Normally 0; counted in case the previous run's connections have not all closed yet.
    const heldBefore = hold.held();

    let report = null;
    client = spawnChild('idle client', [...ctx.machine.loadPrefix, process.execPath, join(SCRIPTS_DIR, 'idle-client.mjs'), '--port', String(contender.port), '--count', String(size)], {
      stdin: 'pipe',
      onLine: (line) => {
        if (line.startsWith('{"opened"')) report = JSON.parse(line);
      },
    });
    const allHeld = await hold.waitUntil((held) => held - heldBefore >= size, IDLE_OPEN_TIMEOUT_MS);
    if (!allHeld) {
      throw new Error(`backend holds ${hold.held() - heldBefore} of ${size} connections after ${IDLE_OPEN_TIMEOUT_MS} ms (client: ${JSON.stringify(report)})`);
    }
    await sleep(settleMs);
    const after = sampleUsage(pids);
    if (!contender.child.isRunning()) throw new Error(`${name} exited: ${failureOutput(contender.child)}`);
    return {
      kbPerConnection: (after.rssKb - before.rssKb) / size,
      rssBeforeKb: before.rssKb,
      rssAfterKb: after.rssKb,
      cpuSeconds: after.cpuSeconds - before.cpuSeconds,
      held: hold.held() - heldBefore,
      clientReport: report,
    };
  } finally {
    if (client) {
      client.stdin?.end();
      await stopChild(client);
    }
    await stopChild(contender.child);
    // The next run starts from an empty backend.
    await hold.waitUntil((held) => held === 0, IDLE_DRAIN_TIMEOUT_MS);
  }
}
