// [cluster]: several instances (in-process daemons with distinct `instance` names, and a CLI
// daemon where a process must die) share per-client limits through one Redis the test starts.
import assert from 'node:assert/strict';
import type net from 'node:net';
import { test } from 'node:test';
import type { ClusterMode } from '../src/cluster/cluster.ts';
import { redactRedisUrl, parseRedisUrl } from '../src/cluster/redis-url.ts';
import { storeErrorKind } from '../src/cluster/store.ts';
import type { Daemon } from '../src/daemon.ts';
import { admission } from './support/clients.ts';
import { configFrom, connect, startBackend, startProxy, type ProxyUnderTest } from './support/harness.ts';
import { adminGet, listeningPorts, startCli, tempDir } from './support/cli.ts';
import type { DaemonStats } from '../src/admin/stats.ts';
import { renderStatus } from '../src/admin/status.ts';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { dumpConfig } from '../src/config/dump.ts';
import { explain, type ListenerExplanation } from '../src/explain.ts';
import { formatIssue, parseConfigText } from '../src/config/load.ts';
import { metricValue } from './support/metrics.ts';
import { modeIs, startRedis, type TestRedis } from './support/redis.ts';

function rejectionMetric(daemon: Daemon, listener: string, reason: string): Promise<number> {
  return metricValue(daemon, 'smartproxy_rejections_total', { listener, reason });
}

interface ClusterOptions {
  readonly instance: string;
  readonly perIp?: number;
  readonly localPerIp?: number;
  readonly rate?: string;
  readonly extra?: string;
  readonly listener?: string;
}

/**
 * Generous: on a busy machine a 20 ms store call can time out, and the event loop would then be
 * degraded for a second (local limits), which is not what most tests are about. The tests of
 * timeouts set their own.
 */
const STORE_TIMEOUT = 'timeout = "1s"';

function clusterToml(redis: TestRedis, backendPort: number, o: ClusterOptions): string {
  return `
[limits]
max_connections_per_ip = ${o.perIp ?? 0}
${o.rate !== undefined ? `connection_rate_per_ip = ${o.rate}` : ''}

[cluster]
redis = "${redis.url}"
instance = "${o.instance}"
${o.extra?.includes('timeout') === true ? '' : STORE_TIMEOUT}
${o.extra ?? ''}

[[listeners]]
name = "tcp"
bind = "127.0.0.1:0"
${o.listener ?? ''}
  [[listeners.routes]]
  name = "all"
  default = true
  backends = "127.0.0.1:${backendPort}"
`;
}

async function startInstances(t: Parameters<typeof startProxy>[0], redis: TestRedis, backendPort: number, list: ClusterOptions[]): Promise<ProxyUnderTest[]> {
  const proxies: ProxyUnderTest[] = [];
  for (const o of list) proxies.push(await startProxy(t, clusterToml(redis, backendPort, o)));
  await Promise.all(proxies.map((p) => modeIs(p.daemon, 'ok')));
  return proxies;
}

/** A connection relayed end to end (one echo round trip), kept open. */
async function hold(port: number): Promise<net.Socket | null> {
  let socket: net.Socket;
  try {
    socket = await connect(port);
  } catch {
    return null;
  }
  return new Promise((resolve) => {
    socket.once('data', () => resolve(socket));
    socket.once('error', () => resolve(null));
    socket.once('close', () => resolve(null));
    socket.write('x');
  });
}

test('max_connections_per_ip = 10 holds across three instances together and frees as connections close', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const proxies = await startInstances(t, redis, backend.port, [
    { instance: 'a', perIp: 10 },
    { instance: 'b', perIp: 10 },
    { instance: 'c', perIp: 10 },
  ]);
  const ports = proxies.map((p) => p.port('tcp'));
  const held: net.Socket[] = [];
  for (let i = 0; i < 10; i++) {
    const socket = await hold(ports[i % 3]!);
    assert.ok(socket !== null, `connection ${i + 1} of 10 is admitted`);
    held.push(socket);
  }
  for (const port of ports) assert.equal(await admission(port), 'reset', 'the 11th, on any instance, is refused');
  assert.equal(await rejectionMetric(proxies[0]!.daemon, 'tcp', 'cluster_ip_limit'), 1);
  assert.deepEqual(proxies.map((p) => p.daemon.cluster.leases), [4, 3, 3]);
  const stats = await proxies[0]!.daemon.stats();
  assert.deepEqual(stats.cluster, { mode: 'ok', leases: 4 });
  assert.match(renderStatus(stats), /^cluster store ok {2}connections counted in it 4$/m);
  // Three close (one on each instance): three places come back, wherever the client goes next.
  for (const i of [0, 1, 2]) {
    const socket = held.shift()!;
    const closed = new Promise((r) => socket.once('close', r));
    socket.end();
    await closed;
  }
  await Promise.all(proxies.map((p) => until(() => p.daemon.registry.size === p.daemon.cluster.leases)));
  for (let i = 0; i < 3; i++) {
    const socket = await hold(ports[2]!);
    assert.ok(socket !== null, `freed place ${i + 1} is taken on instance c`);
    held.push(socket);
  }
  assert.equal(await admission(ports[2]!), 'reset');
  assert.equal((await redis.counts()).size, 3, 'one field per instance');
  for (const s of held) s.destroy();
  await Promise.all(proxies.map((p) => until(() => p.daemon.registry.size === 0)));
  await until(() => proxies.every((p) => p.daemon.cluster.leases === 0));
  assert.deepEqual([...(await waitCounts(redis, 0)).values()], []);
});

