// 2,000 connections ending every way a connection can end, then proof that nothing was kept:
// no connection, slot, queue entry, route count, client entry, socket or timer survives them.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type net from 'node:net';
import { test } from 'node:test';
import type { Connection } from '../src/connection/connection.ts';
import { startBlackhole } from './support/blackhole.ts';
import { closed, closedPort, connect, readAll, sha256, startBackend, startProxy, until } from './support/harness.ts';

const TOTAL = 2000;
const CONCURRENCY = 100;

/** How each connection ends, by index modulo the list length. */
const KINDS = [
  'normal', // echo listener: data both ways, both sides end
  'client reset mid-stream', // echo listener: RST once its bytes came back, neither side having ended
  'backend reset mid-stream', // resetting backend
  'backend refused', // a route whose only backend is a closed port
  'client gone during connect', // first backend a blackhole: the client leaves (FIN or RST) while the proxy dials
  'client gone during handshake', // SNI listener: half a ClientHello, then the client leaves (FIN or RST)
] as const;
type Kind = (typeof KINDS)[number];

/** Counts of the socket and timer handles this process holds. */
function handles(): Record<string, number> {
  const counts: Record<string, number> = { TCPSocketWrap: 0, TCPServerWrap: 0, Timeout: 0 };
  for (const name of process.getActiveResourcesInfo()) if (name in counts) counts[name]!++;
  return counts;
}

/** A TLS record header and the start of a ClientHello: routing needs more, so it waits. */
const HALF_HELLO = Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]);

