// Connection governance end to end: every limit admits exactly N and refuses the next, refusals
// are one RST (or FIN) before any backend is dialled, and every count returns to zero.
// Real sockets on loopback only; 127.0.0.2, .3 ... are distinct clients via `localAddress`.
import assert from 'node:assert/strict';
import net from 'node:net';
import { test, type TestContext } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import tls from 'node:tls';
import type { RejectReason } from '../src/connection/reasons.ts';
import type { Daemon } from '../src/daemon.ts';
import { clientKey } from '../src/governance/client-key.ts';
import type { Listener } from '../src/listener/listener.ts';
import {
  closed,
  connect,
  readAll,
  startBackend,
  startProxy,
  startTlsBackend,
  until,
  type Backend,
  type ProxyUnderTest,
} from './support/harness.ts';

// ---- fixtures local to this file ----

/** Backend behaviour: read and drop everything, answer FIN with FIN (a connection that stays until the client leaves). */
function hold(socket: net.Socket): void {
  socket.resume();
  socket.on('end', () => socket.end());
}

function listenerOf(proxy: ProxyUnderTest, name: string): Listener {
  const listener = proxy.daemon.listeners.get(name);
  assert.ok(listener, `listener ${name}`);
  return listener;
}

/** The global worker pool (`[limits] max_connections`): its busy count over every thread. */
function slotsOf(daemon: Daemon): { readonly busy: number } {
  return { get busy() { return daemon.slotsBusy; } };
}

/** Rejections counted by the listener so far, only the reasons that occurred. */
function rejections(listener: Listener): Partial<Record<RejectReason, number>> {
  const out: Partial<Record<RejectReason, number>> = {};
  for (const [reason, n] of Object.entries(listener.rejections.totals())) if (n > 0) out[reason as RejectReason] = n;
  return out;
}

function rejectedTotal(listener: Listener): number {
  return Object.values(listener.rejections.totals()).reduce((a, b) => a + b, 0);
}

/** The value of smartproxy_rejections_total for one listener and reason in the exposition (0 if absent). */
async function rejectionMetric(daemon: Daemon, listener: string, reason: RejectReason): Promise<number> {
  const text = await daemon.metrics.exposition();
  const m = new RegExp(`^smartproxy_rejections_total\\{listener="${listener}",reason="${reason}"\\} (\\d+)$`, 'm').exec(text);
  return m === null ? 0 : Number(m[1]);
}

/**
 * After a test: no connection left, and every count the admission path keeps is back to zero.
 * `windowMs` = the rate window in force: idle per-client entries may outlive their last
 * connection by that long (plus one sweep), and must then go by themselves.
 */
async function assertQuiescent(proxy: ProxyUnderTest, windowMs = 0): Promise<void> {
  const { daemon } = proxy;
  await daemon.registry.whenEmpty();
  assert.equal(daemon.registry.size, 0);
  for (const l of daemon.listeners.values()) {
    assert.equal(l.busy, 0, `${l.name}: workers busy`);
    assert.equal(l.queue.size, 0, `${l.name}: queue`);
    assert.deepEqual([...l.routeActive], [], `${l.name}: route counts`);
    assert.equal(l.clients.distinctActive, 0, `${l.name}: active clients`);
    if (windowMs === 0) assert.equal(l.clients.size, 0, `${l.name}: client table`);
    else await until(() => l.clients.size === 0, windowMs + 1500, `${l.name}: client table to empty`);
  }
  assert.equal(slotsOf(daemon).busy, 0, 'global slots busy');
}

interface Ending {
  /** The TCP handshake completed (the kernel accepts before the proxy decides). */
  readonly connected: boolean;
  /** Ended by RST (ECONNRESET), at connect or after. */
  readonly reset: boolean;
  readonly code: string | null;
  readonly data: Buffer;
  /** Still open when the probe gave up: the proxy admitted it. */
  readonly stillOpen: boolean;
}

/** Connects, optionally writes, and waits for the proxy to end the connection (gives up after `ms`). */
function probe(port: number, opts: { host?: string; localAddress?: string; write?: Buffer | string; ms?: number } = {}): Promise<Ending> {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: opts.host ?? '127.0.0.1', localAddress: opts.localAddress });
    let connected = false;
    let code: string | null = null;
    const chunks: Buffer[] = [];
    const giveUp = setTimeout(() => {
      socket.destroy();
      resolve({ connected, reset: false, code, data: Buffer.concat(chunks), stillOpen: true });
    }, opts.ms ?? 5000);
    socket.on('connect', () => {
      connected = true;
      if (opts.write !== undefined) socket.write(opts.write);
    });
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', (e: NodeJS.ErrnoException) => (code = e.code ?? 'ERROR'));
    socket.on('close', () => {
      clearTimeout(giveUp);
      resolve({ connected, reset: code === 'ECONNRESET', code, data: Buffer.concat(chunks), stillOpen: false });
    });
  });
}

type Knock = { admitted: true; socket: net.Socket } | { admitted: false; reason: RejectReason; ending: Ending };

/**
 * One connection to a listener whose admitted connections go straight to `backend`: waits until
 * the proxy decided (the backend accepted, or a rejection was counted) and says which.
 */
