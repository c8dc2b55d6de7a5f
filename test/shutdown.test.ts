// Shutdown through the real process: SIGTERM drains, a second SIGTERM closes everything,
// shutdown_delay keeps accepting while /healthz fails.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import type net from 'node:net';
import { test } from 'node:test';
import { adminGet, startCli, type CliProxy, assertCleanExit } from './support/cli.ts';
import { admission, connectOutcome, echoRoundTrip, expectData } from './support/clients.ts';
import { closed, closedPort, connect, readAll, sha256, startBackend } from './support/harness.ts';

function config(port: number, backendPort: number, shutdown: string, admin = false): string {
  return `
${admin ? '[admin]\nlisten = "unix:{{dir}}/admin.sock"' : ''}
[shutdown]
${shutdown}
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:${port}"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backendPort}"]
`;
}

/** Sends SIGTERM and resolves once the process logged that it is stopping. */
async function terminate(proxy: CliProxy): Promise<void> {
  const from = proxy.lines.length;
  proxy.child.kill('SIGTERM');
  await proxy.waitForLine((l) => l.msg === 'stopping', { from, what: '"stopping"' });
}

/** A relayed connection, proven by one echo round trip; answers the proxy's FIN (allowHalfOpen). */
async function relayed(port: number): Promise<net.Socket> {
  const socket = await connect(port);
  socket.write('hello');
  await expectData(socket, 'hello');
  socket.on('end', () => socket.end());
  return socket;
}

test('SIGTERM lets an established connection finish within drain_timeout, intact, and the process exits 0', { timeout: 20_000 }, async (t) => {
  const backend = await startBackend(t);
  const port = await closedPort();
  const proxy = await startCli(t, config(port, backend.port, 'drain_timeout = "10s"'), { ready: ['tcp'] });
  const payload = randomBytes(8 << 20);
  const half = payload.length / 2;
  const client = await connect(port);
  const received = readAll(client);
  let echoed = 0;
  client.on('data', (chunk: Buffer) => (echoed += chunk.length));
  client.write(payload.subarray(0, half));
  while (echoed === 0) await once(client, 'data');

  await terminate(proxy);
  // The listener closes in the tick after "stopping" is logged: a connect racing it may still
  // complete in the kernel's backlog and is then reset; none is ever relayed.
  assert.match(await admission(port), /^(refused|reset)$/, 'no new connection is served once draining');
  assert.ok(echoed < payload.length);
  client.end(payload.subarray(half));
  const { data, error } = await received;
  assert.equal(error, null);
  assert.equal(sha256(data), sha256(payload));

  await assertCleanExit(proxy);
  const stopped = proxy.lines.find((l) => l.msg === 'stopped');
  assert.deepEqual({ drained: stopped?.drained, cut: stopped?.cut }, { drained: 1, cut: 0 });
});

test('a connection still open at drain_timeout is cut at the deadline and the log counts drained and cut', { timeout: 20_000 }, async (t) => {
  const backend = await startBackend(t);
  const port = await closedPort();
  const proxy = await startCli(t, config(port, backend.port, 'drain_timeout = "500ms"'), { ready: ['tcp'] });
  const finishing = await relayed(port);
  const lingering = await relayed(port);
  const lingeringClosed = closed(lingering);

  const sentAt = Date.now();
  await terminate(proxy);
  const finished = readAll(finishing);
  finishing.end();
  assert.equal((await finished).error, null);
  await lingeringClosed;
  const cutAfter = Date.now() - sentAt;
  assert.ok(cutAfter >= 480, `cut after ${cutAfter} ms, before the 500 ms deadline`);
  assert.ok(cutAfter < 5000, `cut after ${cutAfter} ms`);

  await assertCleanExit(proxy);
  const stopped = proxy.lines.find((l) => l.msg === 'stopped');
  assert.deepEqual({ drained: stopped?.drained, cut: stopped?.cut }, { drained: 1, cut: 1 });
});

test('a second SIGTERM closes every connection at once', { timeout: 20_000 }, async (t) => {
  const backend = await startBackend(t);
  const port = await closedPort();
  const proxy = await startCli(t, config(port, backend.port, 'drain_timeout = "60s"'), { ready: ['tcp'] });
  const first = await relayed(port);
  const second = await relayed(port);
  const bothClosed = Promise.all([closed(first), closed(second)]);

  await terminate(proxy);
  first.write('still relayed while draining');
  await expectData(first, 'still relayed while draining');
  const sentAt = Date.now();
  proxy.child.kill('SIGTERM');
  await bothClosed;
  await assertCleanExit(proxy);
  assert.ok(Date.now() - sentAt < 5000, 'closed at once, not after drain_timeout');
  assert.ok(proxy.lines.some((l) => l.msg === 'second stop signal: closing every connection now'));
  const stopped = proxy.lines.find((l) => l.msg === 'stopped');
  assert.deepEqual({ drained: stopped?.drained, cut: stopped?.cut }, { drained: 0, cut: 2 });
});

test('during shutdown_delay /healthz answers 503 while new connections are still accepted', { timeout: 20_000 }, async (t) => {
  const backend = await startBackend(t);
  const port = await closedPort();
  const proxy = await startCli(t, config(port, backend.port, 'drain_timeout = "5s"\nshutdown_delay = "1s"', true), { ready: ['tcp'], admin: true });
  const admin = { socketPath: `${proxy.dir}/admin.sock` };
  assert.deepEqual(await adminGet(admin, '/healthz'), { status: 200, body: 'ok\n' });

  const sentAt = Date.now();
  await terminate(proxy);
  assert.deepEqual(await adminGet(admin, '/healthz'), { status: 503, body: 'draining\n' });
  assert.equal(await echoRoundTrip(port, 'accepted during the delay'), null);
  const lateButOpen = await relayed(port);
  assert.ok(Date.now() - sentAt < 1000, 'checked within the delay');

  // After the delay the listener stops accepting (nothing is logged then: /stats is polled);
  // the connection opened during the delay drains.
  for (;;) {
    const stats = JSON.parse((await adminGet(admin, '/stats')).body) as { listeners: Array<{ draining: boolean }> };
    if (stats.listeners[0]!.draining) break;
    assert.ok(Date.now() - sentAt < 5000, 'the listener never began draining');
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.ok(Date.now() - sentAt >= 1000, 'drain began only after shutdown_delay');
  assert.equal(await connectOutcome(port), 'ECONNREFUSED');
  const finished = readAll(lateButOpen);
  lateButOpen.end();
  assert.equal((await finished).error, null);
  await assertCleanExit(proxy);
  const stopped = proxy.lines.find((l) => l.msg === 'stopped');
  assert.deepEqual({ drained: stopped?.drained, cut: stopped?.cut }, { drained: 1, cut: 0 });
});
