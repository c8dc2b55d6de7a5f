// Reload: in-process through daemon.reload(config), and through the real process with SIGHUP.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import net from 'node:net';
import { test } from 'node:test';
import { BindError } from '../src/listener/listener.ts';
import { adminGet, listeningPorts, startCli, TEST_THREADS, assertCleanExit } from './support/cli.ts';
import { admission, connectOutcome, echoRoundTrip, expectData } from './support/clients.ts';
import { closed, closedPort, configFrom, connect, echo, readAll, sha256, startBackend, startProxy, until } from './support/harness.ts';
import { metricValue, parseExposition, valueOf } from './support/metrics.ts';

/** A backend that first sends its name and a newline, then echoes. */
function greeter(name: string) {
  return (socket: net.Socket): void => {
    socket.write(`${name}\n`);
    echo(socket);
  };
}

test('a 32 MB transfer each way completes intact across 20 reloads', { timeout: 30_000 }, async (t) => {
  const backend = await startBackend(t);
  // Each version differs (workers, idle), so every reload swaps a real new generation.
  const toml = (k: number): string => `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
workers = ${64 + (k % 2)}
  [listeners.timeouts]
  idle = "${10 + (k % 2)}m"
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`;
  const proxy = await startProxy(t, toml(0));
  const payload = randomBytes(32 << 20);
  const client = await connect(proxy.port('tcp'));
  const received = readAll(client);
  let echoed = 0;
  client.on('data', (chunk: Buffer) => (echoed += chunk.length));

  const CHUNK = 256 << 10;
  const echoedAtReload: number[] = [];
  for (let offset = 0, i = 0; offset < payload.length; offset += CHUNK, i++) {
    if (!client.write(payload.subarray(offset, offset + CHUNK))) await once(client, 'drain');
    if (i % 6 === 5 && echoedAtReload.length < 20) {
      echoedAtReload.push(echoed);
      const result = await proxy.daemon.reload(configFrom(toml(echoedAtReload.length)));
      assert.deepEqual(result, { added: [], removed: [], changed: ['tcp'] });
      assert.equal(proxy.daemon.registry.size, 1, 'the transfer is still one open connection');
    }
  }
  client.end();
  const { data, error } = await received;

  assert.equal(echoedAtReload.length, 20);
  // The reloads happened while bytes were flowing, not before or after the transfer.
  assert.ok(echoedAtReload[0]! < payload.length && echoedAtReload[19]! > 0 && echoedAtReload[19]! < payload.length);
  assert.equal(error, null);
  assert.equal(data.length, payload.length);
  assert.equal(sha256(data), sha256(payload));
  assert.equal(backend.accepted, 1);
  await proxy.daemon.registry.whenEmpty();
  assert.equal(await metricValue(proxy.daemon, 'smartproxy_connections_closed_total', { listener: 'tcp', reason: 'done' }), 1);
  assert.equal(await metricValue(proxy.daemon, 'smartproxy_bytes_total', { direction: 'from_client' }), payload.length);
  assert.equal(await metricValue(proxy.daemon, 'smartproxy_bytes_total', { direction: 'from_backend' }), payload.length);
  assert.equal(await metricValue(proxy.daemon, 'smartproxy_config_reloads_total', { result: 'success' }), 20);
});

test('clients opening connections during 20 reloads see no refused or reset connection', { timeout: 30_000 }, async (t) => {
  const one = await startBackend(t);
  const two = await startBackend(t);
  // The route alternates between two backends, so new connections go through a swapped route table.
  const toml = (k: number): string => `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
workers = ${32 + k}
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${k % 2 === 0 ? one.port : two.port}"]
`;
  const proxy = await startProxy(t, toml(0));
  const port = proxy.port('tcp');
  const failures: string[] = [];
  let completed = 0;
  let wake: (() => void) | null = null;
  let stop = false;
  const loop = async (id: number): Promise<void> => {
    for (let n = 0; !stop; n++) {
      const problem = await echoRoundTrip(port, `client ${id} message ${n}\n`);
      if (problem !== null) failures.push(problem);
      else completed++;
      wake?.();
    }
  };
  const loops = [0, 1, 2, 3].map(loop);
  for (let k = 1; k <= 20; k++) {
    await proxy.daemon.reload(configFrom(toml(k)));
    // Let at least one connection complete under each generation before the next reload.
    const before = completed + failures.length;
    while (completed + failures.length === before) await new Promise<void>((r) => (wake = r));
  }
  stop = true;
  await Promise.all(loops);

  assert.deepEqual(failures, []);
  assert.ok(completed >= 20, `only ${completed} connections completed`);
  assert.ok(one.accepted > 0 && two.accepted > 0, 'both route versions carried connections');
  assert.equal(one.accepted + two.accepted, completed);
  await proxy.daemon.registry.whenEmpty();
  assert.equal(await metricValue(proxy.daemon, 'smartproxy_connections_accepted_total', { listener: 'tcp' }), completed);
  assert.equal(await metricValue(proxy.daemon, 'smartproxy_connections_closed_total', { listener: 'tcp', reason: 'done' }), completed);
});

