// The admin API and metrics: exact counters after a scripted sequence, a strictly valid
// exposition, /stats and /connections, the unix socket's mode, `smartproxy status`, and the
// open-file limit warning.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { statSync } from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import tls from 'node:tls';
import { startAdminServer, type AdminServer } from '../src/admin/server.ts';
import type { DaemonStats } from '../src/admin/stats.ts';
import { renderStatus } from '../src/admin/status.ts';
import type { AdminListen } from '../src/config/types.ts';
import { Daemon } from '../src/daemon.ts';
import { descriptorsNeeded, fdLimitWarning, openFileLimit } from '../src/fd-limit.ts';
import { Metrics } from '../src/metrics.ts';
import { adminGet, CLI, ROOT, startCli, tempDir, assertCleanExit } from './support/cli.ts';
import { admission, expectData } from './support/clients.ts';
import { closedPort, configFrom, connect, memoryLogger, readAll, startBackend } from './support/harness.ts';
import { parseExposition, valueOf, type Sample } from './support/metrics.ts';

/** Every client of these tests comes from this address, so a leak into a label is visible. */
const CLIENT_IP = '127.0.0.2';
const TCP_ADMIN: AdminListen = { kind: 'tcp', address: { host: '127.0.0.1', port: 0, text: '127.0.0.1:0' } };

/** A daemon with prom-client's default metrics on (as in production) and its admin API. */
async function startWithAdmin(t: TestContext, toml: string, listen: AdminListen = TCP_ADMIN): Promise<{ daemon: Daemon; admin: AdminServer }> {
  const { log } = memoryLogger('warn');
  const daemon = await Daemon.start(configFrom(toml), log, { metrics: new Metrics() });
  const admin = await startAdminServer(listen, daemon);
  t.after(async () => {
    await admin.close();
    await daemon.shutdown({ immediate: true });
  });
  return { daemon, admin };
}

function tcpListener(name: string, backendPort: number, extra = ''): string {
  return `
[[listeners]]
name = "${name}"
bind = ["127.0.0.1:0"]
${extra}
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backendPort}"]
`;
}

/** A connection from CLIENT_IP that sent `bytes` bytes and got them echoed back. */
async function relayedFrom(port: number, bytes: number): Promise<net.Socket> {
  const socket = await connect(port, { localAddress: CLIENT_IP });
  const text = 'x'.repeat(bytes);
  socket.write(text);
  await expectData(socket, text);
  return socket;
}

async function finish(socket: net.Socket): Promise<void> {
  const done = readAll(socket);
  socket.end();
  assert.equal((await done).error, null);
}

function sum(samples: readonly Sample[], name: string): number {
  return samples.filter((s) => s.name === name).reduce((a, s) => a + s.value, 0);
}

test('after 3 relayed, 2 ip_limit and 1 no_route connections the scraped metrics equal the truth', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const { daemon, admin } = await startWithAdmin(
    t,
    tcpListener('tcp', backend.port, '  [listeners.limits]\n  max_connections_per_ip = 3') +
      `
[[listeners]]
name = "tls"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["127.0.0.1:${backend.port}"]
`,
  );
  const sizes = [1000, 2000, 3000];
  const held: net.Socket[] = [];
  for (const size of sizes) held.push(await relayedFrom(daemon.portOf('tcp'), size));
  assert.equal(await admission(daemon.portOf('tcp'), { localAddress: CLIENT_IP }), 'reset');
  assert.equal(await admission(daemon.portOf('tcp'), { localAddress: CLIENT_IP }), 'reset');
  const unrouted = tls.connect({ port: daemon.portOf('tls'), host: '127.0.0.1', localAddress: CLIENT_IP, servername: 'unknown.example.net', rejectUnauthorized: false } as tls.ConnectionOptions);
  unrouted.on('error', () => {});
  await new Promise((resolve) => unrouted.once('close', resolve));

  // While the three are open: live gauges and live bytes.
  const live = parseExposition((await adminGet({ port: admin.port }, '/metrics')).body).samples;
  assert.equal(valueOf(live, 'smartproxy_connections_active', { listener: 'tcp', route: 'echo' }), 3);
  assert.equal(valueOf(live, 'smartproxy_workers_busy', { listener: 'tcp' }), 3);
  assert.equal(valueOf(live, 'smartproxy_bytes_total', { listener: 'tcp', route: 'echo', direction: 'from_client' }), 6000);

  for (const socket of held) await finish(socket);
  await daemon.registry.whenEmpty();
  const scraped = await adminGet({ port: admin.port }, '/metrics');
  assert.equal(scraped.status, 200);
  const { samples } = parseExposition(scraped.body);

  assert.equal(valueOf(samples, 'smartproxy_connections_accepted_total', { listener: 'tcp' }), 3);
  assert.equal(valueOf(samples, 'smartproxy_connections_accepted_total', { listener: 'tls' }), 1);
  assert.equal(valueOf(samples, 'smartproxy_route_connections_total', { listener: 'tcp', route: 'echo' }), 3);
  assert.equal(valueOf(samples, 'smartproxy_rejections_total', { listener: 'tcp', reason: 'ip_limit' }), 2);
  assert.equal(valueOf(samples, 'smartproxy_rejections_total', { listener: 'tls', reason: 'no_route' }), 1);
  assert.equal(sum(samples, 'smartproxy_rejections_total'), 3);
  assert.equal(valueOf(samples, 'smartproxy_connections_closed_total', { listener: 'tcp', reason: 'done' }), 3);
  assert.equal(valueOf(samples, 'smartproxy_connections_closed_total', { listener: 'tls', reason: 'no_route' }), 1);
  assert.equal(sum(samples, 'smartproxy_connections_closed_total'), 4);
  assert.equal(valueOf(samples, 'smartproxy_bytes_total', { listener: 'tcp', route: 'echo', direction: 'from_client' }), 6000);
  assert.equal(valueOf(samples, 'smartproxy_bytes_total', { listener: 'tcp', route: 'echo', direction: 'from_backend' }), 6000);
  assert.equal(sum(samples, 'smartproxy_bytes_total'), 12_000);
  assert.equal(sum(samples, 'smartproxy_connections_active'), 0);
  assert.equal(sum(samples, 'smartproxy_workers_busy'), 0);
  assert.equal(valueOf(samples, 'smartproxy_connection_duration_seconds_count', { listener: 'tcp' }), 3);
  assert.equal(valueOf(samples, 'smartproxy_config_reloads_total', { result: 'success' }), 0, 'start-up is not a reload');
  assert.equal(daemon.registry.size, 0);
});

