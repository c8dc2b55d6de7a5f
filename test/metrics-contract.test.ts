// The metrics contract an operator builds alerts on: every series an alert needs exists at 0 from
// start-up (and from the reload that adds a listener), capacity gauges follow the config, start-up
// is not a reload, the exposition passes `promtool check metrics` in-process and as a threaded
// daemon aggregates it, and the shipped alert rules and Grafana dashboard use only metrics that a
// real scrape carries. README's metrics table is checked against the same scrape.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import tls from 'node:tls';
import { startAdminServer } from '../src/admin/server.ts';
import { END_REASONS, REJECT_REASONS } from '../src/connection/reasons.ts';
import { Daemon } from '../src/daemon.ts';
import { Metrics } from '../src/metrics.ts';
import { adminGet, ROOT, startCli, assertCleanExit } from './support/cli.ts';
import { admission, echoRoundTrip } from './support/clients.ts';
import { closedPort, configFrom, memoryLogger, startBackend } from './support/harness.ts';
import { parseExposition, type Exposition, type Sample } from './support/metrics.ts';

const ALERTS = path.join(ROOT, 'config/prometheus/alerts.yml');
const ALERT_TESTS = path.join(ROOT, 'config/prometheus/alerts.test.yml');
const DASHBOARD = path.join(ROOT, 'config/grafana/smartproxy.json');

// ---- promtool ----

const HAVE_PROMTOOL = spawnSync('promtool', ['--version'], { encoding: 'utf8' }).status === 0;

/** True when promtool can run; else fails under CI and skips locally, saying how to get it. */
function needPromtool(t: TestContext): boolean {
  if (HAVE_PROMTOOL) return true;
  if (process.env.CI) throw new Error('promtool is not installed, and CI is set: .ci/run must install it (Debian package prometheus)');
  t.skip('promtool is not installed (`apt-get install prometheus` provides /usr/bin/promtool); CI installs it');
  return false;
}

function promtool(args: string[], input = ''): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('promtool', args, { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (output += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (output += c));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, output }));
    child.stdin.end(input);
  });
}

/**
 * `promtool check metrics` on a scrape: exit 0 and not a word of lint. Without promtool (and
 * not under CI) the rest of the calling test still runs; the check is reported as not done.
 */
async function assertPromtoolAccepts(t: TestContext, body: string, what: string): Promise<void> {
  if (!HAVE_PROMTOOL) {
    if (process.env.CI) throw new Error('promtool is not installed, and CI is set: .ci/run must install it (Debian package prometheus)');
    t.diagnostic(`promtool is not installed: ${what} was not checked (\`apt-get install prometheus\` provides /usr/bin/promtool)`);
    return;
  }
  const { code, output } = await promtool(['check', 'metrics'], body);
  assert.equal(output, '', `promtool check metrics on ${what} says:\n${output}`);
  assert.equal(code, 0, `promtool check metrics on ${what} exited ${code}`);
}

// ---- reading scrapes ----

/** The one sample with exactly these labels (not merely including them); fails when absent. */
function exact(samples: readonly Sample[], name: string, labels: Record<string, string> = {}): number {
  const want = JSON.stringify(Object.entries(labels).sort());
  const found = samples.filter((s) => s.name === name && JSON.stringify(Object.entries(s.labels).sort()) === want);
  assert.equal(found.length, 1, `${name}${JSON.stringify(labels)}: ${found.length} series`);
  return found[0]!.value;
}

function seriesOf(samples: readonly Sample[], name: string, labels: Record<string, string>): Sample[] {
  return samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
}

/** Every refusal and ending series of `listener` exists, each at `expected[reason] ?? 0`. */
function assertReasons(samples: readonly Sample[], listener: string, expected: { rejections?: Record<string, number>; closed?: Record<string, number> } = {}): void {
  for (const reason of REJECT_REASONS) {
    assert.equal(exact(samples, 'smartproxy_rejections_total', { listener, reason }), expected.rejections?.[reason] ?? 0, `rejections ${listener} ${reason}`);
  }
  for (const reason of [...REJECT_REASONS, ...END_REASONS]) {
    assert.equal(exact(samples, 'smartproxy_connections_closed_total', { listener, reason }), expected.closed?.[reason] ?? 0, `closed ${listener} ${reason}`);
  }
  assert.equal(seriesOf(samples, 'smartproxy_rejections_total', { listener }).length, REJECT_REASONS.length);
  assert.equal(seriesOf(samples, 'smartproxy_connections_closed_total', { listener }).length, REJECT_REASONS.length + END_REASONS.length);
}

