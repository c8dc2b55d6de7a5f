// The contenders: how each proxy is configured and started on the proxy core. Every contender is
// a plain TCP relay to one backend, or, in the tls scenario, a relay chosen by the ClientHello's
// SNI (except node-pipe, which cannot read SNI and shows the floor of a Node relay). In the flood
// scenario the contenders that can limit per client (smartproxy, haproxy) get the same limits.
import { spawnSync } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { freePort, startNginx, TLS_SERVER_NAME } from './backends.mjs';
import { spawnChild, waitForListen } from './processes.mjs';

export const CONTENDER_NAMES = ['direct', 'smartproxy', 'haproxy', 'nginx', 'node-pipe'];
/** Contenders with per-client connection and rate limits, the ones the flood scenario runs. */
export const GOVERNED_CONTENDER_NAMES = ['smartproxy', 'haproxy'];

/**
 * Admission limits for the flood scenario, in smartproxy's terms; haproxy gets the equivalent.
 * @typedef {{ workers: number, queue: number, queueTimeout: string, maxConnectionsPerIp: number,
 *   ratePerIp: { count: number, per: string, perSeconds: number }, fairShareAbove: number,
 *   rejectionSummaryInterval: string }} FloodLimits
 */

const REPO_ROOT = new URL('../../', import.meta.url).pathname;
export const SMARTPROXY_ENTRY = join(REPO_ROOT, 'dist/smartproxy.js');
const PLAIN_PROXY = join(REPO_ROOT, 'scripts/plain-proxy.mjs');
/** The Node the project carries (the `node` package); the orchestrator's own node otherwise. */
export const PROJECT_NODE = existsSync(join(REPO_ROOT, 'node_modules/.bin/node')) ? join(REPO_ROOT, 'node_modules/.bin/node') : process.execPath;

/**
 * How one smartproxy contender runs: `smartproxy` itself (this checkout's dist/ under the node the
 * project carries, with `--node-flags` on its command line), or a variant from `--variant`: another
 * build, another node, other flags or environment, in the same run.
 * `per-ip` turns on per-client limits too high to refuse anyone (the per-client code runs on every
 * admission); `cluster` does that and shares them through a loopback redis-server the bench starts
 * (once, on the load cores, no persistence): the cost of [cluster] against `per-ip` in one run.
 * @typedef {{ node: string, nodeVersion: string, entry: string, flags: string[], env: Record<string, string>,
 *   threadsKey: boolean, perIp: boolean, cluster: boolean }} SmartproxyRuntime
 */

/** `node --version` of a node binary, or 'unknown'. */
export function nodeVersionOf(node) {
  const result = spawnSync(node, ['--version'], { encoding: 'utf8', timeout: 10000 });
  return /v\d+\.\d+\.\d+/.exec(result.stdout ?? '')?.[0] ?? 'unknown';
}

/**
 * Parses `--variant NAME=KEY=VALUE,KEY=VALUE,...` (keys: node, entry, flags, env.VAR, and the bare
 * `no-threads-key` for builds that predate `[process] threads`).
 * @param {string} text
 * @returns {[string, SmartproxyRuntime]}
 */
export function parseVariant(text) {
  const eq = text.indexOf('=');
  const name = eq === -1 ? text : text.slice(0, eq);
  if (!/^[a-z0-9][a-z0-9_.-]*$/i.test(name) || CONTENDER_NAMES.includes(name)) {
    throw new Error(`--variant ${text}: the name before "=" must be new and plain (letters, digits, - _ .)`);
  }
  const runtime = { node: PROJECT_NODE, nodeVersion: '', entry: SMARTPROXY_ENTRY, flags: [], env: {}, threadsKey: true, perIp: false, cluster: false };
  for (const item of eq === -1 ? [] : text.slice(eq + 1).split(',').filter(Boolean)) {
    const at = item.indexOf('=');
    const key = at === -1 ? item : item.slice(0, at);
    const value = at === -1 ? '' : item.slice(at + 1);
    if (key === 'node') runtime.node = value;
    else if (key === 'entry') runtime.entry = value;
    else if (key === 'flags') runtime.flags = value.split(/\s+/).filter(Boolean);
    else if (key.startsWith('env.') && key.length > 4) runtime.env[key.slice(4)] = value;
    else if (key === 'no-threads-key' && at === -1) runtime.threadsKey = false;
    // An active TCP health check of the backend every INTERVAL (its cost per connection).
    else if (key === 'health' && value !== '') runtime.routeExtra = `\n    [listeners.routes.health_check]\n    interval = "${value}"\n    jitter = 0\n`;
    else if (key === 'per-ip' && at === -1) runtime.perIp = true;
    else if (key === 'cluster' && at === -1) runtime.perIp = runtime.cluster = true;
    else throw new Error(`--variant ${text}: unknown key "${key}" (known: node, entry, flags, env.VAR, no-threads-key, health, per-ip, cluster)`);
  }
  runtime.nodeVersion = nodeVersionOf(runtime.node);
  return [name, runtime];
}