/** The concurrency fields once `n` of them remain (releases are sent on the next tick), or after 5 s. */
async function waitCounts(redis: TestRedis, n: number): Promise<Map<string, number>> {
  const deadline = Date.now() + 5000;
  let counts = await redis.counts();
  while (counts.size !== n && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 10));
    counts = await redis.counts();
  }
  return counts;
}

async function until(predicate: () => boolean, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setImmediate(r));
  }
}

test('a client\'s rate over three instances together stays within count', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const rate = '{ count = 10, per = "10s" }';
  const proxies = await startInstances(t, redis, backend.port, [
    { instance: 'a', rate },
    { instance: 'b', rate },
    { instance: 'c', rate },
  ]);
  const ports = proxies.map((p) => p.port('tcp'));
  const outcomes: string[] = [];
  for (let i = 0; i < 30; i++) outcomes.push(await admission(ports[i % 3]!));
  // Without [cluster] each instance would admit 10 (30 in all); together they admit 10.
  assert.equal(outcomes.filter((o) => o === 'relayed').length, 10, outcomes.join(' '));
  assert.deepEqual(outcomes.slice(0, 10), Array(10).fill('relayed'));
  let refusedByCluster = 0;
  for (const p of proxies) refusedByCluster += await rejectionMetric(p.daemon, 'tcp', 'cluster_ip_rate');
  assert.equal(refusedByCluster, 20);
});

test('connections closed in one event-loop turn give back their counts in one call, and after churn the store holds exactly what the instance holds', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const [proxy] = await startInstances(t, redis, backend.port, [{ instance: 'a', perIp: 1000, extra: 'lease_ttl = "5m"' }]);
  const port = proxy!.port('tcp');
  const daemon = proxy!.daemon;
  // Churn: 4 clients (127.0.0.1-4), 40 at a time, 400 connections opened and closed.
  let next = 0;
  await Promise.all(Array.from({ length: 40 }, async () => {
    while (next < 400) {
      const i = next++;
      const socket = await connect(port, { localAddress: `127.0.0.${1 + (i % 4)}` });
      await new Promise((resolve) => {
        socket.once('data', resolve);
        socket.write('x');
      });
      socket.destroy();
    }
  }));
  // Then each client holds 3 + its number.
  const held: net.Socket[] = [];
  for (let c = 1; c <= 4; c++) {
    for (let k = 0; k < 3 + c; k++) {
      const socket = await connect(port, { localAddress: `127.0.0.${c}` });
      await new Promise((resolve) => {
        socket.once('data', resolve);
        socket.write('x');
      });
      held.push(socket);
    }
  }
  await until(() => daemon.registry.size === 22 && daemon.cluster.leases === 22);
  const counts = await waitCounts(redis, 4);
  assert.deepEqual([...counts.values()].sort(), [4, 5, 6, 7]);
  const before = await redis.scriptCalls();
  daemon.listeners.get('tcp')!.closeAll('shutdown');
  assert.equal(daemon.cluster.leases, 0);
  assert.equal((await waitCounts(redis, 0)).size, 0);
  assert.equal(await redis.scriptCalls(), before + 1, 'one release call for the 22 connections of the 4 clients');
  for (const s of held) s.destroy();
});

test('a renewal writes the counts of 300 clients in 3 script calls (128 clients a call), with every count and expiry', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const [proxy] = await startInstances(t, redis, backend.port, [{ instance: 'a', perIp: 5, extra: 'lease_ttl = "3s"' }]);
  const port = proxy!.port('tcp');
  // 300 clients (127.1.0.0 + i), one connection each.
  const held = await Promise.all(Array.from({ length: 300 }, async (_x, i) => {
    const socket = await connect(port, { localAddress: `127.1.${i >> 8}.${i & 255}` });
    await new Promise((resolve) => {
      socket.once('data', resolve);
      socket.write('x');
    });
    return socket;
  }));
  t.after(() => {
    for (const s of held) s.destroy();
  });
  assert.equal((await waitCounts(redis, 300)).size, 300);
  const expiries = async (): Promise<number[]> => {
    const keys = await redis.client.keys('*:c');
    return Promise.all(keys.map(async (key) => Number(Object.entries(await redis.client.hgetall(key)).find(([f]) => f.endsWith('#e'))![1])));
  };
  const before = await redis.scriptCalls();
  const latest = Math.max(...(await expiries()));
  // Once every expiry is past the latest one seen, at least one whole renewal ran since `before`.
  await untilAsync(async () => Math.min(...(await expiries())) > latest, 5000);
  const calls = (await redis.scriptCalls()) - before;
  // One or two renewals ran in between (a slow machine may fit a few more): 3 calls each, where one
  // call per client would be 300 each.
  assert.ok(calls >= 3 && calls <= 12 && calls % 3 === 0, `${calls} script calls: 3 per renewal of 300 clients, not one per client`);
  assert.deepEqual([...new Set((await redis.counts()).values())], [1], 'every client holds 1');
});