/** Metric names a scrape answers to: every sample name (histogram _bucket/_sum/_count included) and every counter or gauge family. */
function namesIn(exposition: Exposition): Set<string> {
  const names = new Set(exposition.samples.map((s) => s.name));
  for (const [name, family] of exposition.families) if (family.type === 'counter' || family.type === 'gauge') names.add(name);
  return names;
}

// ---- metric names used by PromQL ----

const PROMQL_KEYWORDS = new Set(['and', 'or', 'unless', 'bool', 'offset', 'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'inf', 'nan']);

/**
 * The metric names a PromQL expression (or a Grafana query) selects: identifiers left once label
 * matchers, strings, ranges, Grafana variables, grouping clauses and function calls are removed.
 * Grafana's `label_values(metric, label)` counts its metric.
 */
function metricNamesOf(expr: string): string[] {
  let text = expr
    .replace(/label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*,\s*[a-zA-Z_]\w*\s*\)/g, ' $1 ')
    .replace(/label_values\(\s*[a-zA-Z_]\w*\s*\)/g, ' ')
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, ' ')
    .replace(/\{[^}]*\}/g, ' ')
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\$\{[^}]*\}|\$[a-zA-Z_]\w*/g, ' ')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ');
  text = text.replace(/\b[a-zA-Z_:][a-zA-Z0-9_:]*\s*\(/g, ' ('); // function and aggregation calls
  const names = (text.match(/(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*/g) ?? []).filter((word) => !PROMQL_KEYWORDS.has(word.toLowerCase()));
  return [...new Set(names)];
}

/** Every `expr:` of the rules file (each written on one line, one per rule). */
function ruleExpressions(): string[] {
  const text = readFileSync(ALERTS, 'utf8');
  const exprs = [...text.matchAll(/^\s+expr: (.+)$/gm)].map((m) => m[1]!.trim());
  assert.equal(exprs.length, [...text.matchAll(/^\s+- alert: /gm)].length, 'one single-line expr per alert');
  return exprs;
}

/** The series the rules' unit tests feed in: they must be named as a scrape names them too. */
function ruleTestSeries(): string[] {
  return [...readFileSync(ALERT_TESTS, 'utf8').matchAll(/^\s+- series: '([^']+)'$/gm)].map((m) => m[1]!);
}

/** Every query of the dashboard: panel targets and templating variables. */
function dashboardQueries(): string[] {
  const found: string[] = [];
  const walk = (node: unknown, key: string): void => {
    if (typeof node === 'string') {
      if (key === 'expr' || key === 'query' || key === 'definition') found.push(node);
      return;
    }
    if (Array.isArray(node)) for (const item of node) walk(item, key);
    else if (node !== null && typeof node === 'object') for (const [k, v] of Object.entries(node)) walk(v, k);
  };
  const dashboard = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as { templating: { list: Array<{ type: string }> } };
  walk({ ...dashboard, templating: { list: dashboard.templating.list.filter((v) => v.type === 'query') } }, '');
  return found;
}

// ---- daemons ----

function listenerToml(name: string, routes: string, extra = ''): string {
  return `
[[listeners]]
name = "${name}"
bind = ["127.0.0.1:0"]
${extra}
${routes}`;
}

function route(name: string, backendPort: number, match: string): string {
  return `
  [[listeners.routes]]
  name = "${name}"
  ${match}
  backends = ["127.0.0.1:${backendPort}"]
`;
}

/** An in-process daemon with Node's default metrics on (as in production) and its admin API. */
async function startInProcess(t: TestContext, toml: string): Promise<{ daemon: Daemon; scrape: () => Promise<string> }> {
  const { log } = memoryLogger('warn');
  const daemon = await Daemon.start(configFrom(toml), log, { metrics: new Metrics() });
  const admin = await startAdminServer({ kind: 'tcp', address: { host: '127.0.0.1', port: 0, text: '127.0.0.1:0' } }, daemon);
  t.after(async () => {
    await admin.close();
    await daemon.shutdown({ immediate: true });
  });
  const scrape = async (): Promise<string> => {
    const { status, body } = await adminGet({ port: admin.port }, '/metrics');
    assert.equal(status, 200);
    return body;
  };
  return { daemon, scrape };
}

/** Traffic that gives every family a sample: relayed, refused at accept, unrouted, backend down. */
async function someTraffic(daemon: Daemon): Promise<void> {
  assert.equal(await echoRoundTrip(daemon.portOf('tcp'), 'hello'), null);
  assert.equal(await admission(daemon.portOf('blocked')), 'reset');
  await admission(daemon.portOf('down')); // ended by the proxy however it ends: backend_unavailable is what is counted
  const unrouted = tls.connect({ port: daemon.portOf('tls'), host: '127.0.0.1', servername: 'unknown.example.net', rejectUnauthorized: false });
  unrouted.on('error', () => {});
  await new Promise((resolve) => unrouted.once('close', resolve));
  await daemon.registry.whenEmpty();
}

async function trafficDaemon(t: TestContext): Promise<{ daemon: Daemon; scrape: () => Promise<string> }> {
  const backend = await startBackend(t);
  const dead = await closedPort();
  return startInProcess(
    t,
    listenerToml('tcp', route('echo', backend.port, 'default = true')) +
      listenerToml('tls', route('api', backend.port, 'sni = ["api.example.com"]')) +
      listenerToml('blocked', route('echo', backend.port, 'default = true'), '  [listeners.firewall]\n  block = ["127.0.0.0/8"]') +
      listenerToml('down', route('nowhere', dead, 'default = true')),
  );
}

// ---- tests ----

test('every series an alert needs exists at 0 from start-up: refusals and endings per reason, active per route, capacity', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const { scrape } = await startInProcess(
    t,
    `
[limits]
max_connections = 50
max_tracked_ips = 1000
` +
      listenerToml('tcp', route('echo', backend.port, 'default = true'), 'workers = 8\nqueue = 4') +
      listenerToml('tls', route('api', backend.port, 'sni = ["api.example.com"]') + route('web', backend.port, 'sni = ["*.example.org"]'), 'workers = 3\nqueue = 0'),
  );
  const { samples } = parseExposition(await scrape());

  for (const listener of ['tcp', 'tls']) {
    assertReasons(samples, listener);
    assert.equal(exact(samples, 'smartproxy_connections_accepted_total', { listener }), 0);
    assert.equal(exact(samples, 'smartproxy_connections_active', { listener, route: '' }), 0);
    assert.equal(exact(samples, 'smartproxy_connection_duration_seconds_count', { listener }), 0);
    assert.equal(exact(samples, 'smartproxy_workers_busy', { listener }), 0);
    assert.equal(exact(samples, 'smartproxy_queue_depth', { listener }), 0);
  }
  for (const [listener, routeName] of [['tcp', 'echo'], ['tls', 'api'], ['tls', 'web']] as const) {
    assert.equal(exact(samples, 'smartproxy_connections_active', { listener, route: routeName }), 0);
    assert.equal(exact(samples, 'smartproxy_route_connections_total', { listener, route: routeName }), 0);
  }
  assert.equal(exact(samples, 'smartproxy_listener_workers', { listener: 'tcp' }), 8);
  assert.equal(exact(samples, 'smartproxy_listener_queue_size', { listener: 'tcp' }), 4);
  assert.equal(exact(samples, 'smartproxy_listener_workers', { listener: 'tls' }), 3);
  assert.equal(exact(samples, 'smartproxy_listener_queue_size', { listener: 'tls' }), 0);
  assert.equal(exact(samples, 'smartproxy_max_connections'), 50);
  assert.equal(exact(samples, 'smartproxy_max_tracked_ips'), 1000);

  // Start-up loads the config but is not a reload.
  assert.equal(exact(samples, 'smartproxy_config_reloads_total', { result: 'success' }), 0);
  assert.equal(exact(samples, 'smartproxy_config_reloads_total', { result: 'failure' }), 0);
  assert.equal(exact(samples, 'smartproxy_config_last_reload_success'), 1);
  const loadedAt = exact(samples, 'smartproxy_config_last_reload_timestamp_seconds');
  assert.ok(Math.abs(loadedAt - Date.now() / 1000) < 60, `last load at ${loadedAt}`);
});