/**
 * The runtime of smartproxy contender `name`, or null when `name` is not one.
 * @param {{ smartproxyNodeFlags?: string[] | null, variants?: Map<string, SmartproxyRuntime> }} ctx
 * @returns {SmartproxyRuntime | null}
 */
export function smartproxyRuntime(ctx, name) {
  if (name === 'smartproxy') {
    ctx.projectNodeVersion ??= nodeVersionOf(PROJECT_NODE);
    // No V8 flags by default: the daemon sets its threads' heap flags itself (src/event-loops.ts).
    return { node: PROJECT_NODE, nodeVersion: ctx.projectNodeVersion, entry: SMARTPROXY_ENTRY, flags: ctx.smartproxyNodeFlags ?? [], env: {}, threadsKey: true, perIp: false, cluster: false };
  }
  return ctx.variants?.get(name) ?? null;
}

/** Idle connections must outlive a whole idle run; every proxy gets the same generous timeout. */
const IDLE_TIMEOUT = '10m';

/**
 * Why `name` cannot run here, or null when it can.
 * @param {import('./backends.mjs').BenchContext & { smartproxySkip?: string | null }} ctx
 * @param {string} name
 */
export function whyUnavailable(ctx, name) {
  const runtime = smartproxyRuntime(ctx, name);
  if (runtime) {
    if (name === 'smartproxy' && ctx.smartproxySkip) return ctx.smartproxySkip;
    if (!existsSync(runtime.entry)) return `${runtime.entry} not built`;
    if (runtime.nodeVersion === 'unknown') return `${runtime.node} does not run`;
    return null;
  }
  switch (name) {
    case 'haproxy':
      return ctx.machine.tools.haproxy ? null : 'haproxy not installed';
    case 'nginx':
      if (!ctx.machine.tools.nginx) return 'nginx not installed';
      return ctx.machine.nginxStreamModule === null ? 'this nginx has no stream module (apt-get install -y libnginx-mod-stream)' : null;
    default:
      return null;
  }
}

/** Label with version, for the header of the report. @param {import('./backends.mjs').BenchContext} ctx */
export function describeContender(ctx, name) {
  const { versions, threads } = ctx.machine;
  const runtime = smartproxyRuntime(ctx, name);
  if (runtime) {
    const env = Object.entries(runtime.env).map(([key, value]) => `${key}=${JSON.stringify(value)} `).join('');
    const entry = runtime.entry === SMARTPROXY_ENTRY ? 'dist/smartproxy.js' : runtime.entry;
    const limits = runtime.cluster ? ', per-client limits shared through redis-server on loopback ([cluster])' : runtime.perIp ? ', per-client limits (never reached)' : '';
    return `${env}node ${runtime.nodeVersion} ${[...runtime.flags, entry].join(' ')} serve --log-level warn, ` +
      (runtime.threadsKey ? `[process] threads = ${threads}` : 'one event loop (a build before [process] threads)') + limits;
  }
  switch (name) {
    case 'direct':
      return 'no proxy: the load goes straight to the backend';
    case 'haproxy':
      return `HAProxy ${versions.haproxy}, nbthread ${threads}, mode tcp`;
    case 'nginx':
      return `nginx ${versions.nginx} stream, worker_processes ${threads}`;
    case 'node-pipe':
      ctx.projectNodeVersion ??= nodeVersionOf(PROJECT_NODE);
      return `node ${ctx.projectNodeVersion} scripts/plain-proxy.mjs (net + pipe(), no SNI routing, one event loop whatever --threads is)`;
    default:
      return name;
  }
}

/**
 * Starts contender `name` in front of `backendPort` and waits until it listens. `direct` starts
 * nothing and returns the backend port itself. With `limits` (smartproxy and haproxy only) the
 * contender limits per client and logs what an operator would see: smartproxy at info level with
 * its admin API on `adminPort` (to read its own rejection counts), haproxy to stdout.
 * @param {import('./backends.mjs').BenchContext} ctx
 * @param {string} name
 * @param {{ backendPort: number, routeBySni: boolean, limits?: FloodLimits }} target
 * @returns {Promise<{ name: string, port: number, child: import('./processes.mjs').Child | null, adminPort: number | null }>}
 */