async function knock(proxy: ProxyUnderTest, name: string, backend: Backend, opts: { host?: string; localAddress?: string; address?: string } = {}): Promise<Knock> {
  const listener = listenerOf(proxy, name);
  const acceptedBefore = backend.accepted;
  const before = listener.rejections.totals();
  const rejectedBefore = rejectedTotal(listener);
  const socket = net.connect({ port: proxy.port(name, opts.address), host: opts.host ?? '127.0.0.1', localAddress: opts.localAddress, allowHalfOpen: true });
  let code: string | null = null;
  let connected = false;
  socket.on('connect', () => (connected = true));
  socket.on('error', (e: NodeJS.ErrnoException) => (code = e.code ?? 'ERROR'));
  socket.on('end', () => socket.end()); // a refusal by FIN: finish our half so the socket closes
  const ended = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  await until(() => backend.accepted > acceptedBefore || rejectedTotal(listener) > rejectedBefore, 5000, 'the proxy to decide');
  if (backend.accepted > acceptedBefore) return { admitted: true, socket };
  const after = listener.rejections.totals();
  const reason = (Object.keys(after) as RejectReason[]).find((r) => after[r] > before[r])!;
  socket.resume();
  await ended;
  return { admitted: false, reason, ending: { connected, reset: code === 'ECONNRESET', code, data: Buffer.alloc(0), stillOpen: false } };
}

async function admitted(proxy: ProxyUnderTest, name: string, backend: Backend, opts: { host?: string; localAddress?: string; address?: string } = {}): Promise<net.Socket> {
  const k = await knock(proxy, name, backend, opts);
  assert.ok(k.admitted, `expected ${opts.localAddress ?? opts.host ?? '127.0.0.1'} to be admitted, got ${k.admitted ? '' : k.reason}`);
  return k.socket;
}

async function refused(proxy: ProxyUnderTest, name: string, backend: Backend, reason: RejectReason, opts: { host?: string; localAddress?: string; address?: string } = {}): Promise<void> {
  const k = await knock(proxy, name, backend, opts);
  if (k.admitted) {
    k.socket.destroy();
    assert.fail(`expected ${opts.localAddress ?? opts.host ?? '127.0.0.1'} to be refused with ${reason}, but it was admitted`);
  }
  assert.equal(k.reason, reason);
  assert.equal(k.ending.code, 'ECONNRESET', `a ${reason} refusal is a reset`);
}

/** Ends a relayed connection from the client side and waits until it is gone, cleanly. */
async function hangUp(socket: net.Socket): Promise<void> {
  const done = closed(socket);
  socket.end();
  const { reset } = await done;
  assert.equal(reset, false);
}

/** tls.connect passes `localAddress` on to net.connect, though its type does not list it. */
function tlsOptions(port: number, servername: string, opts: { host?: string; localAddress?: string }): tls.ConnectionOptions {
  const options: tls.ConnectionOptions & { localAddress?: string } = { port, host: opts.host ?? '127.0.0.1', servername, rejectUnauthorized: false };
  if (opts.localAddress !== undefined) options.localAddress = opts.localAddress;
  return options;
}

/** A TLS client: resolves with the backend's greeting line once the handshake is through. */
function tlsGreeting(port: number, servername: string, opts: { host?: string; localAddress?: string } = {}): Promise<{ socket: tls.TLSSocket; line: string }> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect(tlsOptions(port, servername, opts));
    socket.once('data', (d: Buffer) => {
      socket.off('error', reject);
      socket.on('error', () => {});
      resolve({ socket, line: d.toString() });
    });
    socket.once('error', reject);
  });
}

/** A TLS client the proxy refuses after reading its ClientHello: resolves with the error code it saw. */
function tlsRefusal(port: number, servername: string, opts: { host?: string; localAddress?: string } = {}): Promise<string | null> {
  return new Promise((resolve) => {
    const socket = tls.connect(tlsOptions(port, servername, opts));
    let code: string | null = null;
    socket.on('secureConnect', () => {
      code = 'ADMITTED';
      socket.destroy();
    });
    socket.on('error', (e: NodeJS.ErrnoException) => (code ??= e.code ?? 'ERROR'));
    socket.on('close', () => resolve(code));
  });
}

async function tlsHangUp(socket: tls.TLSSocket): Promise<void> {
  const done = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  socket.end();
  await done;
}

/** Runs `n` attempts with at most `concurrency` in flight. */
async function pool(n: number, concurrency: number, attempt: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < n) await attempt(next++);
  };
  await Promise.all(Array.from({ length: Math.min(n, concurrency) }, worker));
}

/** One plain TCP listener whose default route goes to `backend`; `settings` are listener keys and tables. */
const tcpListener = (backend: Backend, settings = '', name = 'tcp', bind = '"127.0.0.1:0"'): string => `
[[listeners]]
name = "${name}"
bind = [${bind}]
${settings}
  [[listeners.routes]]
  name = "r"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`;

// ---- global and listener capacity ----

test('[limits] max_connections admits exactly N across listeners, queues the next, refuses it where queue = 0, and a freed slot goes to the queue of another listener', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, `
[limits]
max_connections = 3
${tcpListener(backend, 'workers = 10\nqueue = 1', 'a')}
${tcpListener(backend, 'workers = 10\nqueue = 0', 'b')}`);
  const a = listenerOf(proxy, 'a');
  const b = listenerOf(proxy, 'b');
  const slots = slotsOf(proxy.daemon);

  const a1 = await admitted(proxy, 'a', backend);
  const a2 = await admitted(proxy, 'a', backend);
  const b1 = await admitted(proxy, 'b', backend);
  assert.equal(slots.busy, 3);
  assert.deepEqual([a.busy, b.busy], [2, 1]);

  // N+1: the global pool is full although listener a has 8 workers free: it queues.
  const a3 = await connect(proxy.port('a'));
  await until(() => a.queue.size === 1, 5000, 'a3 to queue');
  assert.equal(backend.accepted, 3);
  assert.equal(a3.readyState, 'open');
  // Listener b has no queue: refused. Listener a's queue (1) is full: refused.
  await refused(proxy, 'b', backend, 'queue_full');
  await refused(proxy, 'a', backend, 'queue_full');
  assert.equal(backend.accepted, 3);

  // b1 leaves: b has nobody queued, so the slot is offered to a, whose oldest queued starts.
  await hangUp(b1);
  await until(() => backend.accepted === 4, 5000, 'a3 to reach the backend');
  assert.equal(a.queue.size, 0);
  assert.deepEqual([a.busy, b.busy, slots.busy], [3, 0, 3]);

  assert.deepEqual(rejections(a), { queue_full: 1 });
  assert.deepEqual(rejections(b), { queue_full: 1 });
  assert.equal(await rejectionMetric(proxy.daemon, 'b', 'queue_full'), 1);
  await Promise.all([a1, a2, a3].map(hangUp));
  await assertQuiescent(proxy);
});

