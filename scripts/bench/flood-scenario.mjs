// The flood scenario (issue 5): one attacker address holds as many idle connections as it can
// and re-opens every refused one at once, while a legitimate address makes short round trips.
// Each run starts a fresh proxy (so its RSS starts from the same point), warms it up, measures the
// legitimate client alone (baseline), then again during the attack.
//
// Timeline of one run:
//   start proxy -> legit warmup -> legit baseline (phase) -> attacker starts -> ramp
//     -> legit under attack (phase) -> read counters -> attacker stops -> proxy stops
// The attack window, over which the proxy's CPU and log lines are counted, runs from the
// attacker's start to the end of the legitimate phase; the backend's counts are read at its end,
// before the attacker lets go of what it holds.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { startHoldBackend } from './backends.mjs';
import { failureOutput, processTree, runToCompletion, sampleUsage, spawnChild, stopChild } from './processes.mjs';
import { startContender } from './proxies.mjs';
import { formatCount, formatNumber } from './report.mjs';

const SCRIPTS_DIR = new URL('.', import.meta.url).pathname;

/**
 * The limits under test, the same for every contender. The attacker is refused by
 * max_connections_per_ip (it holds 50, every further attempt is refused); the rate limit stays
 * above the legitimate client's 100/s and does not fire for the attacker, because a refused
 * attempt consumes no quota and its 50 held connections never close. fair_share_above cannot fire
 * either: occupancy stays near 50 of 1,100. They are on so that their checks cost what they cost.
 * @type {import('./proxies.mjs').FloodLimits}
 */
export const FLOOD_LIMITS = {
  workers: 1000,
  queue: 100,
  queueTimeout: '2s',
  maxConnectionsPerIp: 50,
  ratePerIp: { count: 200, per: '1s', perSeconds: 1 },
  fairShareAbove: 80,
  rejectionSummaryInterval: '10s',
};
const ATTACKER_SOURCE = '127.0.0.2';
const LEGIT_SOURCE = '127.0.0.3';
/** Connections the attacker keeps in flight; each needs one descriptor in the attacker. */
const ATTACKER_CONNECTIONS = 3000;
/** Round trips per second of the legitimate client: half the per-client rate limit. */
const LEGIT_RATE = 100;
/** Each phase lasts at least this long, so the attack spans one rejection summary interval. */
export const FLOOD_MIN_PHASE_S = 12;
/** From the attacker's start to the legitimate client's: the flood reaches full strength. */
const ATTACK_RAMP_MS = 1000;
/** The hold server reports its counts every 100 ms; wait this long before reading them. */
const BACKEND_REPORT_LAG_MS = 300;
const RSS_SAMPLE_MS = 250;
const SETTLE_MS = 500;
/** A child overrunning its own duration by this much is stopped and the run fails. */
const OVERRUN_MS = 30000;
/** At most this many of the proxy's log lines of the attack window are kept for the report. */
const KEPT_LOG_LINES = 10;

/** Seconds per phase for a bench `--duration`. */
export function floodPhaseSeconds(duration) {
  return Math.max(duration, FLOOD_MIN_PHASE_S);
}

/** Rough seconds of one run, for the time budget. */
export function floodRunEstimateSeconds(duration, warmup) {
  return warmup + 2 * floodPhaseSeconds(duration) + ATTACK_RAMP_MS / 1000 + 4;
}

/** One line for the report. */
export function describeFlood(duration) {
  const l = FLOOD_LIMITS;
  return (
    `attacker ${ATTACKER_SOURCE} keeps ${formatNumber(ATTACKER_CONNECTIONS)} idle connects in flight, re-opening each refused one at once; ` +
    `legitimate ${LEGIT_SOURCE} makes ${LEGIT_RATE} echo round trips/s, one connection each; ${floodPhaseSeconds(duration)} s per phase. ` +
    `Limits: workers ${l.workers}, queue ${l.queue} (${l.queueTimeout}), max_connections_per_ip ${l.maxConnectionsPerIp}, ` +
    `connection_rate_per_ip ${l.ratePerIp.count}/${l.ratePerIp.per}, fair_share_above ${l.fairShareAbove}, ` +
    `rejection_summary_interval ${l.rejectionSummaryInterval}, reject = reset; smartproxy at --log-level info, ` +
    'haproxy logging to stdout (tcplog, dontlog-normal)'
  );
}

/**
 * Runs the flood scenario for every contender that can limit per client.
 * @param {any} ctx
 * @param {string[]} contenderNames
 * @param {{ runs: number, duration: number, warmup: number, log: (line: string) => void }} options
 */