export async function startContender(ctx, name, { backendPort, routeBySni, limits }) {
  if (name === 'direct') return { name, port: backendPort, child: null, adminPort: null };
  if (limits && !GOVERNED_CONTENDER_NAMES.includes(name) && smartproxyRuntime(ctx, name) === null) throw new Error(`${name} has no per-client limits in this bench`);
  const port = await freePort();
  const adminPort = limits && smartproxyRuntime(ctx, name) !== null ? await freePort() : null;
  if (smartproxyRuntime(ctx, name)?.cluster) await startBenchRedis(ctx);
  const child = spawnProxy(ctx, name, port, backendPort, routeBySni, limits, adminPort);
  await waitForListen(port, { child, what: name });
  return { name, port, child, adminPort };
}

function spawnProxy(ctx, name, port, backendPort, routeBySni, limits, adminPort) {
  const { machine, tmpDir } = ctx;
  const prefix = machine.proxyPrefix;
  const runtime = smartproxyRuntime(ctx, name);
  if (runtime) {
    const file = join(tmpDir, `${name}-${port}.toml`);
    const processSection = runtime.threadsKey ? `[process]\nthreads = ${machine.threads}\n\n` : '';
    writeFileSync(file, processSection + clusterSection(ctx, runtime) + (limits ? smartproxyFloodConfig(port, backendPort, limits, adminPort) : smartproxyConfig(port, backendPort, routeBySni, runtime) + (runtime.routeExtra ?? '')));
    // `node dist/smartproxy.js serve`, as the systemd unit starts it; the daemon applies its threads' V8 flags itself.
    return spawnChild(name, [...prefix, runtime.node, ...runtime.flags, runtime.entry, 'serve', '-c', file, '--log-level', limits ? 'info' : 'warn'], { env: runtime.env });
  }
  switch (name) {
    case 'haproxy': {
      const file = join(tmpDir, `haproxy-${port}.cfg`);
      writeFileSync(file, limits ? haproxyFloodConfig(port, backendPort, limits, machine.fdLimit, machine.threads) : haproxyConfig(port, backendPort, routeBySni, machine.fdLimit, machine.threads));
      // -db: stay in the foreground, so the pid we hold is the one doing the work.
      return spawnChild(name, [...prefix, machine.tools.haproxy, '-db', '-f', file]);
    }
    case 'nginx':
      return startNginx(ctx, `nginx-proxy-${port}`, prefix, nginxStreamConfig(port, backendPort, routeBySni), { workerProcesses: machine.threads });
    case 'node-pipe':
      return spawnChild(name, [...prefix, PROJECT_NODE, PLAIN_PROXY, '--listen', String(port), '--backend', String(backendPort)]);
    default:
      throw new Error(`unknown contender ${name}`);
  }
}

/** One redis-server for every `cluster` contender of the run; stopped with the other children. */
async function startBenchRedis(ctx) {
  if (ctx.redisPort !== undefined) return;
  const port = await freePort();
  const child = spawnChild('redis-server', [...ctx.machine.loadPrefix, 'redis-server', '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--loglevel', 'warning']);
  await waitForListen(port, { child, what: 'redis-server' });
  ctx.redisPort = port;
}

function clusterSection(ctx, runtime) {
  if (!runtime.cluster) return '';
  return `[cluster]\nredis = "redis://127.0.0.1:${ctx.redisPort}/0"\ninstance = "bench"\n\n`;
}

function smartproxyConfig(port, backendPort, routeBySni, runtime) {
  // A listener whose only route is the default one skips the TLS peek: a plain relay.
  const match = routeBySni ? `sni = ["${TLS_SERVER_NAME}"]` : 'default = true';
  // High enough never to refuse: the per-client code (and the store, with [cluster]) runs on every admission.
  const perIp = runtime.perIp ? 'max_connections_per_ip = 1000000\nconnection_rate_per_ip = { count = 10000000, per = "1s" }\n' : '';
  return `[limits]
max_connections = 0
${perIp}
[timeouts]
idle = "${IDLE_TIMEOUT}"

[[listeners]]
name = "bench"
bind = ["127.0.0.1:${port}"]
workers = 20000
queue = 1000

  [[listeners.routes]]
  name = "backend"
  ${match}
  backends = ["127.0.0.1:${backendPort}"]
`;
}

/**
 * The flood scenario's listener: the limits of `limits`, refusals reset, the rejection summary
 * at its interval, and the admin API for the proxy's own rejection counts.
 * @param {FloodLimits} limits
 */