test('the queue admits in FIFO order once the worker frees, and refuses when full', { timeout: 10_000 }, async (t) => {
  const order: string[] = [];
  const backend = await startBackend(t, (socket) => {
    socket.once('data', (d: Buffer) => order.push(d.toString()));
    socket.pipe(socket);
  });
  const proxy = await startProxy(t, tcpListener(backend, 'workers = 1\nqueue = 3\nqueue_timeout = "5s"'));
  const l = listenerOf(proxy, 'tcp');

  const holder = await connect(proxy.port('tcp'), { localAddress: '127.0.0.2' });
  holder.write('H');
  await until(() => order.length === 1, 5000, 'the holder to reach the backend');
  // Each queued client says its name at once (kept by the proxy while queued) and leaves after its echo.
  const queued: Array<Promise<{ data: Buffer; error: NodeJS.ErrnoException | null }>> = [];
  for (const [i, name] of ['A', 'B', 'C'].entries()) {
    const client = await connect(proxy.port('tcp'), { localAddress: `127.0.0.${3 + i}` });
    queued.push(readAll(client));
    client.once('data', () => client.end());
    client.write(name);
    await until(() => l.queue.size === i + 1, 5000, `${name} to queue`);
  }
  // Full: the fourth waiter is refused and never reaches a backend.
  const fourth = await probe(proxy.port('tcp'), { localAddress: '127.0.0.6' });
  assert.equal(fourth.reset, true);
  assert.deepEqual(rejections(l), { queue_full: 1 });
  assert.equal(backend.accepted, 1);

  holder.on('data', () => {});
  await hangUp(holder);
  const results = await Promise.all(queued);
  assert.deepEqual(order, ['H', 'A', 'B', 'C']);
  assert.deepEqual(results.map((r) => [r.data.toString(), r.error]), [['A', null], ['B', null], ['C', null]]);
  assert.equal(backend.accepted, 4);
  await assertQuiescent(proxy);
});

test('a queued connection is reset after queue_timeout without reaching a backend', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, 'workers = 1\nqueue = 2\nqueue_timeout = "300ms"'));
  const l = listenerOf(proxy, 'tcp');
  const worker = await admitted(proxy, 'tcp', backend);
  const started = performance.now();
  const waiter = await probe(proxy.port('tcp'), { localAddress: '127.0.0.3' });
  const waited = performance.now() - started;
  assert.equal(waiter.reset, true);
  assert.ok(waited >= 290 && waited < 2000, `waited ${waited.toFixed(0)} ms`);
  assert.deepEqual(rejections(l), { queue_timeout: 1 });
  assert.equal(await rejectionMetric(proxy.daemon, 'tcp', 'queue_timeout'), 1);
  assert.equal(backend.accepted, 1);
  assert.equal(l.queue.size, 0);
  await hangUp(worker);
  await assertQuiescent(proxy);
});

test('with reject = "close" a refused client sees a clean end, not a reset, and no backend sees it', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, 'workers = 1\nqueue = 0\nreject = "close"'));
  const worker = await admitted(proxy, 'tcp', backend);
  const refusal = await probe(proxy.port('tcp'), { localAddress: '127.0.0.3' });
  assert.equal(refusal.stillOpen, false);
  assert.equal(refusal.code, null, 'no error: a FIN');
  assert.equal(refusal.data.length, 0);
  assert.deepEqual(rejections(listenerOf(proxy, 'tcp')), { queue_full: 1 });
  assert.equal(backend.accepted, 1);
  await hangUp(worker);
  await assertQuiescent(proxy);
});

test('with reject = "close" the firewall refuses before a socket exists (net.Server blockList), counted; with "reset" it refuses in accept with a RST', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  for (const reject of ['close', 'reset'] as const) {
    const proxy = await startProxy(t, tcpListener(backend, `reject = "${reject}"\n[listeners.firewall]\nblock = ["127.0.0.3"]`));
    const l = listenerOf(proxy, 'tcp');
    let accepted = 0;
    const accept = l.accept.bind(l);
    l.accept = (socket: net.Socket): void => {
      accepted++;
      accept(socket);
    };
    const refusal = await probe(proxy.port('tcp'), { localAddress: '127.0.0.3' });
    assert.equal(refusal.stillOpen, false);
    assert.equal(refusal.code, reject === 'close' ? null : 'ECONNRESET', reject);
    assert.equal(accepted, reject === 'close' ? 0 : 1, `${reject}: accept() ran for the blocked address`);
    assert.deepEqual(rejections(l), { firewall: 1 });
    assert.equal(await rejectionMetric(proxy.daemon, 'tcp', 'firewall'), 1);
    const ok = await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.2' });
    assert.equal(accepted, reject === 'close' ? 1 : 2, 'an allowed address goes through accept()');
    await hangUp(ok);
    await assertQuiescent(proxy);
  }
});

// ---- per route, after SNI ----