test('a locally refused connection makes no Redis call', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  // lease_ttl long enough that no renewal runs during the test.
  const [proxy] = await startInstances(t, redis, backend.port, [{ instance: 'a', perIp: 1, extra: 'lease_ttl = "5m"' }]);
  const port = proxy!.port('tcp');
  const first = await hold(port);
  assert.ok(first !== null);
  const before = await redis.scriptCalls();
  for (let i = 0; i < 5; i++) assert.equal(await admission(port), 'reset');
  assert.equal(await rejectionMetric(proxy!.daemon, 'tcp', 'ip_limit'), 5, 'refused by the local check');
  assert.equal(await redis.scriptCalls(), before, 'no script ran for them');
  first.destroy();
  await until(() => proxy!.daemon.registry.size === 0);
  assert.equal(await admission(port), 'relayed');
  assert.ok((await redis.scriptCalls()) > before, 'an admitted connection does call (the check can fail)');
});

test('Redis stopped: local, open and closed each do what they say at once; Redis back: cluster limits again without a restart', { timeout: 60_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const [local, open, closed] = await startInstances(t, redis, backend.port, [
    { instance: 'local', perIp: 2, extra: 'on_store_failure = "local"' },
    { instance: 'open', perIp: 2, extra: 'on_store_failure = "open"' },
    { instance: 'closed', perIp: 2, extra: 'on_store_failure = "closed"' },
  ]);
  const [lp, op, cp] = [local!, open!, closed!].map((p) => p.port('tcp')) as [number, number, number];
  const held: net.Socket[] = [];
  held.push((await hold(lp))!);
  held.push((await hold(op))!);
  assert.equal(await admission(cp), 'reset', 'the cluster is at 2');

  await redis.stop();
  await Promise.all([local!, open!, closed!].map((p) => modeIs(p.daemon, 'degraded')));
  const started = Date.now();
  // local: this instance's own limit (2, one held here already).
  held.push((await hold(lp))!);
  assert.equal(await admission(lp), 'reset');
  // open: no per-client limit at all.
  for (let i = 0; i < 3; i++) held.push((await hold(op))!);
  assert.equal(held.filter((s) => s === null).length, 0);
  // closed: refused, cluster_unavailable.
  assert.equal(await admission(cp), 'reset');
  assert.ok(Date.now() - started < 2000, 'no admission waited for the store');
  assert.equal(await rejectionMetric(closed!.daemon, 'tcp', 'cluster_unavailable'), 1);
  assert.equal(await rejectionMetric(local!.daemon, 'tcp', 'ip_limit'), 1);
  const warnings = local!.lines.filter((l) => l.msg === 'cluster store unavailable: on_store_failure applies');
  assert.equal(warnings.length, 1, 'the change is logged once');

  await redis.start();
  await Promise.all([local!, open!, closed!].map((p) => modeIs(p.daemon, 'ok')));
  // The restarted Redis knew nothing; each instance republished what it holds: 2 + 4.
  const counts = await redis.counts();
  assert.deepEqual([...counts.values()].sort(), [2, 4]);
  for (const port of [lp, op, cp]) assert.equal(await admission(port), 'reset', 'over the cluster limit again');
  for (const s of held) s.destroy();
  await Promise.all([local!, open!, closed!].map((p) => until(() => p.daemon.registry.size === 0)));
  assert.equal((await waitCounts(redis, 0)).size, 0);
  assert.equal(await admission(cp), 'relayed');
});

test('a silent Redis costs at most one timeout: then the breaker answers at once, and a close before the answer gives back its count', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const [proxy] = await startInstances(t, redis, backend.port, [
    { instance: 'a', perIp: 5, extra: 'timeout = "2s"', listener: 'workers = 1\nqueue = 4\nqueue_timeout = "100ms"' },
  ]);
  const port = proxy!.port('tcp');
  const first = await hold(port);
  assert.ok(first !== null);
  redis.freeze();
  // Queued behind the busy worker and waiting for the store: queue_timeout closes it first.
  const queued = await connect(port);
  const queuedClosed = new Promise((r) => queued.once('close', r));
  queued.on('error', () => {});
  await queuedClosed;
  assert.equal(await rejectionMetric(proxy!.daemon, 'tcp', 'queue_timeout'), 1);
  await modeIs(proxy!.daemon, 'degraded');
  // The answer (a timeout: the local fallback took a count) came after the close and gave it back.
  await until(() => proxy!.daemon.cluster.leases === 1);
  first.destroy();
  await until(() => proxy!.daemon.registry.size === 0);
  const started = Date.now();
  assert.equal(await admission(port), 'relayed');
  assert.ok(Date.now() - started < 1500, 'degraded: no wait for the store (timeout = 2s)');
  redis.thaw();
  await modeIs(proxy!.daemon, 'ok');
  assert.equal(await admission(port), 'relayed');
  assert.equal(proxy!.daemon.cluster.leases, 0);
});