function smartproxyFloodConfig(port, backendPort, limits, adminPort) {
  return `[limits]
max_connections = 0

[timeouts]
idle = "${IDLE_TIMEOUT}"

[logging]
rejection_summary_interval = "${limits.rejectionSummaryInterval}"

[admin]
listen = "127.0.0.1:${adminPort}"

[[listeners]]
name = "flood"
bind = ["127.0.0.1:${port}"]
workers = ${limits.workers}
queue = ${limits.queue}
queue_timeout = "${limits.queueTimeout}"
reject = "reset"

  [listeners.limits]
  max_connections_per_ip = ${limits.maxConnectionsPerIp}
  connection_rate_per_ip = { count = ${limits.ratePerIp.count}, per = "${limits.ratePerIp.per}" }
  fair_share_above = ${limits.fairShareAbove}

  [[listeners.routes]]
  name = "backend"
  default = true
  backends = ["127.0.0.1:${backendPort}"]
`;
}

/** HAProxy refuses to start when maxconn needs more descriptors than it may open (two per connection). */
function haproxyMaxconn(fdLimit) {
  return Math.min(50000, Math.floor((fdLimit - 200) / 2));
}

function haproxyConfig(port, backendPort, routeBySni, fdLimit, threads) {
  const maxconn = haproxyMaxconn(fdLimit);
  const routing = routeBySni
    ? `  tcp-request inspect-delay 5s
  tcp-request content accept if { req_ssl_hello_type 1 }
  use_backend backend if { req_ssl_sni -i ${TLS_SERVER_NAME} }`
    : '  default_backend backend';
  return `global
  nbthread ${threads}
  maxconn ${maxconn}

defaults
  mode tcp
  maxconn ${maxconn}
  timeout connect 5s
  timeout client ${IDLE_TIMEOUT}
  timeout server ${IDLE_TIMEOUT}

frontend bench
  bind 127.0.0.1:${port} backlog 4096
${routing}

backend backend
  server s1 127.0.0.1:${backendPort}
`;
}

/**
 * The flood scenario's equivalent in HAProxy: a stick table per source address with its current
 * connections and its connection rate, refused at `tcp-request connection` (before a session
 * exists: not logged, closed at once). Differences from smartproxy, all in HAProxy's favour or
 * neutral here: conn_rate also counts refused attempts (the attacker is refused by conn_cur
 * anyway); the frontend maxconn (workers + queue) leaves excess connections in the kernel
 * backlog instead of a timed queue; there is no fair share. The backlog is smartproxy's (4096,
 * its minimum) so that both face the same kernel queue. Logs go to stdout with tcplog and
 * dontlog-normal: only abnormal sessions are logged, as smartproxy logs nothing per connection at
 * info.
 * @param {FloodLimits} limits
 */
function haproxyFloodConfig(port, backendPort, limits, fdLimit, threads) {
  const maxconn = haproxyMaxconn(fdLimit);
  return `global
  nbthread ${threads}
  maxconn ${maxconn}

defaults
  mode tcp
  timeout connect 5s
  timeout client ${IDLE_TIMEOUT}
  timeout server ${IDLE_TIMEOUT}

frontend flood
  bind 127.0.0.1:${port} backlog 4096
  maxconn ${limits.workers + limits.queue}
  log stdout format raw local0 info
  option tcplog
  option dontlog-normal
  stick-table type ip size 1m expire 30s store conn_cur,conn_rate(${limits.ratePerIp.perSeconds}s)
  tcp-request connection track-sc0 src
  tcp-request connection reject if { sc0_conn_cur gt ${limits.maxConnectionsPerIp} }
  tcp-request connection reject if { sc0_conn_rate gt ${limits.ratePerIp.count} }
  default_backend backend

backend backend
  server s1 127.0.0.1:${backendPort}
`;
}

function nginxStreamConfig(port, backendPort, routeBySni) {
  const server = routeBySni
    ? `  map $ssl_preread_server_name $route {
    ${TLS_SERVER_NAME} backend;
    default unknown_sni;
  }
  upstream unknown_sni { server 127.0.0.1:1; }
  server {
    listen 127.0.0.1:${port} backlog=4096;
    ssl_preread on;
    proxy_pass $route;
    proxy_timeout ${IDLE_TIMEOUT};
  }`
    : `  server {
    listen 127.0.0.1:${port} backlog=4096;
    proxy_pass backend;
    proxy_timeout ${IDLE_TIMEOUT};
  }`;
  return `stream {
  upstream backend { server 127.0.0.1:${backendPort}; }
${server}
}`;
}