test('a route max_connections admits exactly N TLS clients of that SNI and resets the next; closing one admits another', { timeout: 10_000 }, async (t) => {
  const api = await startTlsBackend(t, 'api');
  const other = await startTlsBackend(t, 'other');
  const proxy = await startProxy(t, `
[[listeners]]
name = "tls"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["127.0.0.1:${api.port}"]
    [listeners.routes.limits]
    max_connections = 2
  [[listeners.routes]]
  name = "other"
  default = true
  backends = ["127.0.0.1:${other.port}"]
`);
  const l = listenerOf(proxy, 'tls');
  const port = proxy.port('tls');
  const first = await tlsGreeting(port, 'api.example.com');
  const second = await tlsGreeting(port, 'api.example.com', { localAddress: '127.0.0.2' });
  assert.deepEqual([first.line, second.line], ['api\n', 'api\n']);
  assert.equal(l.routeActive.get('api'), 2);

  assert.equal(await tlsRefusal(port, 'api.example.com', { localAddress: '127.0.0.3' }), 'ECONNRESET');
  assert.deepEqual(rejections(l), { route_limit: 1 });
  assert.equal(api.accepted, 2);
  // The limit is the route's: another SNI on the same listener is served.
  const elsewhere = await tlsGreeting(port, 'www.example.net', { localAddress: '127.0.0.3' });
  assert.equal(elsewhere.line, 'other\n');

  await tlsHangUp(first.socket);
  await until(() => l.routeActive.get('api') === 1, 5000, 'the api count to drop');
  const third = await tlsGreeting(port, 'api.example.com', { localAddress: '127.0.0.3' });
  assert.equal(third.line, 'api\n');
  assert.deepEqual([api.accepted, other.accepted], [3, 1]);
  assert.equal(await rejectionMetric(proxy.daemon, 'tls', 'route_limit'), 1);
  await Promise.all([second.socket, third.socket, elsewhere.socket].map(tlsHangUp));
  await assertQuiescent(proxy);
});

// ---- per client ----

test('max_connections_per_ip admits exactly N from one address, resets the next, leaves other addresses alone, and a close frees one', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, '[listeners.limits]\nmax_connections_per_ip = 3'));
  const l = listenerOf(proxy, 'tcp');
  const from2 = [];
  for (let i = 0; i < 3; i++) from2.push(await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.2' }));
  await refused(proxy, 'tcp', backend, 'ip_limit', { localAddress: '127.0.0.2' });
  const from3 = await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.3' });
  assert.equal(l.clients.activeOf('127.0.0.2'), 3);
  assert.equal(backend.accepted, 4);

  await hangUp(from2.shift()!);
  from2.push(await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.2' }));
  await refused(proxy, 'tcp', backend, 'ip_limit', { localAddress: '127.0.0.2' });
  assert.equal(backend.accepted, 5);
  assert.deepEqual(rejections(l), { ip_limit: 2 });
  assert.match(await proxy.daemon.metrics.exposition(), /^smartproxy_rejections_total\{listener="tcp",reason="ip_limit"\} 2$/m);
  await Promise.all([...from2, from3].map(hangUp));
  await assertQuiescent(proxy);
});

test('a client over its own limit hears ip_limit even when the listener is full: per-client checks come before capacity', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, 'workers = 1\nqueue = 0\n[listeners.limits]\nmax_connections_per_ip = 1'));
  const l = listenerOf(proxy, 'tcp');
  const held = await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.2' });
  await refused(proxy, 'tcp', backend, 'ip_limit', { localAddress: '127.0.0.2' });
  await refused(proxy, 'tcp', backend, 'queue_full', { localAddress: '127.0.0.3' });
  assert.deepEqual(rejections(l), { ip_limit: 1, queue_full: 1 });
  await hangUp(held);
  await assertQuiescent(proxy);
});

test('queued connections count toward max_connections_per_ip', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, 'workers = 1\nqueue = 5\n[listeners.limits]\nmax_connections_per_ip = 2'));
  const l = listenerOf(proxy, 'tcp');
  const running = await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.2' });
  const waiting = await connect(proxy.port('tcp'), { localAddress: '127.0.0.2' });
  await until(() => l.queue.size === 1, 5000, 'the second to queue');
  // The queue has room, but 127.0.0.2 already holds two (one of them waiting).
  const third = await probe(proxy.port('tcp'), { localAddress: '127.0.0.2' });
  assert.equal(third.reset, true);
  assert.deepEqual(rejections(l), { ip_limit: 1 });
  const other = await connect(proxy.port('tcp'), { localAddress: '127.0.0.3' });
  await until(() => l.queue.size === 2, 5000, 'another client to queue');
  assert.equal(backend.accepted, 1);

  await hangUp(running);
  await until(() => backend.accepted === 2, 5000, 'the queued one to start');
  await hangUp(waiting);
  await until(() => backend.accepted === 3, 5000, 'the next queued one to start');
  await hangUp(other);
  await assertQuiescent(proxy);
});

test('connection_rate_per_ip admits count per sliding window; a rejection never uses quota', { timeout: 10_000 }, async (t) => {
  const PER = 800;
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, `[listeners.limits]\nconnection_rate_per_ip = { count = 3, per = "${PER}ms" }`));
  const l = listenerOf(proxy, 'tcp');
  const from2 = { localAddress: '127.0.0.2' };
  const open: net.Socket[] = [];

  open.push(await admitted(proxy, 'tcp', backend, from2));
  const firstBy = performance.now(); // the first start happened before this
  await delay(350);
  const secondFrom = performance.now(); // the second start happens after this
  open.push(await admitted(proxy, 'tcp', backend, from2));
  open.push(await admitted(proxy, 'tcp', backend, from2));
  const thirdBy = performance.now();
  // Three starts in the window: the fourth, and every retry mid-window, is refused.
  for (let i = 0; i < 5; i++) await refused(proxy, 'tcp', backend, 'ip_rate', from2);
  // Rate is per client: another address is unaffected.
  open.push(await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.3' }));

  // Once the first start leaves the window exactly one more is admitted (the refusals above
  // did not count as starts), then the two later starts still fill it. The window is kept in
  // buckets of PER / 10, so a start may count up to PER / 10 past PER (never less than PER).
  await delay(firstBy + PER + PER / 10 + 30 - performance.now());
  open.push(await admitted(proxy, 'tcp', backend, from2));
  assert.ok(performance.now() < secondFrom + PER, 'the machine was too slow for the window to still hold the second start');
  await refused(proxy, 'tcp', backend, 'ip_rate', from2);
  await delay(thirdBy + PER + PER / 10 + 30 - performance.now());
  open.push(await admitted(proxy, 'tcp', backend, from2));

  assert.equal(backend.accepted, 6);
  assert.deepEqual(rejections(l), { ip_rate: 6 });
  assert.equal(await rejectionMetric(proxy.daemon, 'tcp', 'ip_rate'), 6);
  await Promise.all(open.map(hangUp));
  await assertQuiescent(proxy, PER);
});