export async function runFloodScenario(ctx, contenderNames, { runs, duration, warmup, log }) {
  const backend = await startHoldBackend(ctx, { echo: true });
  const phaseSeconds = floodPhaseSeconds(duration);
  /** @type {Map<string, { runs: any[], error: string | null }>} */
  const results = new Map(contenderNames.map((name) => [name, { runs: [], error: null }]));
  try {
    for (let rep = 0; rep < runs; rep++) {
      // Rotated, as in the other scenarios: no contender always runs first.
      const shift = rep % contenderNames.length;
      for (const name of [...contenderNames.slice(shift), ...contenderNames.slice(0, shift)]) {
        const entry = results.get(name);
        if (!entry || entry.error) continue;
        try {
          const run = await floodRun(ctx, backend, name, { phaseSeconds, warmup });
          entry.runs.push(run);
          log(`  [flood ${rep + 1}/${runs}] ${name.padEnd(10)} ${describeFloodRun(run)}`);
        } catch (err) {
          entry.error = String(err?.message ?? err);
          log(`  [flood] ${name}: FAILED: ${entry.error}`);
        }
      }
    }
  } finally {
    await stopChild(backend.child);
  }
  return { backend: backend.kind, results };
}

function describeFloodRun(run) {
  const { baseline, attack } = run;
  const refusals = run.proxyRejections
    ? ` (proxy: ${Object.entries(run.proxyRejections).map(([reason, n]) => `${reason} ${formatNumber(n)}`).join(', ') || 'none'})`
    : '';
  return (
    `legit ok ${attack.ok}/${attack.attempts}, p99 ${formatNumber(baseline.p99Ms)} -> ${formatNumber(attack.p99Ms)} ms, >= 1 s ${attack.slow}; ` +
    `attacker refused ${formatCount(run.attacker.refused)}${refusals}, held ${run.backendHeld}, kernel listen drops ${formatCount(run.listenDrops)}; ` +
    `core ${Math.round(run.attackCoreBusyPct)}%, RSS ${formatNumber(run.rssBeforeKb / 1024)} -> peak ${formatNumber(run.rssPeakKb / 1024)} MB, ` +
    `log lines ${run.logLines}`
  );
}

async function floodRun(ctx, backend, name, { phaseSeconds, warmup }) {
  const contender = await startContender(ctx, name, { backendPort: backend.port, routeBySni: false, limits: FLOOD_LIMITS });
  const proxy = /** @type {import('./processes.mjs').Child} */ (contender.child);
  let attacker = null;
  try {
    const pids = processTree(proxy.pid);
    if (warmup > 0) await runLegit(ctx, contender.port, warmup);
    const beforeBaseline = sampleUsage(pids);
    const baselineStart = performance.now();
    const baseline = await runLegit(ctx, contender.port, phaseSeconds);
    const baselineWall = (performance.now() - baselineStart) / 1000;
    const afterBaseline = sampleUsage(pids);
    await sleep(SETTLE_MS);

    const before = sampleUsage(pids);
    const listenDropsBefore = readListenDrops();
    const acceptedBefore = backend.accepted();
    const rejectionsBefore = await readRejections(contender.adminPort);
    const linesBefore = proxy.linesWritten();
    const attackStart = performance.now();
    let attackerReport = null;
    // Niced: on the shared load core the attacker yields to the legitimate client and the backend,
    // so their latency is the proxy's doing, not the attacker's competition for the same core.
    attacker = spawnChild(
      'flood attacker',
      [
        'nice', '-n', '10', ...ctx.machine.loadPrefix, process.execPath, join(SCRIPTS_DIR, 'flood-attacker.mjs'),
        '--port', String(contender.port),
        '--count', String(ATTACKER_CONNECTIONS),
        '--source', ATTACKER_SOURCE,
        '--duration', String(phaseSeconds + ATTACK_RAMP_MS / 1000 + OVERRUN_MS / 1000),
      ],
      {
        stdin: 'pipe',
        onLine: (line) => {
          if (line.startsWith('{')) attackerReport = JSON.parse(line);
        },
      },
    );
    let rssPeakKb = before.rssKb;
    const rssSampler = setInterval(() => {
      rssPeakKb = Math.max(rssPeakKb, sampleUsage(pids).rssKb);
    }, RSS_SAMPLE_MS);
    let attack;
    try {
      await sleep(ATTACK_RAMP_MS);
      if (!attacker.isRunning()) throw new Error(`the attacker exited early: ${failureOutput(attacker)}`);
      attack = await runLegit(ctx, contender.port, phaseSeconds);
      await sleep(BACKEND_REPORT_LAG_MS);
    } finally {
      clearInterval(rssSampler);
    }
    const after = sampleUsage(pids);
    const listenDrops = readListenDrops() - listenDropsBefore;
    const attackWall = (performance.now() - attackStart) / 1000;
    const backendHeld = backend.held();
    const backendAccepted = backend.accepted() - acceptedBefore;
    const rejectionsAfter = await readRejections(contender.adminPort);
    const logLines = proxy.linesWritten() - linesBefore;
    const loggedText = logLines > 0 ? proxy.output().split('\n').slice(-Math.min(logLines, KEPT_LOG_LINES)) : [];
    if (!proxy.isRunning()) throw new Error(`${name} exited during the attack: ${failureOutput(proxy)}`);

    attacker.stdin?.end();
    await Promise.race([attacker.exited, sleep(OVERRUN_MS)]);
    if (!attackerReport) throw new Error(`the attacker printed no report: ${failureOutput(attacker)}`);
    const attackerResult = /** @type {any} */ (attackerReport);

    const baselineCpu = afterBaseline.cpuSeconds - beforeBaseline.cpuSeconds;
    const attackCpu = after.cpuSeconds - before.cpuSeconds;
    // What the refusals cost: the attack window's CPU less what the legitimate load alone
    // took per second in the baseline.
    const extraCpu = attackCpu - (baselineCpu / baselineWall) * attackWall;
    return {
      baseline,
      attack,
      attacker: attackerResult,
      backendHeld,
      backendAccepted,
      listenDrops,
      proxyRejections: rejectionsAfter && rejectionsBefore ? subtractCounts(rejectionsAfter, rejectionsBefore) : null,
      baselineCoreBusyPct: (baselineCpu / baselineWall) * 100,
      attackCoreBusyPct: (attackCpu / attackWall) * 100,
      cpuPerRefusedUs: attackerResult.refused > 0 ? (extraCpu / attackerResult.refused) * 1e6 : null,
      rssBeforeKb: before.rssKb,
      rssPeakKb,
      rssAfterKb: after.rssKb,
      logLines,
      loggedText,
      attackSeconds: attackWall,
    };
  } finally {
    if (attacker) {
      attacker.stdin?.end();
      await stopChild(attacker);
    }
    await stopChild(proxy);
    // The next run starts from an empty backend.
    await backend.waitUntil((held) => held === 0, OVERRUN_MS);
  }
}