test('the exposition is strictly valid, default metrics included, and no label carries a client address', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const { daemon, admin } = await startWithAdmin(t, tcpListener('tcp', backend.port, '  [listeners.limits]\n  max_connections_per_ip = 1'));
  // Scraped twice: with a connection live and one refused, then after it closed.
  const socket = await relayedFrom(daemon.portOf('tcp'), 10);
  assert.equal(await admission(daemon.portOf('tcp'), { localAddress: CLIENT_IP }), 'reset');
  const whileLive = (await adminGet({ port: admin.port }, '/metrics')).body;
  parseExposition(whileLive);
  await finish(socket);
  await daemon.registry.whenEmpty();
  const body = (await adminGet({ port: admin.port }, '/metrics')).body;
  const { families, samples } = parseExposition(body);
  assert.equal(valueOf(samples, 'smartproxy_connections_closed_total', { reason: 'done' }), 1);
  assert.ok(!whileLive.includes(CLIENT_IP), 'the client address appears nowhere while it is connected');

  for (const name of ['smartproxy_build_info', 'smartproxy_connections_accepted_total', 'smartproxy_bytes_total', 'smartproxy_connection_duration_seconds']) {
    assert.ok(families.has(name), `${name} is exposed`);
  }
  assert.ok(families.has('smartproxy_process_resident_memory_bytes'), 'default process metrics are exposed');
  assert.ok(families.has('smartproxy_process_open_fds'), 'open descriptors are exposed');
  assert.ok(families.has('smartproxy_nodejs_eventloop_lag_seconds'), 'default Node.js metrics are exposed');
  assert.deepEqual([...families.keys()].filter((name) => !name.startsWith('smartproxy_')), [], 'every family carries the prefix');
  assert.equal(families.get('smartproxy_connection_duration_seconds')!.type, 'histogram');
  assert.equal(families.get('smartproxy_rejections_total')!.type, 'counter');
  assert.ok(samples.length > 20);
  assert.ok(!body.includes(CLIENT_IP), 'the client address appears nowhere in the exposition');
  for (const s of samples) for (const value of Object.values(s.labels)) assert.ok(!value.includes(CLIENT_IP), `${s.name} ${value}`);
});

test('the exposition parser of these tests rejects what the format forbids', () => {
  const ok = '# HELP a_total Things.\n# TYPE a_total counter\na_total{x="q\\"uote\\\\ \\n"} 1\n';
  assert.equal(parseExposition(ok).samples[0]!.labels.x, 'q"uote\\ \n');
  const bad = {
    'a sample without HELP and TYPE': 'b 1\n',
    'a family without HELP': '# TYPE a gauge\na 1\n',
    'a bad escape': '# HELP a x\n# TYPE a gauge\na{x="\\t"} 1\n',
    'an unescaped quote': '# HELP a x\n# TYPE a gauge\na{x="""} 1\n',
    'a duplicate series': '# HELP a x\n# TYPE a gauge\na{x="1",y="2"} 1\na{y="2",x="1"} 2\n',
    'a value that is not a number': '# HELP a x\n# TYPE a gauge\na 1O\n',
    'a missing final newline': '# HELP a x\n# TYPE a gauge\na 1',
    'families interleaved': '# HELP a x\n# TYPE a gauge\na 1\n# HELP b x\n# TYPE b gauge\nb 1\na{x="2"} 1\n',
    'a label name twice': '# HELP a x\n# TYPE a gauge\na{x="1",x="2"} 1\n',
  };
  for (const [what, text] of Object.entries(bad)) assert.throws(() => parseExposition(text), Error, what);
});