test('a flood of 2,000 connections from one address with max_connections_per_ip = 50 leaves another client served without a single failure', { timeout: 60_000 }, async (t) => {
  const backend = await startBackend(t);
  const proxy = await startProxy(t, tcpListener(backend, 'workers = 200\nqueue = 0\n[listeners.limits]\nmax_connections_per_ip = 50'));
  const l = listenerOf(proxy, 'tcp');
  const port = proxy.port('tcp');
  const held: net.Socket[] = [];
  let refusedCount = 0;
  const other: string[] = [];
  let floodDone = false;

  // Each flood connection sends one byte: an admitted one gets it echoed and stays open.
  const flood = pool(2000, 64, () =>
    new Promise<void>((resolve) => {
      const socket = net.connect({ port, host: '127.0.0.1', localAddress: '127.0.0.2' });
      socket.on('connect', () => socket.write('x'));
      socket.once('data', () => {
        held.push(socket);
        resolve();
      });
      socket.on('error', (e: NodeJS.ErrnoException) => {
        if (e.code === 'ECONNRESET') refusedCount++;
        else other.push(e.code ?? 'ERROR');
      });
      socket.on('close', () => resolve());
    }),
  ).then(() => (floodDone = true));

  await until(() => refusedCount >= 100, 10_000, 'the flood to be under way');
  let firstDuringFlood = false;
  for (let i = 0; i < 50; i++) {
    const client = await connect(port, { localAddress: '127.0.0.3' });
    const reply = readAll(client);
    client.end(`request ${i}`);
    const { data, error } = await reply;
    assert.equal(error, null, `round trip ${i}`);
    assert.equal(data.toString(), `request ${i}`);
    if (i === 0) firstDuringFlood = !floodDone;
  }
  await flood;
  assert.ok(firstDuringFlood, 'the legitimate client started while the flood was running');
  assert.deepEqual(other, []);
  assert.equal(held.length, 50);
  assert.equal(refusedCount, 1950);
  assert.deepEqual(rejections(l), { ip_limit: 1950 });
  assert.equal(backend.accepted, 50 + 50);
  assert.equal(await rejectionMetric(proxy.daemon, 'tcp', 'ip_limit'), 1950);
  await Promise.all(held.map(hangUp));
  await assertQuiescent(proxy);
});

test('fair share refuses the client holding its share near capacity and still admits a newcomer', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, 'workers = 10\nqueue = 0\n[listeners.limits]\nfair_share_above = 50'));
  const l = listenerOf(proxy, 'tcp');
  const open: net.Socket[] = [];
  // A bystander holds one: two clients, so each may hold floor(10 / 2) = 5 once above 50 %.
  open.push(await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.4' }));
  let hog = 0;
  for (;;) {
    const k = await knock(proxy, 'tcp', backend, { localAddress: '127.0.0.2' });
    if (!k.admitted) {
      assert.equal(k.reason, 'fair_share');
      assert.equal(k.ending.code, 'ECONNRESET');
      break;
    }
    open.push(k.socket);
    hog++;
    assert.ok(hog <= 10, 'fair share never refused the hog');
  }
  assert.equal(hog, 5);
  assert.equal(l.busy, 6);
  // A newcomer is admitted; the hog, now over floor(10 / 3) = 3, is still refused; 3 slots stay free.
  open.push(await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.3' }));
  await refused(proxy, 'tcp', backend, 'fair_share', { localAddress: '127.0.0.2' });
  open.push(await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.4' }));
  assert.equal(l.busy, 8);
  assert.deepEqual(rejections(l), { fair_share: 2 });
  assert.equal(await rejectionMetric(proxy.daemon, 'tcp', 'fair_share'), 2);
  await Promise.all(open.map(hangUp));
  await assertQuiescent(proxy);
});

// ---- slowloris and lifetimes ----

test('a slowloris client is cut at client_hello whether it stalls or trickles, and counted as client_hello_timeout', { timeout: 10_000 }, async (t) => {
  const backend = await startTlsBackend(t, 'api');
  const proxy = await startProxy(t, `
[[listeners]]
name = "tls"
bind = ["127.0.0.1:0"]
  [listeners.timeouts]
  client_hello = "300ms"
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`);
  const port = proxy.port('tls');
  const hello = await captureClientHello(t, 'api.example.com');
  const cut = async (localAddress: string, send: (socket: net.Socket) => void): Promise<{ ms: number; code: string | null }> => {
    const started = performance.now();
    const socket = await connect(port, { localAddress });
    const ending = readAll(socket);
    send(socket);
    const giveUp = setTimeout(() => socket.destroy(new Error('still open after 2 s')), 2000);
    const { error } = await ending;
    clearTimeout(giveUp);
    return { ms: performance.now() - started, code: error?.code ?? error?.message ?? null };
  };
  const [stalled, trickled] = await Promise.all([
    cut('127.0.0.2', (s) => s.write(hello.subarray(0, 3))),
    cut('127.0.0.3', (s) => {
      let i = 0; // one byte every 20 ms: always more to come, never complete in time
      const timer = setInterval(() => (s.destroyed ? clearInterval(timer) : s.write(hello.subarray(i, ++i))), 20);
    }),
  ]);
  for (const r of [stalled, trickled]) {
    assert.equal(r.code, 'ECONNRESET');
    assert.ok(r.ms >= 290 && r.ms < 2000, `cut after ${r.ms.toFixed(0)} ms`);
  }
  assert.deepEqual(rejections(listenerOf(proxy, 'tls')), { client_hello_timeout: 2 });
  assert.equal(backend.accepted, 0);
  // The whole hello in time is routed as usual.
  const ok = await tlsGreeting(port, 'api.example.com');
  assert.equal(ok.line, 'api\n');
  await tlsHangUp(ok.socket);
  await assertQuiescent(proxy);
});

/** The bytes a Node TLS client sends first (its ClientHello) for `servername`. */
async function captureClientHello(t: TestContext, servername: string): Promise<Buffer> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => server.close());
  const first = new Promise<Buffer>((resolve) => server.once('connection', (s) => s.once('data', (d: Buffer) => (s.destroy(), resolve(d)))));
  const client = tls.connect({ port: (server.address() as net.AddressInfo).port, host: '127.0.0.1', servername, rejectUnauthorized: false });
  client.on('error', () => {});
  const bytes = await first;
  client.destroy();
  assert.ok(bytes.length > 100 && bytes[0] === 0x16);
  return bytes;
}