test('a shutdown while the store is asked closes the waiting connection when the answer comes, not at the drain deadline, and counts nothing', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const [proxy] = await startInstances(t, redis, backend.port, [{ instance: 'a', perIp: 5, extra: 'timeout = "300ms"' }]);
  const daemon = proxy!.daemon;
  redis.freeze();
  t.after(() => redis.thaw());
  const client = await connect(proxy!.port('tcp'));
  client.on('error', () => {});
  const clientClosed = new Promise((r) => client.once('close', r));
  await until(() => daemon.registry.size === 1);
  const started = Date.now();
  const result = await daemon.shutdown({ drainTimeoutMs: 10_000 });
  await clientClosed;
  assert.ok(Date.now() - started < 5000, `closed after ${Date.now() - started} ms`);
  assert.deepEqual(result, { drained: 1, cut: 0 });
  assert.equal(await rejectionMetric(daemon, 'tcp', 'draining'), 1);
  assert.equal(daemon.cluster.leases, 0);
  assert.equal(backend.accepted, 0, 'never dialled');
});

test('an answer that came while the event loop was blocked past timeout is read, not timed out: the store admits the connection and stays ok', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  // "closed": a timeout would refuse the connection, and were the store declared degraded,
  // everybody would be refused for a second.
  const [proxy] = await startInstances(t, redis, backend.port, [{ instance: 'a', perIp: 5, extra: 'timeout = "200ms"\non_store_failure = "closed"' }]);
  const daemon = proxy!.daemon;
  const port = proxy!.port('tcp');
  const cluster = daemon.cluster;
  const admit = cluster.admit.bind(cluster);
  let blockMs = 0;
  cluster.admit = (tag, limits) => {
    const answer = admit(tag, limits);
    // In the accept's I/O callback, right after the call was written: the event loop stays busy
    // past the timeout while the answer waits in the socket, and the next turn runs its timers
    // before the poll phase that reads it.
    const end = performance.now() + blockMs;
    blockMs = 0;
    while (performance.now() < end);
    return answer;
  };
  // 1.5 x timeout (the old "late" rule, twice timeout, did not cover it), then 3 x.
  for (const factor of [1.5, 3]) {
    blockMs = factor * 200;
    assert.equal(await admission(port), 'relayed', `blocked ${factor} x timeout: admitted by the store`);
    assert.equal(cluster.mode, 'ok');
  }
  assert.equal(await rejectionMetric(daemon, 'tcp', 'cluster_unavailable'), 0);
  assert.equal(await metricValue(daemon, 'smartproxy_cluster_store_errors_total', { kind: 'timeout' }), 0);
  assert.equal(proxy!.lines.filter((l) => l.msg === 'cluster store unavailable: on_store_failure applies').length, 0);
});

const CLI_THREADS = 2;

test('an instance killed with SIGKILL stops counting within its lease_ttl', { timeout: 60_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const ttl = 1500;
  // Two event-loop threads: each has its own store connection and field; /stats sums them.
  const cli = await startCli(t, `[process]\nthreads = ${CLI_THREADS}\n[admin]\nlisten = "unix:{{dir}}/admin.sock"\n${clusterToml(redis, backend.port, { instance: 'doomed', perIp: 4, extra: `lease_ttl = "${ttl}ms"` })}`, { ready: ['tcp'], admin: true });
  // Every event-loop thread has its own store connection: wait until each is ok.
  for (let from = 0, i = 0; i < CLI_THREADS; i++) {
    await cli.waitForLine((l) => l.msg === 'cluster store ok: cluster-wide limits apply', { from, what: `the store ok in ${CLI_THREADS} threads` });
    from = cli.lines.findIndex((l, at) => at >= from && l.msg === 'cluster store ok: cluster-wide limits apply') + 1;
  }
  const [ports] = listeningPorts(cli.pid);
  assert.ok(ports !== undefined);
  const [survivor] = await startInstances(t, redis, backend.port, [{ instance: 'survivor', perIp: 4, extra: `lease_ttl = "${ttl}ms"` }]);
  const sp = survivor!.port('tcp');
  const held: net.Socket[] = [];
  for (let i = 0; i < 3; i++) held.push((await hold(ports))!);
  assert.equal(held.filter((s) => s === null).length, 0);
  const mine = await hold(sp);
  assert.ok(mine !== null);
  assert.equal(await admission(sp), 'reset', '3 on the doomed instance + 1 here');
  const stats = JSON.parse((await adminGet({ socketPath: path.join(cli.dir, 'admin.sock') }, '/stats')).body) as DaemonStats;
  assert.deepEqual(stats.cluster, { mode: 'ok', leases: 3 }, 'summed over the event-loop threads');
  process.kill(cli.pid, 'SIGKILL');
  const killedAt = Date.now();
  await cli.exited;
  // Its sockets are gone; its counts stay in Redis until they expire.
  let freed = 0;
  while (freed === 0) {
    const outcome = await admission(sp);
    if (outcome === 'relayed') freed = Date.now() - killedAt;
    else await new Promise((r) => setTimeout(r, 50));
    assert.ok(Date.now() - killedAt < ttl + 1000, 'counts of the killed instance expired within lease_ttl');
  }
  assert.ok(freed <= ttl + 1000, `freed after ${freed} ms`);
  mine.destroy();
  for (const s of held) s.destroy();
});