test('/connections?limit=N and /stats show a live connection with its client, route, backend and state', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const { daemon, admin } = await startWithAdmin(t, tcpListener('tcp', backend.port, 'workers = 8\nqueue = 4'));
  const first = await relayedFrom(daemon.portOf('tcp'), 5);
  const second = await relayedFrom(daemon.portOf('tcp'), 7);

  const limited = await adminGet({ port: admin.port }, '/connections?limit=1');
  assert.equal(limited.status, 200);
  const page = JSON.parse(limited.body) as { total: number; connections: Array<Record<string, unknown>> };
  assert.equal(page.total, 2);
  assert.equal(page.connections.length, 1);
  const [conn] = page.connections;
  assert.match(String(conn!.client), /^127\.0\.0\.2:\d+$/);
  assert.equal(conn!.client, `${CLIENT_IP}:${first.localPort}`);
  assert.deepEqual(
    { listener: conn!.listener, route: conn!.route, backend: conn!.backend, state: conn!.state, via: conn!.via, sni: conn!.sni, bytesFromClient: conn!.bytesFromClient, bytesFromBackend: conn!.bytesFromBackend },
    { listener: 'tcp', route: 'echo', backend: `127.0.0.1:${backend.port}`, state: 'relaying', via: null, sni: null, bytesFromClient: 5, bytesFromBackend: 5 },
  );
  const all = JSON.parse((await adminGet({ port: admin.port }, '/connections')).body) as { connections: unknown[] };
  assert.equal(all.connections.length, 2);

  const stats = JSON.parse((await adminGet({ port: admin.port }, '/stats')).body) as DaemonStats;
  assert.equal(stats.accepting, true);
  assert.equal(stats.active, 2);
  assert.equal(stats.pid, process.pid);
  assert.deepEqual(stats.listeners, [
    {
      name: 'tcp',
      bind: ['127.0.0.1:0'],
      draining: false,
      workers: 8,
      busy: 2,
      queue: 4,
      queued: 0,
      active: 2,
      trackedClients: 1,
      rejections: stats.listeners[0]!.rejections,
      routes: [{ name: 'echo', active: 2 }],
      topClients: [{ client: CLIENT_IP, active: 2 }],
      activeClients: 1,
      routedActive: 2,
    },
  ]);
  assert.equal(Object.values(stats.listeners[0]!.rejections).reduce((a, b) => a + b, 0), 0);
  assert.equal((await adminGet({ port: admin.port }, '/nothing')).status, 404);

  await finish(first);
  await finish(second);
  await daemon.registry.whenEmpty();
});

test('the admin API on a unix socket has mode 0600 and /healthz says 200 while running, 503 once stopping', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const socketPath = path.join(tempDir(t), 'admin.sock');
  const { daemon, admin } = await startWithAdmin(t, tcpListener('tcp', backend.port), { kind: 'unix', path: socketPath });
  assert.equal(admin.address, `unix:${socketPath}`);
  const stat = statSync(socketPath);
  assert.ok(stat.isSocket());
  assert.equal(stat.mode & 0o777, 0o600);
  assert.deepEqual(await adminGet({ socketPath }, '/healthz'), { status: 200, body: 'ok\n' });
  await daemon.shutdown({ drainTimeoutMs: 1000 });
  assert.deepEqual(await adminGet({ socketPath }, '/healthz'), { status: 503, body: 'draining\n' });
});

test('smartproxy status --admin prints the listener table', { timeout: 15_000 }, async (t) => {
  const backend = await startBackend(t);
  const { daemon, admin } = await startWithAdmin(t, tcpListener('tcp', backend.port, 'workers = 8\nqueue = 4'));
  const held = await relayedFrom(daemon.portOf('tcp'), 3);

  const run = (adminAddress: string): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    new Promise((resolve) => {
      const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'status', '--admin', adminAddress], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
      child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
      child.on('close', (code) => resolve({ code, stdout, stderr }));
    });
  const [up, down] = await Promise.all([run(admin.address), run(`127.0.0.1:${await closedPort()}`)]);

  assert.equal(up.code, 0, up.stderr);
  const lines = up.stdout.split('\n');
  assert.match(lines[0]!, new RegExp(`^smartproxy \\S+  pid ${process.pid}  up \\d+s  accepting  connections 1/10000$`));
  assert.match(lines[2]!, /^LISTENER\s+BIND\s+WORKERS\s+QUEUE\s+ACTIVE\s+CLIENTS\s+REJECTED$/);
  assert.match(lines[3]!, /^tcp\s+127\.0\.0\.1:0\s+1\/8\s+0\/4\s+1\s+1\s+0$/);
  assert.ok(up.stdout.includes(`tcp top clients: ${CLIENT_IP} x1`));

  assert.equal(down.code, 1);
  assert.match(down.stderr, /cannot reach the admin API/);
  await finish(held);
  await daemon.registry.whenEmpty();
});