test('a listener a reload adds has its series at once; capacity gauges follow the reload, max_tracked_ips stays (start-only)', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const before = listenerToml('tcp', route('echo', backend.port, 'default = true'), 'workers = 8\nqueue = 4');
  const { daemon, scrape } = await startInProcess(t, `[limits]\nmax_connections = 50\nmax_tracked_ips = 1000\n${before}`);
  assert.equal(await echoRoundTrip(daemon.portOf('tcp'), 'one'), null);
  await daemon.registry.whenEmpty();

  await daemon.reload(
    configFrom(
      `[limits]\nmax_connections = 0\nmax_tracked_ips = 2000\n` +
        listenerToml('tcp', route('echo', backend.port, 'default = true'), 'workers = 16\nqueue = 0') +
        listenerToml('added', route('api', backend.port, 'sni = ["api.example.com"]'), 'workers = 2\nqueue = 1'),
    ),
  );
  const { samples } = parseExposition(await scrape());
  assertReasons(samples, 'added');
  assert.equal(exact(samples, 'smartproxy_connections_active', { listener: 'added', route: '' }), 0);
  assert.equal(exact(samples, 'smartproxy_connections_active', { listener: 'added', route: 'api' }), 0);
  assert.equal(exact(samples, 'smartproxy_connections_accepted_total', { listener: 'added' }), 0);
  assertReasons(samples, 'tcp', { closed: { done: 1 } });
  assert.equal(exact(samples, 'smartproxy_connection_duration_seconds_count', { listener: 'tcp' }), 1, 'the zeros never overwrite an observation');

  assert.equal(exact(samples, 'smartproxy_listener_workers', { listener: 'tcp' }), 16);
  assert.equal(exact(samples, 'smartproxy_listener_queue_size', { listener: 'tcp' }), 0);
  assert.equal(exact(samples, 'smartproxy_listener_workers', { listener: 'added' }), 2);
  assert.equal(exact(samples, 'smartproxy_listener_queue_size', { listener: 'added' }), 1);
  assert.equal(exact(samples, 'smartproxy_max_connections'), 0, '0 = unlimited');
  assert.equal(exact(samples, 'smartproxy_max_tracked_ips'), 1000, 'the table in force, not the reloaded file');
  assert.equal(exact(samples, 'smartproxy_config_reloads_total', { result: 'success' }), 1);
  assert.equal(exact(samples, 'smartproxy_config_last_reload_success'), 1);
});