test('reload: [cluster] removed keeps the local counts, added again republishes them, a new address moves them', { timeout: 60_000 }, async (t) => {
  const redis = await startRedis(t);
  const other = await startRedis(t);
  const backend = await startBackend(t);
  const [proxy] = await startInstances(t, redis, backend.port, [{ instance: 'a', perIp: 3 }]);
  const port = proxy!.port('tcp');
  const daemon = proxy!.daemon;
  const held = [(await hold(port))!, (await hold(port))!];
  assert.deepEqual([...(await redis.counts()).values()], [2]);
  const toml = (url: string | null): string => {
    const bound = clusterToml(redis, backend.port, { instance: 'a', perIp: 3 });
    return url === null ? bound.replace(/\[cluster\][^[]*/, '') : bound.replace(redis.url, url);
  };
  await daemon.reload(configFrom(toml(null)));
  assert.equal(daemon.cluster.mode, 'off');
  assert.equal((await waitCounts(redis, 0)).size, 0, 'the instance left the cluster');
  assert.equal(await admission(port), 'relayed', 'the local limit: 2 held of 3');
  held.push((await hold(port))!);
  assert.equal(await admission(port), 'reset', 'the local count survived the reload');
  held.pop()!.destroy();
  await until(() => daemon.registry.size === 2);

  await daemon.reload(configFrom(toml(redis.url)));
  await modeIs(daemon, 'ok');
  assert.deepEqual([...(await redis.counts()).values()], [2], 'the two leases taken with [cluster] are published again');

  await daemon.reload(configFrom(toml(other.url)));
  await modeIs(daemon, 'ok');
  assert.deepEqual([...(await other.counts()).values()], [2], 'the new store has them');
  assert.equal((await waitCounts(redis, 0)).size, 0, 'the old one no longer');
  for (const s of held) s.destroy();
  await until(() => daemon.registry.size === 0);
  assert.equal((await waitCounts(other, 0)).size, 0);
});

test('behind a trusted PROXY balancer the real client named in the header is counted over the instances', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const proxyProtocol = '  [listeners.proxy_protocol]\n  trusted = ["127.0.0.0/8"]';
  const [a, b] = await startInstances(t, redis, backend.port, [
    { instance: 'a', perIp: 1, listener: proxyProtocol },
    { instance: 'b', perIp: 1, listener: proxyProtocol },
  ]);
  const viaBalancer = async (port: number, client: string): Promise<net.Socket | null> => {
    const socket = await connect(port);
    return new Promise((resolve) => {
      socket.once('data', () => resolve(socket));
      socket.once('error', () => resolve(null));
      socket.once('close', () => resolve(null));
      socket.write(`PROXY TCP4 ${client} 127.0.0.1 40000 443\r\nx`);
    });
  };
  const first = await viaBalancer(a!.port('tcp'), '192.0.2.1');
  assert.ok(first !== null, 'relayed once the store admitted it');
  assert.equal(await viaBalancer(b!.port('tcp'), '192.0.2.1'), null, 'the same client through the other instance');
  assert.equal(await rejectionMetric(b!.daemon, 'tcp', 'cluster_ip_limit'), 1);
  const other = await viaBalancer(b!.port('tcp'), '192.0.2.2');
  assert.ok(other !== null, 'another client is not affected');
  first.destroy();
  other.destroy();
  await Promise.all([a!, b!].map((p) => until(() => p.daemon.registry.size === 0 && p.daemon.cluster.leases === 0)));
});