test('max_lifetime_jitter ends connections opened together at different times, each within its lifetime', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, '[listeners.timeouts]\nmax_lifetime = "500ms"\nmax_lifetime_jitter = 50'));
  const { registry } = proxy.daemon;
  const sockets = await Promise.all(Array.from({ length: 10 }, (_, i) => connect(proxy.port('tcp'), { localAddress: `127.0.0.${2 + i}` })));
  await until(() => registry.size === 10, 5000, 'ten connections admitted');
  // Each lifetime from the proxy's own admission time to the FIN the client sees.
  const acceptedAt = new Map([...registry.values()].map((conn) => [conn.clientPort, conn.acceptedAt]));
  const lifetimes = await Promise.all(
    sockets.map(async (socket) => {
      const admitted = acceptedAt.get(socket.localPort!)!;
      socket.on('end', () => socket.end()); // the proxy's FIN: finish our half too
      const { reset } = await closed(socket);
      assert.equal(reset, false, 'an admitted connection ends with a FIN');
      return Date.now() - admitted;
    }),
  );
  // Jitter 50 % of 500 ms: each lifetime in [250, 500] ms. Without jitter none could be under 500.
  for (const ms of lifetimes) assert.ok(ms >= 249 && ms < 1500, `lifetime ${ms} ms`);
  assert.ok(Math.min(...lifetimes) < 450, `shortest lifetime ${Math.min(...lifetimes)} ms`);
  const spread = Math.max(...lifetimes) - Math.min(...lifetimes);
  assert.ok(spread >= 50, `lifetimes spread over ${spread} ms`);
  assert.match(await proxy.daemon.metrics.exposition(), /^smartproxy_connections_closed_total\{listener="tcp",reason="max_lifetime"\} 10$/m);
  assert.deepEqual(rejections(listenerOf(proxy, 'tcp')), {});
  await assertQuiescent(proxy);
});

// ---- addresses: IPv4-mapped and IPv6 ----

test('a dual-stack [::] bind (ipv6_only = false) takes IPv4 clients too, each counted, logged and shown as its IPv4 address', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, 'ipv6_only = false\n[listeners.limits]\nmax_connections_per_ip = 1', 'tcp', '"[::]:0"'));
  const l = listenerOf(proxy, 'tcp');
  const port = proxy.port('tcp');
  const v4 = await admitted(proxy, 'tcp', backend, { host: '127.0.0.1', localAddress: '127.0.0.2', address: '[::]:0' });
  const v6 = await admitted(proxy, 'tcp', backend, { host: '::1', address: '[::]:0' });
  // 127.0.0.2 arrives as ::ffff:127.0.0.2 and is the IPv4 client 127.0.0.2: its quota of 1 is used.
  await refused(proxy, 'tcp', backend, 'ip_limit', { host: '127.0.0.1', localAddress: '127.0.0.2', address: '[::]:0' });
  const clients = (await proxy.daemon.connections(10)).connections.map((c) => c.client.replace(/:\d+$/, '')).sort();
  assert.deepEqual(clients, ['127.0.0.2', '[::1]']);
  assert.deepEqual(l.clients.top(5).map((c) => c.key).sort(), ['127.0.0.2', '::/64']);
  assert.ok(port > 0);
  await hangUp(v4);
  await hangUp(v6);
  await assertQuiescent(proxy);
});

