// npm run bench: the same load against direct, smartproxy, haproxy, nginx stream and a naive
// Node pipe proxy, side by side. The proxy under test runs alone on core 0; backends and load
// generators share the other cores. Each run is repeated with the contenders in a rotated order
// and the tables show medians, the ratio to direct and the run-to-run spread.
//
// Needs (Debian/Ubuntu): apt-get install -y haproxy nginx libnginx-mod-stream wrk iperf3 openssl
// Whatever is missing is skipped with a visible line. Run as a user that may raise its own
// file-descriptor limit (prlimit) for the idle scenario, e.g. root.
import { mkdtempSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { describeMachine, INSTALL_LINE, pinSelf, placement } from './bench/machine.mjs';
import { removeOnExit, runToCompletion, stopAllChildren } from './bench/processes.mjs';
import { describeFlood, floodRunEstimateSeconds, runFloodScenario } from './bench/flood-scenario.mjs';
import { CONTENDER_NAMES, GOVERNED_CONTENDER_NAMES, PROJECT_NODE, describeContender, parseVariant, whyUnavailable } from './bench/proxies.mjs';
import { printFloodSummary, printScaling, printSummary, summarizeFlood, summarizeIdle, summarizeRate } from './bench/report.mjs';
import { DEFAULT_SCENARIO_NAMES, RATE_SCENARIOS, SCENARIO_NAMES, runIdleScenario, runRateScenario } from './bench/scenarios.mjs';

const REPO_ROOT = new URL('../', import.meta.url).pathname;
const BUILD_TIMEOUT_MS = 120000;
/** Rough cost of one idle run (start proxy, open, settle, close); only for the time budget. */
const IDLE_RUN_ESTIMATE_S = 15;
/** Above this share of CPU time in use before we start, something else competes for the cores. */
const BUSY_MACHINE_FRACTION = 0.1;

const USAGE = `usage: npm run bench -- [options]

  --runs N              repetitions of every run (default 3)
  --duration S          seconds per run (default 5)
  --warmup S            seconds of unmeasured load per contender before a scenario (default 2; 0 = off)
  --only LIST           scenarios, comma-separated: ${SCENARIO_NAMES.join(',')}
                        (default all but flood; \`--only flood\` runs the flood scenario, ~3 min:
                        smartproxy and haproxy under a connection flood, phases of max(duration, 12) s)
  --proxies LIST        contenders: ${CONTENDER_NAMES.join(',')} (default all)
  --idle-conns LIST     idle connection counts (default 5000,9000)
  --idle-settle S       seconds between opening the idle connections and sampling RSS (default 1;
                        25 lets V8's memory reducer collect the garbage of opening them)
  --json FILE           also write every raw run to FILE
  --threads N           smartproxy [process] threads = N, haproxy nbthread N, nginx worker_processes N
                        (default 1). The proxy is pinned to min(N, cores - 1) cores, the load to the rest
  --scaling LIST        also run the rate scenarios once per k in LIST (e.g. 1,2,4) with threads = k and
                        the proxy on k cores, and print a scaling table; k must leave a core for the load
  --variant NAME=SPEC   another smartproxy contender in the same run (repeatable); SPEC is comma-separated
                        node=PATH (default: node_modules/.bin/node), entry=PATH (another build's
                        dist/smartproxy.js), flags=FLAGS (node command line), env.VAR=VALUE, and
                        no-threads-key (a build before [process] threads), health=INTERVAL (an active
                        TCP health check of the backend every INTERVAL), per-ip (per-client limits set
                        too high to refuse: their code runs on every admission) and cluster (per-ip, shared
                        through a loopback redis-server the bench starts: [cluster]). Variants run in the flood
                        scenario too (a cluster variant with the flood's limits shared through the store)
  --node-flags="FLAGS"  Node/V8 flags on smartproxy's command line (default none; A/B runs). They reach
                        every thread, except the heap flags the daemon sets itself before it starts its
                        threads (src/event-loops.ts THREAD_V8_FLAGS), which win there
  --no-build            do not run \`npm run build\` before starting smartproxy

Tools: ${INSTALL_LINE}`;

function parseOptions() {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      duration: { type: 'string', default: '5' },
      warmup: { type: 'string', default: '2' },
      only: { type: 'string' },
      proxies: { type: 'string' },
      'idle-conns': { type: 'string', default: '5000,9000' },
      'idle-settle': { type: 'string', default: '1' },
      json: { type: 'string' },
      'no-build': { type: 'boolean', default: false },
      'node-flags': { type: 'string' },
      threads: { type: 'string', default: '1' },
      scaling: { type: 'string' },
      variant: { type: 'string', multiple: true, default: [] },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const list = (text, allowed, what) => {
    const items = text.split(',').map((item) => item.trim()).filter(Boolean);
    const unknown = items.filter((item) => !allowed.includes(item));
    if (unknown.length) throw new UsageError(`unknown ${what}: ${unknown.join(', ')} (known: ${allowed.join(', ')})`);
    return items;
  };
  const positive = (text, what, { allowZero = false } = {}) => {
    const n = Number(text);
    if (!Number.isInteger(n) || n < (allowZero ? 0 : 1)) throw new UsageError(`${what} must be a ${allowZero ? 'non-negative' : 'positive'} integer (got ${text})`);
    return n;
  };
  const variants = new Map();
  for (const text of values.variant) {
    try {
      const [name, runtime] = parseVariant(text);
      if (variants.has(name)) throw new Error(`--variant ${name} given twice`);
      variants.set(name, runtime);
    } catch (err) {
      throw new UsageError(err.message);
    }
  }
  const contenderNames = [...CONTENDER_NAMES, ...variants.keys()];
  return {
    runs: positive(values.runs, '--runs'),
    duration: positive(values.duration, '--duration'),
    warmup: positive(values.warmup, '--warmup', { allowZero: true }),
    // Always in the canonical order, whatever order --only lists them in.
    scenarios: values.only ? SCENARIO_NAMES.filter((name) => list(values.only, SCENARIO_NAMES, 'scenario').includes(name)) : DEFAULT_SCENARIO_NAMES,
    contenders: values.proxies ? list(values.proxies, contenderNames, 'contender') : contenderNames,
    variants,
    threads: positive(values.threads, '--threads'),
    scaling: values.scaling ? [...new Set(values.scaling.split(',').map((n) => positive(n.trim(), '--scaling')))].sort((a, b) => a - b) : null,
    idleSizes: values['idle-conns'].split(',').map((n) => positive(n, '--idle-conns')),
    idleSettleSeconds: positive(values['idle-settle'], '--idle-settle', { allowZero: true }),
    json: values.json ?? null,
    build: !values['no-build'],
    nodeFlags: values['node-flags'] === undefined ? null : values['node-flags'].split(/\s+/).filter(Boolean),
  };
}

class UsageError extends Error {}

const log = (line) => process.stderr.write(line + '\n');
const out = (line) => process.stdout.write(line + '\n');

/** Builds smartproxy when its sources exist. Returns why it cannot run, or null. */
async function prepareSmartproxy(options) {
  if (!existsSync(join(REPO_ROOT, 'src/cli.ts'))) return 'src/cli.ts does not exist yet';
  if (!options.build) return null;
  log('building smartproxy (npm run build)...');
  try {
    await runToCompletion('npm run build', ['npm', 'run', 'build', '--silent'], BUILD_TIMEOUT_MS, { cwd: REPO_ROOT });
    return null;
  } catch (err) {
    return `npm run build failed: ${String(err.message).split('\n').slice(0, 3).join(' ')}`;
  }
}

function describePinning(machine) {
  if (!machine.pinned) return 'pinning: OFF (needs >= 2 cores and taskset); proxy and load share the cores, CPU figures are noisier';
  const shared = machine.threads > machine.proxyCoreCount ? ` (${machine.threads} threads share ${machine.proxyCoreCount} core(s): one core stays with the load)` : '';
  return `pinning: proxy under test on core(s) ${machine.proxyCores}${shared}; backends and load generators on core(s) ${machine.loadCores}`;
}

/**
 * The k of --scaling that fit this machine (the proxy on k cores, at least one core left for the
 * load) and the rate scenarios they run.
 */
function scalingPlan(options, machine, scenarios) {
  if (!options.scaling) return { ks: [], skipped: [], scenarios: [] };
  const fits = (k) => machine.pinned && k <= machine.cores - 1;
  const ks = options.scaling.filter(fits);
  const skipped = options.scaling.filter((k) => !fits(k));
  out(
    `scaling: k = ${ks.join(', ') || 'none'}` +
      (skipped.length ? `; k = ${skipped.join(', ')} SKIPPED (this machine has ${machine.cores} cores${machine.pinned ? '' : ' and no pinning'}: the proxy on k cores needs k + 1)` : ''),
  );
  return { ks, skipped, scenarios: ks.length ? scenarios.filter((name) => RATE_SCENARIOS[name]) : [] };
}

/** Seconds the whole plan should take; the watchdog allows twice that plus slack. */
function estimateSeconds(options, scenarios, contenders) {
  const contenderCount = contenders.length;
  let seconds = 0;
  for (const name of scenarios) {
    if (name === 'idle') seconds += options.idleSizes.length * options.runs * contenderCount * (IDLE_RUN_ESTIMATE_S + options.idleSettleSeconds);
    else if (name === 'flood') seconds += floodContenders(contenders, options.variants).length * options.runs * floodRunEstimateSeconds(options.duration, options.warmup);
    else seconds += contenderCount * (options.warmup + options.runs * (options.duration + 1.5)) + 5;
  }
  return seconds;
}

/** The contenders the flood scenario runs: those that limit per client (every smartproxy variant too). */
function floodContenders(contenders, variants) {
  return contenders.filter((name) => GOVERNED_CONTENDER_NAMES.includes(name) || variants.has(name));
}

/** Share of all cores' time spent not idle over one second, from /proc/stat. */
async function machineBusyFraction() {
  const read = () => {
    const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    const idle = fields[3] + (fields[4] ?? 0); // idle + iowait
    return { idle, total: fields.reduce((sum, n) => sum + n, 0) };
  };
  const before = read();
  await sleep(1000);
  const after = read();
  const total = after.total - before.total;
  return total > 0 ? 1 - (after.idle - before.idle) / total : 0;
}

async function main() {
  const options = parseOptions();
  const machine = describeMachine({ threads: options.threads });
  pinSelf(machine);
  const tmpDir = mkdtempSync(join(tmpdir(), 'smartproxy-bench-'));
  removeOnExit(tmpDir);
  const ctx = { machine, tmpDir, smartproxySkip: null, smartproxyNodeFlags: options.nodeFlags, variants: options.variants };

  out('smartproxy benchmark');
  out(`machine: ${machine.cores} cores, ${machine.cpuModel}, kernel ${machine.kernel}`);
  out(
    `versions: node ${machine.versions.node} (bench), ${PROJECT_NODE} for smartproxy and node-pipe, haproxy ${machine.versions.haproxy ?? '-'}, nginx ${machine.versions.nginx ?? '-'}, ` +
      `wrk ${machine.versions.wrk ?? '-'}, iperf3 ${machine.versions.iperf3 ?? '-'}, openssl ${machine.versions.openssl ?? '-'}`,
  );
  out(`threads: ${options.threads} (smartproxy [process] threads, haproxy nbthread, nginx worker_processes)`);
  out(describePinning(machine));
  out(
    machine.fdLimit >= machine.wantedFdLimit
      ? `fd limit: ${machine.fdLimit} for every child`
      : `fd limit: ${machine.fdLimit} for every child (raising to ${machine.wantedFdLimit} was refused here); ` +
          `a proxy holds 2 per idle connection, so at most ~${Math.floor((machine.fdLimit - 200) / 2)} idle connections fit`,
  );
  out(`runs: ${options.runs} x ${options.duration}s per contender and scenario, warmup ${options.warmup}s, rotated order`);
  const busyBefore = await machineBusyFraction();
  out(
    busyBefore > BUSY_MACHINE_FRACTION
      ? `WARNING: the cores were ${Math.round(busyBefore * 100)}% busy before start: other processes compete, expect noisy figures`
      : `cores busy before start: ${Math.round(busyBefore * 100)}%`,
  );
  const missing = Object.entries(machine.tools).filter(([, path]) => !path).map(([tool]) => tool);
  if (missing.length) out(`missing tools: ${missing.join(', ')} (install: ${INSTALL_LINE})`);

  if (options.contenders.includes('smartproxy')) ctx.smartproxySkip = await prepareSmartproxy(options);
  const contenders = [];
  out('contenders:');
  for (const name of options.contenders) {
    const why = whyUnavailable(ctx, name);
    if (why) out(`  ${name.padEnd(10)} SKIPPED: ${why}`);
    else {
      contenders.push(name);
      out(`  ${name.padEnd(10)} ${describeContender(ctx, name)}`);
    }
  }

  const scenarios = [];
  for (const name of options.scenarios) {
    const needs = name === 'idle' || name === 'flood' ? [] : RATE_SCENARIOS[name].tools;
    const absent = needs.filter((tool) => !machine.tools[tool]);
    if (absent.length) out(`scenario ${name}: SKIPPED (${absent.join(', ')} not installed)`);
    else scenarios.push(name);
  }

  const scaling = scalingPlan(options, machine, scenarios);
  const estimate = estimateSeconds(options, scenarios, contenders) + scaling.ks.length * estimateSeconds(options, scaling.scenarios, contenders);
  const budgetSeconds = estimate * 2 + 120;
  out(`time budget: about ${Math.ceil(estimate / 60)} min (hard stop after ${Math.ceil(budgetSeconds / 60)} min)`);
  const watchdog = setTimeout(() => abort(`time budget of ${budgetSeconds} s exceeded`), budgetSeconds * 1000);

  const rateSections = [];
  const idleSections = [];
  let floodSection = null;
  const raw = { machine, options, scenarios: {} };
  for (const name of scenarios) {
    if (name === 'flood') {
      const governed = floodContenders(contenders, options.variants);
      const what = describeFlood(options.duration);
      if (!governed.length) {
        out(`scenario flood: SKIPPED (it runs ${GOVERNED_CONTENDER_NAMES.join(' and ')}, the contenders with per-client limits; none is available)`);
        continue;
      }
      log(`scenario flood: ${what}`);
      const { backend, results } = await runFloodScenario(ctx, governed, { runs: options.runs, duration: options.duration, warmup: options.warmup, log });
      raw.scenarios.flood = { what, backend, results: Object.fromEntries(results) };
      floodSection = { what, backend, rows: summarizeFlood(results) };
    } else if (name === 'idle') {
      const sizes = options.idleSizes;
      log(`scenario idle (${sizes.join(', ')} connections; direct has no proxy memory and is left out)`);
      const { backend, bySize } = await runIdleScenario(ctx, contenders, { runs: options.runs, sizes, settleMs: options.idleSettleSeconds * 1000, log });
      raw.scenarios.idle = { backend, bySize: Object.fromEntries([...bySize].map(([size, results]) => [size, Object.fromEntries(results)])) };
      for (const [size, results] of bySize) idleSections.push({ size, rows: summarizeIdle(results) });
    } else {
      const scenario = RATE_SCENARIOS[name];
      log(`scenario ${name}: ${scenario.what}`);
      const { backend, results } = await runRateScenario(ctx, scenario, contenders, { runs: options.runs, duration: options.duration, warmup: options.warmup, log });
      log(`  backend: ${backend}`);
      raw.scenarios[name] = { what: scenario.what, backend, results: Object.fromEntries(results) };
      rateSections.push({ scenario, rows: summarizeRate(scenario, results) });
    }
  }
  const scalingSections = [];
  for (const k of scaling.ks) {
    Object.assign(machine, placement(machine, k));
    pinSelf(machine);
    log(`scaling k = ${k}: ${describePinning(machine)}`);
    for (const name of scaling.scenarios) {
      const scenario = RATE_SCENARIOS[name];
      log(`scenario ${name} (k = ${k}): ${scenario.what}`);
      const { results } = await runRateScenario(ctx, scenario, contenders, { runs: options.runs, duration: options.duration, warmup: options.warmup, log });
      (raw.scaling ??= {})[`${name}@${k}`] = Object.fromEntries(results);
      scalingSections.push({ k, scenario, rows: summarizeRate(scenario, results) });
    }
  }
  clearTimeout(watchdog);
  raw.machineBusyBefore = busyBefore;

  printSummary(rateSections, idleSections, out);
  if (floodSection) printFloodSummary(floodSection, out);
  if (options.scaling) printScaling(scalingSections, scaling.skipped, machine.cores, out);
  if (options.json) {
    raw.summary = { rates: rateSections.map(({ scenario, rows }) => ({ scenario: scenario.name, rows })), idle: idleSections, flood: floodSection?.rows ?? null };
    writeFileSync(options.json, JSON.stringify(raw, null, 2) + '\n');
    out(`\nraw results: ${options.json}`);
  }
  await stopAllChildren();
}

let aborting = false;
async function abort(why, exitCode = 1) {
  if (aborting) return;
  aborting = true;
  log(`\nbench: ${why}; stopping every child process`);
  await stopAllChildren();
  process.exit(exitCode);
}

process.on('SIGINT', () => abort('interrupted', 130));
process.on('SIGTERM', () => abort('terminated', 143));
process.on('uncaughtException', (err) => abort(`uncaught exception: ${err.stack ?? err}`));
process.on('unhandledRejection', (err) => abort(`unhandled rejection: ${err?.stack ?? err}`));

main().catch((err) => {
  if (err instanceof UsageError) {
    console.error(`bench: ${err.message}\n\n${USAGE}`);
    process.exit(2);
  }
  abort(err?.stack ?? String(err));
});