test('password_file: the password is read from it (never logged); a wrong one is an auth error and degraded; an unreadable one fails the start and a reload', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t, { password: 's3cret-pw' });
  const backend = await startBackend(t);
  const dir = tempDir(t);
  const good = path.join(dir, 'good');
  const bad = path.join(dir, 'bad');
  writeFileSync(good, 's3cret-pw\n');
  writeFileSync(bad, 'nope\n');
  const toml = (file: string): string => clusterToml(redis, backend.port, { instance: 'a', perIp: 1, extra: `password_file = "${file}"` });
  const ok = await startProxy(t, toml(good), { logLevel: 'info' });
  await modeIs(ok.daemon, 'ok');
  const held = await hold(ok.port('tcp'));
  assert.ok(held !== null);
  assert.equal(await admission(ok.port('tcp')), 'reset');
  const wrong = await startProxy(t, toml(bad), { logLevel: 'info' });
  await untilAsync(async () => (await metricValue(wrong.daemon, 'smartproxy_cluster_store_errors_total', { kind: 'auth' })) > 0);
  assert.equal(wrong.daemon.cluster.mode, 'degraded');
  assert.equal(await admission(wrong.port('tcp')), 'relayed', 'on_store_failure = "local": its own limit');
  for (const line of [...ok.lines, ...wrong.lines]) assert.ok(!JSON.stringify(line).includes('s3cret'), JSON.stringify(line));
  await assert.rejects(startProxy(t, toml(path.join(dir, 'missing'))), /password_file .*missing: cannot read it \(ENOENT\)/);
  await assert.rejects(ok.daemon.reload(configFrom(toml(path.join(dir, 'missing')))), /cannot read it/);
  assert.equal(ok.daemon.cluster.mode, 'ok', 'the failed reload changed nothing');
  assert.equal(await admission(ok.port('tcp')), 'reset');
  // The password rotated: the same file, new content; a reload reads it and reconnects.
  await redis.client.config('SET', 'requirepass', 'n3w-pw');
  writeFileSync(good, 'n3w-pw\n');
  const switched = new Promise<void>((resolve) => {
    const seen: ClusterMode[] = [];
    const listener = (mode: ClusterMode): void => {
      seen.push(mode);
      if (seen.join(',') === 'degraded,ok') {
        ok.daemon.cluster.modeListeners.delete(listener);
        resolve();
      }
    };
    ok.daemon.cluster.modeListeners.add(listener);
  });
  await ok.daemon.reload(configFrom(toml(good)));
  await switched;
  assert.equal(await admission(ok.port('tcp')), 'reset', 'its lease republished with the new connection');
  held.destroy();
});

async function untilAsync(predicate: () => Promise<boolean>, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 10));
  }
}

test('check-config --dump writes [cluster] with the URL password redacted', () => {
  const config = configFrom(`[cluster]\nredis = "redis://u:topsecret@127.0.0.1:1/2"\ninstance = "x"\n[[listeners]]\nname = "l"\nbind = "127.0.0.1:0"\n[[listeners.routes]]\nname = "r"\ndefault = true\nbackends = "127.0.0.1:1"\n`);
  const text = dumpConfig(config);
  assert.match(text, /^redis = "redis:\/\/u:redacted@127\.0\.0\.1:1\/2"$/m);
  assert.ok(!text.includes('topsecret'));
  const reloaded = parseConfigText(text, 'dump.toml');
  assert.ok(reloaded.ok);
  assert.deepEqual({ ...reloaded.config.cluster, redis: '' }, { ...config.cluster, redis: '' });
});

test('check-config --explain says which per-client limits are cluster-wide and what a store failure does', () => {
  const config = configFrom(`[limits]\nmax_connections_per_ip = 5\n[cluster]\nredis = "redis://127.0.0.1:1"\non_store_failure = "closed"\nlimits = ["max_connections_per_ip"]\n[[listeners]]\nname = "l"\nbind = "127.0.0.1:0"\n[[listeners.routes]]\nname = "r"\ndefault = true\nbackends = "127.0.0.1:1"\n`);
  const [listener] = explain(config, { client: '10.0.0.1', sni: null, listener: null }) as ListenerExplanation[];
  const step = listener!.steps.find((s) => s.startsWith('[cluster]'));
  assert.match(step ?? '', /^\[cluster\]: max_connections_per_ip also over every instance together.*on_store_failure = "closed", cluster_unavailable/);
  const off = configFrom(`[cluster]\nredis = "redis://127.0.0.1:1"\n[[listeners]]\nname = "l"\nbind = "127.0.0.1:0"\n[[listeners.routes]]\nname = "r"\ndefault = true\nbackends = "127.0.0.1:1"\n`);
  const [plain] = explain(off, { client: '10.0.0.1', sni: null, listener: null }) as ListenerExplanation[];
  assert.ok(plain!.steps.includes('[cluster]: no per-client limit of this listener is cluster-wide: the store is not asked'));
});

test('the Redis address is checked, and a password in it is never shown', () => {
  assert.deepEqual(parseRedisUrl('redis://u:p%40ss@127.0.0.1:7000/3'), {
    ok: true,
    target: { host: '127.0.0.1', port: 7000, tls: false, db: 3, username: 'u', password: 'p@ss' },
  });
  assert.deepEqual(parseRedisUrl('rediss://[::1]'), { ok: true, target: { host: '::1', port: 6379, tls: true, db: 0 } });
  assert.deepEqual(parseRedisUrl('unix:/run/redis.sock?db=2'), { ok: true, target: { path: '/run/redis.sock', tls: false, db: 2 } });
  for (const bad of ['http://x', 'redis://', 'redis://h/x', 'redis://h/1?a=b', 'unix:relative', 'unix:/s?x=1', 'not a url']) {
    assert.equal(parseRedisUrl(bad).ok, false, bad);
  }
  assert.equal(redactRedisUrl('redis://user:secret@h:1/0'), 'redis://user:redacted@h:1/0');
  assert.equal(redactRedisUrl('rediss://:secret@h'), 'rediss://:redacted@h');
  assert.equal(redactRedisUrl('redis://h:1'), 'redis://h:1');
  const result = parseConfigIssues('[cluster]\nredis = "http://u:secret@h"\n');
  assert.ok(!result.includes('secret'), result);
  assert.match(result, /cluster\.redis/);
  assert.equal(storeErrorKind(new Error('Command timed out')), 'timeout');
  assert.equal(storeErrorKind(new Error("Stream isn't writeable and enableOfflineQueue options is false")), 'connection');
  assert.equal(storeErrorKind(new Error('WRONGPASS invalid username-password pair')), 'auth');
  assert.equal(storeErrorKind(new Error('OOM command not allowed')), 'oom');
  assert.equal(storeErrorKind(new Error('READONLY You can\'t write against a read only replica.')), 'readonly');
  assert.equal(storeErrorKind(new Error('ERR Error running script')), 'script');
  assert.equal(storeErrorKind('weird'), 'other');
});