test('an IPv4-mapped client shares its per-IP quota and firewall rules with the same IPv4 address', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, '[listeners.limits]\nmax_connections_per_ip = 2\n[listeners.firewall]\nblock = ["127.0.0.9"]'));
  const l = listenerOf(proxy, 'tcp');
  // The proxy binds IPv6 addresses ipv6Only, so a dual-stack socket is made here: bound to
  // ::ffff:127.0.0.1 it accepts IPv4 clients and reports them as ::ffff:127.0.0.x, and each
  // accepted socket goes through the listener's own accept path.
  const mapped = net.createServer({ pauseOnConnect: true, allowHalfOpen: true, noDelay: true }, (socket) => l.accept(socket));
  await new Promise<void>((resolve) => mapped.listen({ host: '::ffff:127.0.0.1', port: 0, ipv6Only: false }, resolve));
  t.after(() => mapped.close());
  const mappedPort = (mapped.address() as net.AddressInfo).port;
  const seen: string[] = [];
  mapped.on('connection', (s: net.Socket) => seen.push(s.remoteAddress ?? ''));

  const viaV4 = await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.2' });
  const viaMapped = await connect(mappedPort, { localAddress: '127.0.0.2' });
  await until(() => backend.accepted === 2, 5000, 'the mapped client to reach the backend');
  assert.deepEqual(seen, ['::ffff:127.0.0.2']);
  assert.deepEqual(l.clients.top(5), [{ key: '127.0.0.2', active: 2 }]);

  await refused(proxy, 'tcp', backend, 'ip_limit', { localAddress: '127.0.0.2' });
  const mappedRefusal = await probe(mappedPort, { localAddress: '127.0.0.2' });
  assert.equal(mappedRefusal.reset, true);
  assert.deepEqual(rejections(l), { ip_limit: 2 });

  // Closing the IPv4 one frees the quota for the mapped one.
  await hangUp(viaV4);
  const again = await connect(mappedPort, { localAddress: '127.0.0.2' });
  await until(() => backend.accepted === 3, 5000, 'the mapped client to be admitted');
  // An IPv4 firewall rule matches the mapped form.
  assert.equal((await probe(mappedPort, { localAddress: '127.0.0.9' })).reset, true);
  assert.deepEqual(rejections(l), { ip_limit: 2, firewall: 1 });
  assert.equal(backend.accepted, 3);
  assert.equal(clientKey('::ffff:127.0.0.2', 64), '127.0.0.2');
  await Promise.all([viaMapped, again].map(hangUp));
  await assertQuiescent(proxy);
});

test('IPv6 clients are counted per /64: ::1 is the client ::/64 and its per-IP limit holds', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, tcpListener(backend, '[listeners.limits]\nmax_connections_per_ip = 1', 'tcp', '"127.0.0.1:0", "[::1]:0"'));
  const l = listenerOf(proxy, 'tcp');
  const v6 = { host: '::1', address: '[::1]:0' };
  const first = await admitted(proxy, 'tcp', backend, v6);
  assert.deepEqual(l.clients.top(5), [{ key: '::/64', active: 1 }]);
  await refused(proxy, 'tcp', backend, 'ip_limit', v6);
  // IPv4 loopback is another client.
  const v4 = await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.2' });
  assert.deepEqual(rejections(l), { ip_limit: 1 });
  await Promise.all([first, v4].map(hangUp));
  await assertQuiescent(proxy);
});

// ---- firewall at each scope ----

test('the global firewall: block wins over allow, a non-empty allow list denies the rest, IPv6 CIDRs match ::1', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, `
[firewall]
allow = ["127.0.0.0/29", "::/127"]
block = ["127.0.0.5"]
${tcpListener(backend, '', 'tcp', '"127.0.0.1:0", "[::1]:0"')}`);
  const l = listenerOf(proxy, 'tcp');
  const open = [
    await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.2' }),
    await admitted(proxy, 'tcp', backend, { localAddress: '127.0.0.7' }),
    await admitted(proxy, 'tcp', backend, { host: '::1', address: '[::1]:0' }),
  ];
  await refused(proxy, 'tcp', backend, 'firewall', { localAddress: '127.0.0.5' }); // blocked inside the allowed /29
  await refused(proxy, 'tcp', backend, 'firewall', { localAddress: '127.0.0.8' }); // outside the allow list
  assert.equal(backend.accepted, 3);
  assert.deepEqual(rejections(l), { firewall: 2 });
  assert.equal(await rejectionMetric(proxy.daemon, 'tcp', 'firewall'), 2);
  await Promise.all(open.map(hangUp));
  await assertQuiescent(proxy);
});

test('listener firewalls apply to their own listener only, after the global one; an IPv4-only allow list refuses ::1', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const both = '"127.0.0.1:0", "[::1]:0"';
  const proxy = await startProxy(t, `
[firewall]
block = ["127.0.0.6"]
${tcpListener(backend, '[listeners.firewall]\nallow = ["127.0.0.2/31"]', 'a', both)}
${tcpListener(backend, '[listeners.firewall]\nblock = ["::1/128", "127.0.0.3"]', 'b', both)}`);
  const v6 = { host: '::1', address: '[::1]:0' };
  const open = [
    await admitted(proxy, 'a', backend, { localAddress: '127.0.0.2' }),
    await admitted(proxy, 'a', backend, { localAddress: '127.0.0.3' }),
    await admitted(proxy, 'b', backend, { localAddress: '127.0.0.2' }),
    await admitted(proxy, 'b', backend, { localAddress: '127.0.0.4' }),
  ];
  await refused(proxy, 'a', backend, 'firewall', { localAddress: '127.0.0.4' }); // outside a's allow list
  await refused(proxy, 'a', backend, 'firewall', v6); // a's allow list has no IPv6 rule
  await refused(proxy, 'b', backend, 'firewall', { localAddress: '127.0.0.3' });
  await refused(proxy, 'b', backend, 'firewall', v6);
  await refused(proxy, 'b', backend, 'firewall', { localAddress: '127.0.0.6' }); // the global block
  assert.equal(backend.accepted, 4);
  assert.deepEqual(rejections(listenerOf(proxy, 'a')), { firewall: 2 });
  assert.deepEqual(rejections(listenerOf(proxy, 'b')), { firewall: 3 });
  await Promise.all(open.map(hangUp));
  await assertQuiescent(proxy);
});