/**
 * Connection attempts the kernel dropped because a listen queue was full (TcpExt ListenDrops in
 * /proc/net/netstat): the SYNs or handshake ACKs that never reached the proxy. A dropped SYN is
 * retried after 1 s, then 2 s, which is what a legitimate client sees as a 1 s or 3 s connect.
 * The counter covers the whole network namespace; during a run our proxy's port is the one
 * being flooded.
 */
function readListenDrops() {
  const lines = readFileSync('/proc/net/netstat', 'utf8').split('\n').filter((line) => line.startsWith('TcpExt:'));
  if (lines.length < 2) return NaN;
  const names = lines[0].split(/\s+/);
  const values = lines[1].split(/\s+/);
  return Number(values[names.indexOf('ListenDrops')]);
}

/** The legitimate client for `seconds`; its JSON report. */
async function runLegit(ctx, port, seconds) {
  const argv = [
    ...ctx.machine.loadPrefix, process.execPath, join(SCRIPTS_DIR, 'flood-legit.mjs'),
    '--port', String(port),
    '--rate', String(LEGIT_RATE),
    '--duration', String(seconds),
    '--source', LEGIT_SOURCE,
  ];
  const out = await runToCompletion('legit client', argv, seconds * 1000 + OVERRUN_MS);
  return JSON.parse(out.trim().split('\n').pop() ?? '{}');
}

/**
 * smartproxy's own count of refusals by reason, from its admin API's metrics, or null without
 * an admin API (haproxy).
 * @param {number | null} adminPort
 */
async function readRejections(adminPort) {
  if (adminPort === null) return null;
  const text = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`, { signal: AbortSignal.timeout(5000) })).text();
  /** @type {Record<string, number>} */
  const counts = {};
  for (const match of text.matchAll(/^smartproxy_rejections_total\{[^}]*reason="([a-z_]+)"[^}]*\} (\d+)/gm)) {
    counts[match[1]] = (counts[match[1]] ?? 0) + Number(match[2]);
  }
  return counts;
}

/** after - before, per key, leaving out keys that did not change. */
function subtractCounts(after, before) {
  return Object.fromEntries(
    Object.entries(after)
      .map(([key, n]) => [key, n - (before[key] ?? 0)])
      .filter(([, n]) => n !== 0),
  );
}