test('a route changed from backend A to B takes new connections to B while an established one stays on A', { timeout: 10_000 }, async (t) => {
  const a = await startBackend(t, greeter('A'));
  const b = await startBackend(t, greeter('B'));
  const toml = (backendPort: number): string => `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "app"
  default = true
  backends = ["127.0.0.1:${backendPort}"]
`;
  const proxy = await startProxy(t, toml(a.port));
  const port = proxy.port('tcp');
  const established = await connect(port);
  await expectData(established, 'A\n');

  const result = await proxy.daemon.reload(configFrom(toml(b.port)));
  assert.deepEqual(result.changed, ['tcp']);

  const fresh = await connect(port);
  await expectData(fresh, 'B\n');
  established.write('still on A?');
  await expectData(established, 'still on A?');
  const [oldEnd, newEnd] = [readAll(established), readAll(fresh)];
  established.end();
  fresh.end();
  assert.equal((await oldEnd).error, null);
  assert.equal((await newEnd).error, null);
  assert.equal(a.accepted, 1);
  assert.equal(b.accepted, 1);
  await proxy.daemon.registry.whenEmpty();
});

for (const policy of ['keep', 'drain', 'close'] as const) {
  const outcome = {
    keep: 'finish by themselves',
    drain: 'are closed with reason removed after drain_timeout',
    close: 'are closed at once with reason removed',
  }[policy];
  test(`a removed listener refuses new connections and its established ones ${outcome} (on_removal = "${policy}")`, { timeout: 10_000 }, async (t) => {
    const backend = await startBackend(t);
    const DRAIN_MS = 400;
    const stay = `
[shutdown]
drain_timeout = "${DRAIN_MS}ms"
[[listeners]]
name = "stay"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`;
    const gone = `
[[listeners]]
name = "gone"
bind = ["127.0.0.1:0"]
on_removal = "${policy}"
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`;
    const proxy = await startProxy(t, stay + gone);
    const gonePort = proxy.port('gone');
    const established = await connect(gonePort);
    established.write('before');
    await expectData(established, 'before');
    established.on('end', () => established.end()); // the proxy's FIN is answered (allowHalfOpen)
    const ended = closed(established);

    const reloadedAt = Date.now();
    const result = await proxy.daemon.reload(configFrom(stay));
    assert.deepEqual(result.removed, ['gone']);
    assert.equal(await connectOutcome(gonePort), 'ECONNREFUSED');
    assert.equal(await echoRoundTrip(proxy.port('stay'), 'stay works'), null);

    if (policy === 'close') {
      await ended;
      assert.ok(Date.now() - reloadedAt < DRAIN_MS, 'closed at once, not after drain_timeout');
    } else {
      established.write('after');
      await expectData(established, 'after');
      if (policy === 'keep') established.end();
      await ended;
      if (policy === 'drain') assert.ok(Date.now() - reloadedAt >= DRAIN_MS - 20, `closed after ${Date.now() - reloadedAt} ms`);
    }
    await proxy.daemon.registry.whenEmpty();
    const reason = policy === 'keep' ? 'done' : 'removed';
    assert.equal(await metricValue(proxy.daemon, 'smartproxy_connections_closed_total', { listener: 'gone', reason }), 1);
    assert.equal(await metricValue(proxy.daemon, 'smartproxy_connections_closed_total', { listener: 'gone' }), 1);
    assert.equal(proxy.daemon.retired.size, 0, 'the removed listener is disposed once its last connection ended');
  });
}