function parseConfigIssues(prefix: string): string {
  const result = parseConfigText(`${prefix}\n[[listeners]]\nname = "l"\nbind = "127.0.0.1:0"\n[[listeners.routes]]\nname = "r"\ndefault = true\nbackends = "127.0.0.1:1"\n`, 'x.toml');
  return result.ok ? '' : result.issues.map(formatIssue).join('\n');
}

test('an admission that timed out after Redis ran it leaves no phantom count: the next renewal writes the ledger\'s 0 over it', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  // lease_ttl long: the phantom would otherwise stay for 30 s (and each admission of that client
  // would push it on); only a renewal can remove it within the test.
  const [proxy] = await startInstances(t, redis, backend.port, [{ instance: 'a', perIp: 5, extra: 'timeout = "200ms"\non_store_failure = "closed"\nlease_ttl = "30s"' }]);
  const daemon = proxy!.daemon;
  // Redis holds every command for 600 ms, then runs it: the admission times out here first.
  await redis.client.call('CLIENT', 'PAUSE', '600', 'ALL');
  assert.equal(await admission(proxy!.port('tcp')), 'reset', 'closed: refused, cluster_unavailable');
  assert.equal(await rejectionMetric(daemon, 'tcp', 'cluster_unavailable'), 1);
  assert.equal(await metricValue(daemon, 'smartproxy_cluster_store_errors_total', { kind: 'timeout' }), 1);
  await modeIs(daemon, 'ok');
  assert.equal(daemon.cluster.leases, 0);
  assert.deepEqual([...(await waitCounts(redis, 0)).values()], [], 'the count Redis took for the refused connection is gone');
});

test('an instance restarted under the same name counts under a field of its own: the dead process\'s counts expire within lease_ttl', { timeout: 60_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const ttl = 1500;
  const toml = clusterToml(redis, backend.port, { instance: 'same', perIp: 2, extra: `lease_ttl = "${ttl}ms"` });
  const cli = await startCli(t, `[process]\nthreads = 1\n${toml}`, { ready: ['tcp'] });
  await cli.waitForLine((l) => l.msg === 'cluster store ok: cluster-wide limits apply', { from: 0, what: 'the store ok' });
  const [dead] = listeningPorts(cli.pid);
  assert.ok(dead !== undefined);
  const lost = await hold(dead);
  assert.ok(lost !== null);
  process.kill(cli.pid, 'SIGKILL');
  const killedAt = Date.now();
  await cli.exited;
  lost.destroy();
  // The restart: the same name, the same Redis.
  const [restarted] = await startInstances(t, redis, backend.port, [{ instance: 'same', perIp: 2, extra: `lease_ttl = "${ttl}ms"` }]);
  const port = restarted!.port('tcp');
  const mine = await hold(port);
  assert.ok(mine !== null, 'the dead one\'s 1 + this 1: within 2');
  assert.deepEqual([...(await redis.counts()).values()], [1, 1], 'two fields: the dead process\'s count was not added to');
  assert.equal(await admission(port), 'reset', 'the dead one\'s count still counts until it expires');
  let freed = 0;
  while (freed === 0) {
    if ((await admission(port)) === 'relayed') freed = Date.now() - killedAt;
    else await new Promise((r) => setTimeout(r, 50));
    assert.ok(Date.now() - killedAt < ttl + 1000, 'the dead process\'s count expired within lease_ttl');
  }
  mine.destroy();
});

test('a store that fails from the start is one warning naming the kind (a wrong password: auth)', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t, { password: 'right-pw' });
  const backend = await startBackend(t);
  const toml = clusterToml(redis, backend.port, { instance: 'a', perIp: 1 }).replace(redis.url, redis.url.replace('redis://', 'redis://:wrong-pw@'));
  const proxy = await startProxy(t, toml, { logLevel: 'info' });
  await untilAsync(async () => (await metricValue(proxy.daemon, 'smartproxy_cluster_store_errors_total', { kind: 'auth' })) >= 3, 10_000);
  assert.equal(proxy.daemon.cluster.mode, 'degraded');
  const warnings = proxy.lines.filter((l) => l.level === 'warn');
  assert.equal(warnings.length, 1, JSON.stringify(warnings));
  assert.equal(warnings[0]!.kind, 'auth');
  assert.equal(warnings[0]!.msg, 'cluster store not reached yet: on_store_failure applies');
  assert.ok(!JSON.stringify(proxy.lines).includes('wrong-pw'));
});

