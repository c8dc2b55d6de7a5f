// npm run fuzz -- [--seed N] [--minutes M | --count K] [--budget MS] [--flood P] [--no-moves] [--slack MS] [--plan FILE]
//
// Runs the adversarial layer (test/support/adversary.ts) locally: seeds N, N+1, ... each against
// a fresh daemon, until M minutes have passed (default 5) or K seeds have run. Every failing seed
// is printed with its invariants, the daemon's last log lines and its replayable plan (also saved
// as JSON under the system temp directory); the exit code is 1 if any seed failed.
// --plan FILE replays a saved (possibly hand-trimmed) plan instead of generating one; --no-moves
// generates reloads that never hand an address straight from one listener to another.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Cleanups, formatFailure, generatePlan, planToJson, runPlan, type Plan } from '../test/support/adversary.ts';

const { values } = parseArgs({
  options: {
    seed: { type: 'string' },
    minutes: { type: 'string' },
    count: { type: 'string' },
    budget: { type: 'string' },
    flood: { type: 'string' },
    slack: { type: 'string' },
    plan: { type: 'string' },
    'no-moves': { type: 'boolean' },
    help: { type: 'boolean', short: 'h' },
  },
});

if (values.help) {
  process.stdout.write(readFileSync(new URL(import.meta.url), 'utf8').split('\n').slice(0, 9).map((l) => l.replace(/^\/\/ ?/, '')).join('\n') + '\n');
  process.exit(0);
}

const number = (text: string | undefined, fallback: number, name: string): number => {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isFinite(n) || n < 0) {
    process.stderr.write(`fuzz: --${name} wants a number, got ${JSON.stringify(text)}\n`);
    process.exit(2);
  }
  return n;
};

const firstSeed = number(values.seed, Math.floor(Date.now() / 1000) % 1_000_000, 'seed');
const minutes = number(values.minutes, 5, 'minutes');
const count = values.count === undefined ? Infinity : number(values.count, 1, 'count');
const budgetMs = number(values.budget, 4000, 'budget');
const floodChance = number(values.flood, 0.3, 'flood');
const slackMs = number(values.slack, 2000, 'slack');
const outDir = path.join(tmpdir(), 'smartproxy-fuzz');

// Ctrl-C (or SIGTERM) stops the daemon and backends of the seed in progress before exiting:
// they are child processes that would otherwise outlive this one.
let current: Cleanups | null = null;
let interrupted = false;
const onSignal = (signal: NodeJS.Signals): void => {
  if (interrupted) return;
  interrupted = true;
  process.stdout.write(`\n${signal}: stopping the daemon and backends of the seed in progress\n`);
  void (current?.run() ?? Promise.resolve()).finally(() => process.exit(130));
};
process.on('SIGINT', onSignal);
process.on('SIGTERM', onSignal);

async function runOne(plan: Plan): Promise<boolean> {
  const scope = new Cleanups();
  current = scope;
  const started = Date.now();
  process.stdout.write(`seed ${plan.seed}: ${plan.steps.length} steps, ${plan.configs.length} config versions\n`);
  try {
    const result = await runPlan(scope, plan, { slackMs, progress: (line) => process.stdout.write(`${line}\n`) });
    const seconds = ((Date.now() - started) / 1000).toFixed(1);
    if (result.failures.length === 0) {
      process.stdout.write(`seed ${plan.seed}: ok in ${seconds} s; ${result.summary}\n`);
      return true;
    }
    mkdirSync(outDir, { recursive: true });
    const file = path.join(outDir, `seed-${plan.seed}.json`);
    writeFileSync(file, planToJson(plan));
    process.stdout.write(`\nseed ${plan.seed}: FAILED in ${seconds} s (plan saved to ${file})\n${formatFailure(plan, result)}\n`);
    return false;
  } finally {
    await scope.run();
    current = null;
  }
}

let failed = 0;
let ran = 0;
if (values.plan !== undefined) {
  const plan = JSON.parse(readFileSync(values.plan, 'utf8')) as Plan;
  if (!(await runOne(plan))) failed++;
  ran = 1;
} else {
  const stopAt = Date.now() + minutes * 60_000;
  for (let seed = firstSeed; ran < count && Date.now() < stopAt; seed++) {
    if (!(await runOne(generatePlan(seed, { budgetMs, floodChance, moveBinds: values['no-moves'] !== true })))) failed++;
    ran++;
  }
}
process.stdout.write(`\n${ran} seed(s) run, ${failed} failed${failed > 0 ? ` (plans in ${outDir})` : ''}\n`);
process.exit(failed > 0 ? 1 : 0);