test('a reload whose new address cannot be bound is rolled back whole', { timeout: 10_000 }, async (t) => {
  const a = await startBackend(t, greeter('A'));
  const b = await startBackend(t, greeter('B'));
  const blocker = await startBackend(t); // holds the port the new listener asks for
  const freePort = await closedPort();
  const before = `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "app"
  default = true
  backends = ["127.0.0.1:${a.port}"]
`;
  // Changes the route, adds an address that is free, and a listener on an address in use.
  const after = `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0", "127.0.0.1:${freePort}"]
  [[listeners.routes]]
  name = "app"
  default = true
  backends = ["127.0.0.1:${b.port}"]
[[listeners]]
name = "new"
bind = ["127.0.0.1:${blocker.port}"]
  [[listeners.routes]]
  name = "app"
  default = true
  backends = ["127.0.0.1:${b.port}"]
`;
  const proxy = await startProxy(t, before);
  const listeningBefore = listeningPorts(process.pid);

  await assert.rejects(proxy.daemon.reload(configFrom(after)), (err: unknown) => {
    assert.ok(err instanceof BindError);
    assert.equal(err.code, 'EADDRINUSE');
    assert.equal(err.listener, 'new');
    return true;
  });

  assert.deepEqual([...proxy.daemon.listeners.keys()], ['tcp']);
  assert.deepEqual(proxy.daemon.listeners.get('tcp')!.boundAddresses, ['127.0.0.1:0']);
  assert.deepEqual(listeningPorts(process.pid), listeningBefore, 'no listening socket was added or lost');
  assert.equal(await connectOutcome(freePort), 'ECONNREFUSED');
  const client = await connect(proxy.port('tcp'));
  await expectData(client, 'A\n'); // the old route still serves
  client.destroy();
  assert.equal(b.accepted, 0);
  await proxy.daemon.registry.whenEmpty();
  assert.equal(await metricValue(proxy.daemon, 'smartproxy_config_reloads_total', { result: 'success' }), 0, 'start-up is not a reload');
});

test('a client at its max_connections_per_ip stays refused after a reload', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const toml = (workers: number): string => `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
workers = ${workers}
  [listeners.limits]
  max_connections_per_ip = 2
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`;
  const proxy = await startProxy(t, toml(10));
  const port = proxy.port('tcp');
  const held: net.Socket[] = [];
  for (const word of ['one', 'two']) {
    const socket = await connect(port);
    socket.write(word);
    await expectData(socket, word);
    held.push(socket);
  }
  assert.equal(await admission(port), 'reset');

  await proxy.daemon.reload(configFrom(toml(11)));
  assert.equal(await admission(port), 'reset');
  assert.equal(await metricValue(proxy.daemon, 'smartproxy_rejections_total', { listener: 'tcp', reason: 'ip_limit' }), 2);

  // Its count is still exact: one leaves, one more gets in.
  const left = readAll(held[0]!);
  held[0]!.end();
  await left;
  await until(() => proxy.daemon.registry.size === 1, 5000, 'the proxy to release the connection that left');
  assert.equal(await echoRoundTrip(port, 'three'), null);
  held[1]!.end();
  await readAll(held[1]!);
  await proxy.daemon.registry.whenEmpty();
  assert.equal(await metricValue(proxy.daemon, 'smartproxy_connections_accepted_total', { listener: 'tcp' }), 3);
});

test('an invalid file on SIGHUP leaves the running config in force and the process running', { timeout: 20_000 }, async (t) => {
  const backend = await startBackend(t);
  const port = await closedPort();
  const toml = `
[admin]
listen = "unix:{{dir}}/admin.sock"
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:${port}"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`;
  const proxy = await startCli(t, toml, { ready: ['tcp'], admin: true });
  const admin = { socketPath: `${proxy.dir}/admin.sock` };
  const established = await connect(port);
  established.write('before');
  await expectData(established, 'before');

  // Two problems: a negative worker count, and a key routes do not have.
  proxy.writeConfig(toml.replace('default = true', 'default = true\n  workers = 4').replace(`bind = ["127.0.0.1:${port}"]`, `bind = ["127.0.0.1:${port}"]\nworkers = -1`));
  const from = proxy.lines.length;
  proxy.child.kill('SIGHUP');
  const failed = await proxy.waitForLine((l) => l.msg === 'reload failed; the previous configuration stays in force', { from, what: 'the reload failure' });
  assert.equal(failed.problems, 2);
  const rejected = proxy.lines.slice(from).filter((l) => typeof l.msg === 'string' && l.msg.startsWith('reload rejected: '));
  assert.deepEqual(rejected.map((l) => l.path).sort(), ['listeners[0].routes[0].workers', 'listeners[0].workers']);

  assert.equal(proxy.child.exitCode, null);
  established.write('after');
  await expectData(established, 'after');
  assert.equal(await echoRoundTrip(port, 'a new connection'), null);
  const metrics = parseExposition((await adminGet(admin, '/metrics')).body);
  assert.equal(valueOf(metrics.samples, 'smartproxy_config_reloads_total', { result: 'failure' }), 1);
  assert.equal(valueOf(metrics.samples, 'smartproxy_config_reloads_total', { result: 'success' }), 0);

  established.end();
  await readAll(established);
  proxy.child.kill('SIGTERM');
  await assertCleanExit(proxy);
});