test('a connection dropped under calls in flight, and a refused ready check, are told apart from other errors', () => {
  const aborted = new Error('Reached the max retries per request limit (which is 0). Refer to "maxRetriesPerRequest" option for details.');
  Object.defineProperty(aborted, 'name', { value: 'MaxRetriesPerRequestError' });
  assert.equal(storeErrorKind(aborted), 'connection');
  const closed = new Error('Command aborted due to connection close');
  closed.name = 'AbortError';
  assert.equal(storeErrorKind(closed), 'connection');
  assert.equal(storeErrorKind(new Error('Ready check failed: NOAUTH Authentication required.')), 'auth');
  assert.equal(storeErrorKind(new Error('Ready check failed: LOADING Redis is loading the dataset in memory')), 'readonly');
});

test('a Redis that answers PING but refuses writes (OOM) keeps the store degraded, without flapping, until it takes writes again', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const [proxy] = await startInstances(t, redis, backend.port, [{ instance: 'a', perIp: 5, extra: 'on_store_failure = "closed"' }]);
  const daemon = proxy!.daemon;
  const port = proxy!.port('tcp');
  const modes: ClusterMode[] = [];
  daemon.cluster.modeListeners.add((mode) => modes.push(mode));
  await redis.client.config('SET', 'maxmemory', '1');
  // A client every 100 ms for 2.5 s: two recovery probes or more meanwhile.
  const deadline = Date.now() + 2500;
  while (Date.now() < deadline) {
    assert.equal(await admission(port), 'reset', 'closed: refused while Redis refuses writes');
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.deepEqual(modes, ['degraded'], 'one change, no flapping');
  assert.ok((await metricValue(daemon, 'smartproxy_cluster_store_errors_total', { kind: 'oom' })) >= 2, 'the probes wrote, and were refused');
  assert.equal(proxy!.lines.filter((l) => l.msg === 'cluster store unavailable: on_store_failure applies').length, 1);
  await redis.client.config('SET', 'maxmemory', '0');
  await modeIs(daemon, 'ok');
  assert.equal(await admission(port), 'relayed');
});

test('a count the store holds beyond the ledger is repaired by the next renewal, even once the client holds nothing and keeps coming back', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const backend = await startBackend(t);
  const ttl = 900;
  const [proxy] = await startInstances(t, redis, backend.port, [{ instance: 'a', perIp: 5, extra: `lease_ttl = "${ttl}ms"` }]);
  const daemon = proxy!.daemon;
  const port = proxy!.port('tcp');
  const first = await hold(port);
  assert.ok(first !== null);
  const [entry] = [...(await redis.counts()).keys()];
  const [key, field] = entry!.split(' ') as [string, string];
  // A phantom: one more than this event loop holds (as a call that timed out after Redis ran it).
  await redis.client.hincrby(key, field, 1);
  first.destroy();
  await until(() => daemon.cluster.leases === 0);
  // The client comes back every 100 ms, each admission pushing the field's expiry on.
  const deadline = Date.now() + 3 * ttl;
  while (Date.now() < deadline) {
    assert.equal(await admission(port), 'relayed');
    await new Promise((r) => setTimeout(r, 100));
  }
  await until(() => daemon.registry.size === 0 && daemon.cluster.leases === 0);
  await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual([...(await redis.counts()).values()], [], 'no phantom left');
});

test('a reload to a new address while an admission is out in the old store deletes that count there too, and the new store gets it', { timeout: 30_000 }, async (t) => {
  const redis = await startRedis(t);
  const other = await startRedis(t);
  const backend = await startBackend(t);
  const options = { instance: 'a', perIp: 3, extra: 'timeout = "2s"' };
  const [proxy] = await startInstances(t, redis, backend.port, [options]);
  const daemon = proxy!.daemon;
  // The old Redis runs the admission only after the reload has left it.
  await redis.client.call('CLIENT', 'PAUSE', '400', 'ALL');
  const socket = hold(proxy!.port('tcp'));
  await until(() => daemon.registry.size === 1);
  await daemon.reload(configFrom(clusterToml(redis, backend.port, options).replace(redis.url, other.url)));
  const held = await socket;
  assert.ok(held !== null, 'admitted by the old store\'s answer');
  await modeIs(daemon, 'ok');
  assert.equal(daemon.cluster.leases, 1);
  assert.deepEqual([...(await waitCounts(redis, 0)).values()], [], 'the old store: the count its late admission took is deleted');
  // At once, not at the next renewal (lease_ttl / 3 = 5 s).
  await untilAsync(async () => [...(await other.counts()).values()].join() === '1', 1000);
  held.destroy();
  await until(() => daemon.registry.size === 0);
});