test(`${TOTAL} connections with mixed endings leave no connection, slot, count, client entry, socket or timer behind`, { timeout: 60_000 }, async (t) => {
  const echo = await startBackend(t);
  const resetter = await startBackend(t, (socket) => {
    // Reads the first chunk, then resets while the client is still sending.
    socket.once('data', () => socket.resetAndDestroy());
  });
  const refused = await closedPort();
  const blackhole = await startBlackhole(t);
  const proxy = await startProxy(
    t,
    `
[[listeners]]
name = "echo"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${echo.port}"]

[[listeners]]
name = "resetter"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "resetter"
  default = true
  backends = ["127.0.0.1:${resetter.port}"]

[[listeners]]
name = "refused"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "refused"
  default = true
  backends = ["127.0.0.1:${refused}"]
    [listeners.routes.ejection]
    consecutive_failures = 0

[[listeners]]
name = "slow"
bind = ["127.0.0.1:0"]
  [listeners.timeouts]
  connect = "200ms"
  [[listeners.routes]]
  name = "slow"
  default = true
  backends = ["127.0.0.1:${blackhole.port}", "127.0.0.1:${echo.port}"]
    [listeners.routes.ejection]
    consecutive_failures = 0   # every other dial goes to the black hole: counted below

[[listeners]]
name = "sni"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["127.0.0.1:${echo.port}"]
`,
    { logLevel: 'debug' },
  );
  const listenerOf: Record<Kind, string> = {
    normal: 'echo',
    'client reset mid-stream': 'echo',
    'backend reset mid-stream': 'resetter',
    'backend refused': 'refused',
    'client gone during connect': 'slow',
    'client gone during handshake': 'sni',
  };
  const before = handles();

  /** Resolves once the proxy's connection for this client socket satisfies `predicate`. */
  const proxied = async (client: net.Socket, predicate: (conn: Connection) => boolean): Promise<void> => {
    const { localPort, localAddress } = client;
    const deadline = Date.now() + 5000;
    for (;;) {
      for (const conn of proxy.daemon.registry.values()) {
        if (conn.clientPort === localPort && conn.clientAddress === localAddress && predicate(conn)) return;
      }
      if (Date.now() > deadline) throw new Error(`the proxy's connection for client port ${localPort} never got there`);
      await new Promise((resolve) => setImmediate(resolve));
    }
  };

  const one = async (i: number): Promise<void> => {
    const kind = KINDS[i % KINDS.length]!;
    const reset = Math.floor(i / KINDS.length) % 2 === 1; // how a leaving client leaves: FIN or RST
    // Four distinct clients, so the per-client table holds several keys at once.
    const client = await connect(proxy.port(listenerOf[kind]), { localAddress: `127.0.0.${2 + (i % 4)}` });
    const ended = closed(client);
    client.on('end', () => client.end()); // the proxy's FIN: finish our half too, so 'close' comes
    switch (kind) {
      case 'normal': {
        const payload = randomBytes(4096);
        const received = readAll(client);
        client.end(payload);
        const { data, error } = await received;
        assert.equal(error, null);
        assert.equal(sha256(data), sha256(payload));
        break;
      }
      case 'client reset mid-stream': {
        // Reset once everything sent has come back: nothing is left unread at the proxy, so it
        // sees the RST itself (libuv reports an RST that follows unread data as a plain EOF).
        let echoed = 0;
        client.on('data', (c: Buffer) => {
          echoed += c.length;
          if (echoed === 16 * 1024) client.resetAndDestroy();
        });
        client.write(randomBytes(16 * 1024));
        break;
      }
      case 'backend reset mid-stream':
        client.write(randomBytes(64 * 1024));
        break;
      case 'backend refused':
        client.write(randomBytes(4096));
        break;
      case 'client gone during connect':
        // Every other connection tries the blackhole first (round-robin) and sits in 'connecting'
        // for the connect timeout; the client is paused meanwhile, so the proxy learns that it
        // left only once the next backend answers.
        await proxied(client, (conn) => conn.state !== 'queued' && conn.state !== 'handshake');
        if (reset) client.resetAndDestroy();
        else client.destroy();
        break;
      case 'client gone during handshake':
        client.write(HALF_HELLO);
        await proxied(client, (conn) => conn.state === 'handshake' && conn.client.bytesRead === HALF_HELLO.length);
        if (reset) client.resetAndDestroy();
        else client.destroy();
        break;
    }
    await ended;
  };

  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < TOTAL) await one(next++);
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));

  const daemon = proxy.daemon;
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    daemon.registry.whenEmpty(),
    new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`${daemon.registry.size} connections left open`)), 10_000))),
  ]).finally(() => clearTimeout(timer));
  assert.equal(daemon.registry.size, 0);
  for (const listener of daemon.listeners.values()) {
    assert.equal(listener.busy, 0, `${listener.name}: busy`);
    assert.equal(listener.queue.size, 0, `${listener.name}: queue`);
    assert.equal(listener.routeActive.size, 0, `${listener.name}: route counts`);
    assert.equal(listener.clients.size, 0, `${listener.name}: client table`);
    assert.equal(listener.clients.distinctActive, 0, `${listener.name}: active clients`);
    assert.equal(listener.activeCount(), 0, `${listener.name}: active count`);
  }
  // The global slot pool: a leak there starves every listener.
  assert.equal(daemon.slotsBusy, 0, 'global slots');
  for (const listener of daemon.listeners.values()) {
    assert.equal(daemon.shared.counts.open(listener.countIndex), 0, `${listener.name}: shared open count`);
    assert.equal(daemon.shared.counts.queued(listener.countIndex), 0, `${listener.name}: shared queue count`);
  }

  // Every connection was closed exactly once, each kind for its own reason.
  const lines = proxy.lines.filter((l) => l.msg === 'connection closed') as Array<{ listener: string; reason: string }>;
  assert.equal(lines.length, TOTAL);
  const tally: Record<string, Record<string, number>> = {};
  for (const { listener, reason } of lines) {
    tally[listener] ??= {};
    tally[listener][reason] = (tally[listener][reason] ?? 0) + 1;
  }
  const count = (kind: Kind): number => KINDS.reduce((n, k, index) => (k === kind ? n + Math.ceil((TOTAL - index) / KINDS.length) : n), 0);
  assert.deepEqual(tally.echo, { done: count('normal'), client_reset: count('client reset mid-stream') });
  assert.deepEqual(tally.resetter, { backend_reset: count('backend reset mid-stream') });
  assert.deepEqual(tally.refused, { backend_unavailable: count('backend refused') });
  assert.deepEqual(tally.sni, { client_gone: count('client gone during handshake') });
  const slow = tally.slow ?? {};
  assert.equal(
    Object.values(slow).reduce((a, b) => a + b, 0),
    count('client gone during connect'),
  );
  for (const reason of Object.keys(slow)) assert.ok(['done', 'client_reset', 'client_gone'].includes(reason), `slow: ${reason}`);
  // Round-robin sent every other one of those to the blackhole first, which timed out.
  const failures = await daemon.metrics.registry.getSingleMetric('smartproxy_backend_connect_failures_total')!.get();
  const timedOut = failures.values.filter((v) => v.labels.backend === `127.0.0.1:${blackhole.port}` && v.labels.code === 'ETIMEDOUT');
  assert.equal(timedOut.reduce((n, v) => n + v.value, 0), Math.ceil(count('client gone during connect') / 2));

  // No socket or timer outlives its connection (backend sockets close a moment after the proxy's).
  const settled = (): boolean => {
    const now = handles();
    return now.TCPSocketWrap === before.TCPSocketWrap && now.TCPServerWrap === before.TCPServerWrap && now.Timeout! <= before.Timeout!;
  };
  await until(settled, 5000, 'the handles to settle').catch(() => {
    assert.deepEqual(handles(), before, 'active handles after every connection ended');
  });
  assert.equal(echo.sockets.size + resetter.sockets.size, 0, 'backend sockets');
});