test('renderStatus lays out listeners, rejections, routes and top clients', () => {
  const stats: DaemonStats = {
    version: '1.2.3',
    pid: 42,
    uptimeSeconds: 7,
    accepting: false,
    active: 3,
    maxConnections: 100,
    listeners: [
      {
        name: 'tls',
        bind: ['127.0.0.1:8443', '[::1]:8443'],
        draining: false,
        workers: 64,
        busy: 3,
        queue: 10,
        queued: 0,
        active: 3,
        trackedClients: 2,
        rejections: { ip_limit: 4, queue_full: 1, firewall: 0 },
        routes: [
          { name: 'api', active: 2 },
          { name: 'fallback', active: 1 },
        ],
        topClients: [
          { client: '192.0.2.1', active: 2 },
          { client: '2001:db8::/64', active: 1 },
        ],
      },
      { name: 'old', bind: [], draining: true, workers: 1, busy: 0, queue: 0, queued: 0, active: 0, trackedClients: 0, rejections: {}, routes: [{ name: 'x', active: 0 }], topClients: [] },
    ],
  };
  assert.equal(
    renderStatus(stats),
    [
      'smartproxy 1.2.3  pid 42  up 7s  DRAINING  connections 3/100',
      '',
      'LISTENER        BIND                       WORKERS  QUEUE  ACTIVE  CLIENTS  REJECTED',
      'tls             127.0.0.1:8443,[::1]:8443  3/64     0/10   3       2        5',
      'old (draining)  -                          0/1      0/0    0       0        0',
      '',
      'tls rejections: ip_limit 4, queue_full 1',
      'tls routes: api 2, fallback 1',
      'tls top clients: 192.0.2.1 x2, 2001:db8::/64 x1',
      'old routes: x 0',
      '',
    ].join('\n'),
  );
});

test('descriptorsNeeded counts two per slot, one per queued connection and listening socket, plus headroom', () => {
  const toml = (maxConnections: number): string => `
[limits]
max_connections = ${maxConnections}
[[listeners]]
name = "a"
bind = ["127.0.0.1:0", "127.0.0.1:1"]
workers = 10
queue = 5
  [[listeners.routes]]
  name = "r"
  default = true
  backends = ["127.0.0.1:9"]
[[listeners]]
name = "b"
bind = ["127.0.0.1:2"]
workers = 20
queue = 0
  [[listeners.routes]]
  name = "r"
  default = true
  backends = ["127.0.0.1:9"]
`;
  assert.equal(descriptorsNeeded(configFrom(toml(0))), 2 * 30 + 5 + 3 + 64);
  assert.equal(descriptorsNeeded(configFrom(toml(12))), 2 * 12 + 5 + 3 + 64, 'slots are capped by max_connections');
  assert.equal(fdLimitWarning(configFrom(toml(0))), null, 'a small config fits any sane limit');
});

test('the open-file warning fires when the config needs more descriptors than the process may open', { timeout: 15_000 }, async (t) => {
  const limit = openFileLimit();
  if (limit === null || limit === Infinity) return t.skip('no finite limit in /proc/self/limits');
  const needing = (workers: number): string => `
[limits]
max_connections = 0
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
workers = ${workers}
queue = 0
  [[listeners.routes]]
  name = "r"
  default = true
  backends = ["127.0.0.1:9"]
`;
  const warning = fdLimitWarning(configFrom(needing(limit)));
  assert.deepEqual(warning?.fields, { limit, needed: 2 * limit + 1 + 64 });
  assert.match(warning!.message, /LimitNOFILE/);

  // The real process under `ulimit -n 256` logs it at start and keeps running.
  const proxy = await startCli(t, needing(200), { ready: ['tcp'], nofile: 256 });
  const logged = await proxy.waitForLine((l) => typeof l.msg === 'string' && l.msg.startsWith('open-file limit is below'), { what: 'the fd warning' });
  assert.deepEqual({ limit: logged.limit, needed: logged.needed, level: logged.level }, { limit: 256, needed: 2 * 200 + 1 + 64, level: 'warn' });
  proxy.child.kill('SIGTERM');
  await assertCleanExit(proxy);
});