test('a route firewall refuses after SNI with route_firewall and leaves the other routes of the listener open', { timeout: 10_000 }, async (t) => {
  const api = await startTlsBackend(t, 'api');
  const internal = await startTlsBackend(t, 'internal');
  const proxy = await startProxy(t, `
[[listeners]]
name = "tls"
bind = ["127.0.0.1:0", "[::1]:0"]
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["127.0.0.1:${api.port}"]
    [listeners.routes.firewall]
    block = ["127.0.0.2"]
  [[listeners.routes]]
  name = "internal"
  sni = ["internal.example.com"]
  backends = ["127.0.0.1:${internal.port}"]
    [listeners.routes.firewall]
    allow = ["::1"]
`);
  const port = proxy.port('tls');
  const v6port = proxy.port('tls', '[::1]:0');
  assert.equal(await tlsRefusal(port, 'api.example.com', { localAddress: '127.0.0.2' }), 'ECONNRESET');
  assert.equal(await tlsRefusal(port, 'internal.example.com', { localAddress: '127.0.0.3' }), 'ECONNRESET');
  const served = [
    await tlsGreeting(port, 'api.example.com', { localAddress: '127.0.0.3' }),
    await tlsGreeting(v6port, 'api.example.com', { host: '::1' }),
    await tlsGreeting(v6port, 'internal.example.com', { host: '::1' }),
  ];
  assert.deepEqual(served.map((s) => s.line), ['api\n', 'api\n', 'internal\n']);
  assert.deepEqual([api.accepted, internal.accepted], [2, 1]);
  assert.deepEqual(rejections(listenerOf(proxy, 'tls')), { route_firewall: 2 });
  assert.equal(await rejectionMetric(proxy.daemon, 'tls', 'route_firewall'), 2);
  await Promise.all(served.map((s) => tlsHangUp(s.socket)));
  await assertQuiescent(proxy);
});

// ---- state that must go away, logs that must not flood ----

test('the per-client table empties by itself once traffic stops and the rate windows pass', { timeout: 10_000 }, async (t) => {
  const PER = 400;
  const backend = await startBackend(t);
  const proxy = await startProxy(t, tcpListener(backend, `[listeners.limits]\nmax_connections_per_ip = 5\nconnection_rate_per_ip = { count = 100, per = "${PER}ms" }`, 'tcp', '"127.0.0.1:0", "[::1]:0"'));
  const l = listenerOf(proxy, 'tcp');
  const sources = [{ localAddress: '127.0.0.2' }, { localAddress: '127.0.0.3' }, { localAddress: '127.0.0.4' }, { host: '::1', address: '[::1]:0' }];
  await Promise.all(
    sources.flatMap((source) =>
      Array.from({ length: 3 }, async () => {
        const client = await connect(proxy.port('tcp', source.address), source);
        const reply = readAll(client);
        client.end('ping');
        assert.equal((await reply).data.toString(), 'ping');
      }),
    ),
  );
  await proxy.daemon.registry.whenEmpty();
  const stoppedAt = performance.now();
  // Nothing connects any more: only the table's own timer can remove the idle entries.
  await until(() => l.clients.size === 0, PER + 1500, 'the idle entries to expire');
  assert.ok(performance.now() - stoppedAt < PER + 1000);
  assert.equal(backend.accepted, 12);
  await assertQuiescent(proxy);
});

test('10,000 rejections from one address produce a handful of log lines whose counts add up exactly', { timeout: 60_000 }, async (t) => {
  const backend = await startBackend(t, hold);
  const proxy = await startProxy(t, `
[logging]
rejection_summary_interval = "300ms"
${tcpListener(backend, '[listeners.firewall]\nblock = ["127.0.0.1"]')}`, { logLevel: 'info' });
  const l = listenerOf(proxy, 'tcp');
  const port = proxy.port('tcp');
  const N = 10_000;
  let resets = 0;
  const started = performance.now();
  await pool(N, 64, async () => {
    // From 127.0.0.1 without binding first: the kernel's connect-time port choice is much
    // cheaper than bind(port 0) per connection when other suites hold many sockets.
    const ending = await probe(port);
    if (ending.reset) resets++;
  });
  const elapsed = performance.now() - started;
  assert.equal(resets, N);
  assert.deepEqual(rejections(l), { firewall: N });
  assert.equal(backend.accepted, 0);

  // Wait for the interval that is still open to be summarised, then read the log back: each
  // interval has one first-sighting line and, when it saw more than that, one summary that
  // counts the whole interval (the first sighting included).
  const rejectionLines = (): Array<Record<string, unknown>> => proxy.lines.filter((line) => line.listener === 'tcp' && String(line.msg).startsWith('rejected'));
  const accounted = (): number => {
    let total = 0;
    let pendingFirst = 0;
    for (const line of rejectionLines()) {
      if (typeof line.rejected === 'number') {
        total += line.rejected;
        pendingFirst = 0;
      } else {
        assert.equal(line.msg, 'rejected connection: firewall');
        assert.equal(line.client, '127.0.0.1');
        total += pendingFirst; // the previous interval had only its first sighting
        pendingFirst = 1;
      }
    }
    return total + pendingFirst;
  };
  await until(() => accounted() === N, 5000, 'the log to account for every rejection');
  const lines = rejectionLines();
  const intervals = Math.ceil((performance.now() - started) / 300) + 1;
  assert.ok(lines.length <= 2 * intervals, `${lines.length} lines for ${intervals} intervals (flood took ${elapsed.toFixed(0)} ms)`);
  assert.ok(lines.length * 20 < N, `${lines.length} lines`);
  for (const summary of lines.filter((line) => typeof line.rejected === 'number')) {
    assert.deepEqual(summary.reasons, { firewall: summary.rejected });
    assert.deepEqual(summary.top, { firewall: [{ client: '127.0.0.1', count: summary.rejected }] });
  }
  assert.equal(await rejectionMetric(proxy.daemon, 'tcp', 'firewall'), N);
  await assertQuiescent(proxy);
});