test('promtool check metrics accepts an in-process scrape with traffic, default Node metrics included', { timeout: 15_000 }, async (t) => {
  if (!needPromtool(t)) return;
  const { daemon, scrape } = await trafficDaemon(t);
  await someTraffic(daemon);
  const body = await scrape();
  const { families, samples } = parseExposition(body);
  assert.equal(exact(samples, 'smartproxy_rejections_total', { listener: 'blocked', reason: 'firewall' }), 1);
  assert.equal(exact(samples, 'smartproxy_connections_closed_total', { listener: 'down', reason: 'backend_unavailable' }), 1);
  for (const name of ['smartproxy_nodejs_active_handles_total', 'smartproxy_nodejs_active_requests_total', 'smartproxy_nodejs_active_resources_total']) {
    assert.ok(!families.has(name), `${name} (a gauge named like a counter) is not exposed`);
  }
  assert.ok(families.has('smartproxy_nodejs_active_handles'), 'the per-type gauge it summed stays');
  await assertPromtoolAccepts(t, body, 'an in-process scrape');
});

test('a threaded daemon (threads = 2): zeros sum to 0, counts sum exactly, capacity is not multiplied, promtool accepts the aggregate, a failed reload reads 0', { timeout: 60_000 }, async (t) => {
  const backend = await startBackend(t);
  const [port, addedPort] = [await closedPort(), await closedPort()];
  const head = `
[admin]
listen = "unix:{{dir}}/admin.sock"
[process]
threads = 2
[limits]
max_connections = 40
max_tracked_ips = 500
`;
  const tcp = `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:${port}"]
workers = 6
queue = 3
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`;
  const proxy = await startCli(t, head + tcp, { ready: ['tcp'], admin: true });
  const admin = { socketPath: `${proxy.dir}/admin.sock` };
  const scrape = async (): Promise<string> => {
    const { status, body } = await adminGet(admin, '/metrics');
    assert.equal(status, 200);
    return body;
  };

  const fresh = parseExposition(await scrape()).samples;
  assertReasons(fresh, 'tcp');
  assert.equal(exact(fresh, 'smartproxy_connections_active', { listener: 'tcp', route: '' }), 0);
  assert.equal(exact(fresh, 'smartproxy_connections_active', { listener: 'tcp', route: 'echo' }), 0);
  assert.equal(exact(fresh, 'smartproxy_config_reloads_total', { result: 'success' }), 0, 'start-up is not a reload');
  assert.equal(exact(fresh, 'smartproxy_config_last_reload_success'), 1);

  // Twelve connections from as many source ports, six at a time (the workers): the kernel spreads
  // them over both threads.
  const N = 12;
  for (let batch = 0; batch < N / 6; batch++) {
    const problems = await Promise.all(Array.from({ length: 6 }, (_, i) => echoRoundTrip(port, `message ${batch}.${i}`)));
    assert.deepEqual(problems, Array(6).fill(null));
  }
  let samples: readonly Sample[] = [];
  for (let tries = 0; tries < 50; tries++) {
    samples = parseExposition(await scrape()).samples;
    if (exact(samples, 'smartproxy_connections_closed_total', { listener: 'tcp', reason: 'done' }) === N) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assertReasons(samples, 'tcp', { closed: { done: N } });
  assert.equal(exact(samples, 'smartproxy_connections_accepted_total', { listener: 'tcp' }), N);
  assert.equal(exact(samples, 'smartproxy_route_connections_total', { listener: 'tcp', route: 'echo' }), N);
  assert.equal(exact(samples, 'smartproxy_connection_duration_seconds_count', { listener: 'tcp' }), N);
  assert.equal(exact(samples, 'smartproxy_connections_active', { listener: 'tcp', route: 'echo' }), 0);
  assert.equal(exact(samples, 'smartproxy_listener_workers', { listener: 'tcp' }), 6, 'the same in every thread: max, not sum');
  assert.equal(exact(samples, 'smartproxy_listener_queue_size', { listener: 'tcp' }), 3);
  assert.equal(exact(samples, 'smartproxy_max_connections'), 40);
  assert.equal(exact(samples, 'smartproxy_max_tracked_ips'), 500);
  await assertPromtoolAccepts(t, await scrape(), 'the threaded daemon\'s aggregated scrape');

  // A file that does not load: the reload fails, the old config stays, the gauge says 0.
  let from = proxy.lines.length;
  proxy.writeConfig(head + tcp.replace('workers = 6', 'workers = -1'));
  proxy.child.kill('SIGHUP');
  await proxy.waitForLine((l) => l.msg === 'reload failed; the previous configuration stays in force', { from, what: 'the reload failure' });
  const failed = parseExposition(await scrape()).samples;
  assert.equal(exact(failed, 'smartproxy_config_last_reload_success'), 0);
  assert.equal(exact(failed, 'smartproxy_config_reloads_total', { result: 'failure' }), 1);
  assert.equal(exact(failed, 'smartproxy_config_reloads_total', { result: 'success' }), 0);
  assert.equal(exact(failed, 'smartproxy_listener_workers', { listener: 'tcp' }), 6);

  // A good one adds a listener: its series are there at once, summed over the threads to 0.
  from = proxy.lines.length;
  const added = `
[[listeners]]
name = "added"
bind = ["127.0.0.1:${addedPort}"]
workers = 5
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["127.0.0.1:${backend.port}"]
`;
  proxy.writeConfig(head + tcp.replace('workers = 6', 'workers = 9') + added);
  proxy.child.kill('SIGHUP');
  await proxy.waitForLine((l) => l.msg === 'configuration reloaded', { from, what: 'the reload' });
  const reloaded = parseExposition(await scrape()).samples;
  assert.equal(exact(reloaded, 'smartproxy_config_last_reload_success'), 1);
  assert.equal(exact(reloaded, 'smartproxy_config_reloads_total', { result: 'success' }), 1);
  assertReasons(reloaded, 'added');
  assertReasons(reloaded, 'tcp', { closed: { done: N } });
  assert.equal(exact(reloaded, 'smartproxy_connections_active', { listener: 'added', route: 'api' }), 0);
  assert.equal(exact(reloaded, 'smartproxy_listener_workers', { listener: 'tcp' }), 9);
  assert.equal(exact(reloaded, 'smartproxy_listener_workers', { listener: 'added' }), 5);

  proxy.child.kill('SIGTERM');
  await assertCleanExit(proxy);
});

test('the shipped alert rules pass promtool check rules and their unit tests', { timeout: 30_000 }, async (t) => {
  if (!needPromtool(t)) return;
  const check = await promtool(['check', 'rules', ALERTS]);
  assert.equal(check.code, 0, check.output);
  assert.match(check.output, /SUCCESS: \d+ rules found/);
  const unit = await promtool(['test', 'rules', ALERT_TESTS]);
  assert.equal(unit.code, 0, unit.output);
  assert.match(unit.output, /SUCCESS/);
});

test('every metric the alert rules, their unit tests and the Grafana dashboard use exists in a real scrape', { timeout: 15_000 }, async (t) => {
  const { daemon, scrape } = await trafficDaemon(t);
  await someTraffic(daemon);
  const names = namesIn(parseExposition(await scrape()));
  // `up` is Prometheus's own series for a scrape target, the only name not from smartproxy.
  const known = (name: string): boolean => name === 'up' || names.has(name);

  const used = new Map<string, string>();
  for (const expr of ruleExpressions()) for (const name of metricNamesOf(expr)) used.set(name, `alerts.yml: ${expr}`);
  for (const series of ruleTestSeries()) for (const name of metricNamesOf(series)) used.set(name, `alerts.test.yml: ${series}`);
  const queries = dashboardQueries();
  assert.ok(queries.length >= 20, `the dashboard has ${queries.length} queries`);
  for (const query of queries) for (const name of metricNamesOf(query)) used.set(name, `smartproxy.json: ${query}`);

  const unknown = [...used].filter(([name]) => !known(name)).map(([name, where]) => `${name} (${where})`);
  assert.deepEqual(unknown, [], 'metrics used but not in a scrape');
  for (const name of ['smartproxy_workers_busy', 'smartproxy_listener_workers', 'smartproxy_queue_depth', 'smartproxy_listener_queue_size', 'smartproxy_rejections_total', 'smartproxy_config_last_reload_success', 'up']) {
    assert.ok(used.has(name), `${name} is used by the rules or the dashboard`);
  }
  assert.ok(used.has('smartproxy_connection_duration_seconds_bucket'), 'the histogram is read through its buckets');
});

test('the metric-name extraction finds names through functions, groupings, matchers and Grafana variables', () => {
  assert.deepEqual(
    metricNamesOf('histogram_quantile(0.95, sum by (le, listener) (rate(a_bucket{instance=~"$instance", x="b_total"}[$__rate_interval])))'),
    ['a_bucket'],
  );
  assert.deepEqual(metricNamesOf('sum by (job) (b) / on (job) (c > 0) and ignoring (x) d offset 5m'), ['b', 'c', 'd']);
  assert.deepEqual(metricNamesOf('time() - max(e{y="1"})'), ['e']);
  assert.deepEqual(metricNamesOf('label_values(f{instance=~"$instance"}, listener)'), ['f']);
  assert.deepEqual(metricNamesOf("up{job='smartproxy'} == 0"), ['up']);
});

test('README lists every smartproxy metric family of a scrape, with its type', { timeout: 15_000 }, async (t) => {
  const { daemon, scrape } = await trafficDaemon(t);
  await someTraffic(daemon);
  const { families } = parseExposition(await scrape());
  const readme = readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const table = readme.slice(readme.indexOf('| metric | type | labels |'));
  const rows = table.slice(0, table.indexOf('\n\n')).split('\n').slice(2);
  const documented = new Map<string, string>();
  for (const row of rows) {
    const [, first, type] = row.split('|').map((cell) => cell.trim());
    for (const m of first!.matchAll(/`([a-z_:*]+)`/g)) if (!m[1]!.includes('*')) documented.set(m[1]!, type!);
  }
  const isDefault = (name: string): boolean => name.startsWith('smartproxy_process_') || name.startsWith('smartproxy_nodejs_');
  for (const [name, family] of families) {
    if (isDefault(name)) continue;
    assert.equal(documented.get(name), family.type, `README's metrics table: ${name} (${family.type})`);
  }
  for (const name of documented.keys()) assert.ok(families.has(name), `README documents ${name}, which a scrape does not have`);
  assert.ok(rows.some((row) => row.includes('`smartproxy_process_*`')), 'the default metrics have their row');
});