test('ten SIGHUPs fired back to back end in the last file\'s config with no leaked listening socket', { timeout: 20_000 }, async (t) => {
  const backend = await startBackend(t);
  const stablePort = await closedPort();
  const ports: number[] = [];
  for (let k = 0; k <= 10; k++) ports.push(await closedPort());
  // Version k: listener "stable" with k+1 workers, and listener "v<k>" on its own port.
  const toml = (k: number): string => `
[admin]
listen = "unix:{{dir}}/admin.sock"
[[listeners]]
name = "stable"
bind = ["127.0.0.1:${stablePort}"]
workers = ${k + 1}
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
[[listeners]]
name = "v${k}"
bind = ["127.0.0.1:${ports[k]}"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`;
  const proxy = await startCli(t, toml(0), { ready: ['stable', 'v0'], admin: true });
  for (let k = 1; k <= 10; k++) {
    proxy.writeConfig(toml(k));
    proxy.child.kill('SIGHUP');
  }
  // Only a reload that read the last file adds v10; every reload queued after it reads the same file.
  await proxy.waitForLine((l) => l.msg === 'configuration reloaded' && Array.isArray(l.added) && l.added.includes('v10'), { what: 'the last file applied' });
  assert.equal(proxy.lines.filter((l) => l.msg === 'reload failed; the previous configuration stays in force').length, 0);

  const stats = JSON.parse((await adminGet({ socketPath: `${proxy.dir}/admin.sock` }, '/stats')).body) as {
    listeners: Array<{ name: string; bind: string[]; workers: number }>;
  };
  assert.deepEqual(
    stats.listeners.map((l) => ({ name: l.name, bind: l.bind, workers: l.workers })),
    [
      { name: 'stable', bind: [`127.0.0.1:${stablePort}`], workers: 11 },
      { name: 'v10', bind: [`127.0.0.1:${ports[10]}`], workers: 1024 },
    ],
  );
  // One listening socket per address and event-loop thread (SO_REUSEPORT), no more.
  const expected = [stablePort, ports[10]!].flatMap((p) => Array.from({ length: TEST_THREADS }, () => p));
  assert.deepEqual(listeningPorts(proxy.pid), expected.sort((x, y) => x - y));
  for (let k = 0; k < 10; k++) assert.equal(await connectOutcome(ports[k]!), 'ECONNREFUSED', `port of v${k}`);
  assert.equal(await echoRoundTrip(ports[10]!, 'v10 serves'), null);
  assert.equal(await echoRoundTrip(stablePort, 'stable serves'), null);

  proxy.child.kill('SIGTERM');
  await assertCleanExit(proxy);
});

test('a SIGHUP that arrives while the process is starting does not kill it and is applied once running', { timeout: 20_000 }, async (t) => {
  const backend = await startBackend(t);
  const port = await closedPort();
  // 100 more listeners on port 0 keep the process binding for a while after the first one logs.
  const extra = Array.from({ length: 100 }, (_, i) => `
[[listeners]]
name = "extra${i}"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`).join('');
  const toml = (workers: number): string => `
[admin]
listen = "unix:{{dir}}/admin.sock"
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:${port}"]
workers = ${workers}
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
${extra}`;
  const proxy = await startCli(t, toml(1), { ready: ['tcp'] });
  proxy.writeConfig(toml(2));
  proxy.child.kill('SIGHUP');
  const reloaded = await proxy.waitForLine((l) => l.msg === 'configuration reloaded', { what: 'the held reload' });
  // Sent before start-up finished: held, then applied once running.
  assert.ok(proxy.lines.findIndex((l) => l.msg === 'admin API listening') < proxy.lines.indexOf(reloaded));
  assert.ok(proxy.lines.findIndex((l) => l.msg === 'listener started' && l.listener === 'extra99') > 0);
  assert.deepEqual(reloaded.changed, ['tcp']);
  const stats = JSON.parse((await adminGet({ socketPath: `${proxy.dir}/admin.sock` }, '/stats')).body) as { listeners: Array<{ workers: number }> };
  assert.equal(stats.listeners[0]!.workers, 2);
  assert.equal(await echoRoundTrip(port, 'still serving'), null);
  proxy.child.kill('SIGTERM');
  await assertCleanExit(proxy);
});
