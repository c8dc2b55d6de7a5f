// Active health checks against real servers on loopback: each kind of check passing and failing,
// how a check's connection ends, and the scheduler's rise/fall, pacing, update() and close().
import assert from 'node:assert/strict';
import { createHook } from 'node:async_hooks';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { test, type TestContext } from 'node:test';
import tls from 'node:tls';
import { HealthChecker, runCheck, type CheckDefinition, type CheckResult, type CheckTarget } from '../src/backends/health-check.ts';
import { writeProxyHeaderV2Local } from '../src/proxy-protocol/write.ts';
import { startBlackhole } from './support/blackhole.ts';
import { eventually } from './support/backends.ts';
import { closedPort } from './support/harness.ts';

const CERT = readFileSync(new URL('./fixtures/cert.pem', import.meta.url));
const KEY = readFileSync(new URL('./fixtures/key.pem', import.meta.url));

// ---- helpers of this file ----

function def(overrides: Partial<CheckDefinition> = {}): CheckDefinition {
  return {
    type: 'tcp',
    intervalMs: 30,
    timeoutMs: 1000,
    rise: 2,
    fall: 3,
    jitterPct: 0,
    send: null,
    expect: null,
    tlsServerName: null,
    tlsVerify: false,
    proxyHeader: null,
    ...overrides,
  };
}

const PING = def({ type: 'send_expect', send: Buffer.from('PING\r\n'), expect: { kind: 'prefix', bytes: Buffer.from('+PONG\r\n') } });

interface Server {
  readonly server: net.Server;
  readonly port: number;
  readonly target: CheckTarget;
  /** Connections accepted so far. */
  accepted: number;
  readonly sockets: Set<net.Socket>;
  /** Stops listening and destroys its sockets (the port becomes refused). */
  kill(): Promise<void>;
}

/** A TCP (or given) server on 127.0.0.1 that counts accepts; closed after the test. */
async function listen(t: TestContext, onSocket: (s: net.Socket) => void, server: net.Server = net.createServer({ allowHalfOpen: true })): Promise<Server> {
  const sockets = new Set<net.Socket>();
  server.on('connection', (socket: net.Socket) => {
    s.accepted++;
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    onSocket(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  const kill = (): Promise<void> =>
    new Promise<void>((resolve) => {
      for (const socket of sockets) socket.destroy();
      if (!server.listening) return resolve();
      server.close(() => resolve());
    });
  const s: Server = { server, port, target: { host: '127.0.0.1', port }, accepted: 0, sockets, kill };
  t.after(kill);
  return s;
}

/** Answers FIN with FIN; never says anything. */
function silent(socket: net.Socket): void {
  socket.resume();
  socket.on('end', () => socket.end());
}

/** Reads until `n` bytes arrived, then calls `then` with them. */
function afterBytes(n: number, then: (socket: net.Socket, data: Buffer) => void): (socket: net.Socket) => void {
  return (socket) => {
    let data = Buffer.alloc(0);
    const onData = (chunk: Buffer): void => {
      data = Buffer.concat([data, chunk]);
      if (data.length < n) return;
      socket.off('data', onData);
      then(socket, data);
    };
    socket.on('data', onData);
    socket.on('end', () => socket.end());
  };
}

/** A fake Redis: +PONG to each PING, then closes when the client does. */
const redis = afterBytes(6, (socket) => {
  socket.write('+PONG\r\n');
  socket.resume();
});

/** How a server-side socket ended: with the client's FIN, and/or with an error (ECONNRESET). */
function ending(socket: net.Socket): Promise<{ sawEnd: boolean; error: string | null }> {
  return new Promise((resolve) => {
    let sawEnd = false;
    let error: string | null = null;
    socket.on('end', () => (sawEnd = true));
    socket.on('error', (e: NodeJS.ErrnoException) => (error = e.code ?? 'error'));
    socket.on('close', () => resolve({ sawEnd, error }));
  });
}

/** Waits `ms`: only where the test proves that something does NOT happen. */
const quiet = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function failed(result: CheckResult): string {
  assert.equal(result.ok, false, `expected a failure, got ${JSON.stringify(result)}`);
  return (result as { reason: string }).reason;
}

/** Sockets of this process (client and server side) and ref'd timers. */
function socketCount(): number {
  return process.getActiveResourcesInfo().filter((name) => name === 'TCPSocketWrap').length;
}

/** Timers created by src/backends/health-check.ts that are still pending (ref'd or not). */
function trackCheckerTimers(t: TestContext): { live: Set<number> } {
  const live = new Set<number>();
  const hook = createHook({
    init(id, type) {
      if (type !== 'Timeout') return;
      const limit = Error.stackTraceLimit;
      Error.stackTraceLimit = 50;
      const stack = new Error().stack ?? '';
      Error.stackTraceLimit = limit;
      if (stack.includes('health-check.ts')) live.add(id);
    },
    destroy(id) {
      live.delete(id);
    },
  }).enable();
  t.after(() => {
    hook.disable();
  });
  return { live };
}

/** A checker whose results and transitions are logged in order, closed after the test. */
function checker(t: TestContext, random: () => number = () => 0.5) {
  const log: Array<{ key: string; result: CheckResult; change?: { up: boolean; streak: number } }> = [];
  const hc = new HealthChecker({
    onResult: (key, result) => log.push({ key, result }),
    onChange: (key, up, result, streak) => log.push({ key, result, change: { up, streak } }),
    random,
  });
  t.after(() => hc.close());
  return { hc, log, results: (key: string) => log.filter((e) => e.key === key && e.change === undefined).map((e) => e.result) };
}

// ---- tcp ----

test('a tcp check passes on a listening server and ends its connection with a FIN, not an RST', async (t) => {
  let end: Promise<{ sawEnd: boolean; error: string | null }> | null = null;
  const server = await listen(t, (socket) => {
    end = ending(socket);
    silent(socket);
  });
  const result = await runCheck(server.target, def());
  assert.equal(result.ok, true);
  assert.ok(result.ms >= 0 && result.ms < 1000);
  await eventually(() => end !== null, 'the accept', 2000);
  assert.deepEqual(await end, { sawEnd: true, error: null });
});

test('a tcp check on a closed port fails with ECONNREFUSED', async () => {
  const result = await runCheck({ host: '127.0.0.1', port: await closedPort() }, def());
  assert.equal(failed(result), 'ECONNREFUSED');
});

test('a tcp check on a SYN black hole fails with timeout once timeoutMs has passed', async (t) => {
  const blackhole = await startBlackhole(t);
  const started = performance.now();
  const result = await runCheck({ host: '127.0.0.1', port: blackhole.port }, def({ timeoutMs: 300 }));
  const wall = performance.now() - started;
  assert.equal(failed(result), 'timeout');
  assert.ok(result.ms >= 295 && wall < 300 + 250, `took ${wall} ms (reported ${result.ms})`);
});

test('a check with an impossible port resolves with the error code instead of throwing', async () => {
  const result = await runCheck({ host: '127.0.0.1', port: 70000 }, def());
  assert.equal(failed(result), 'ERR_SOCKET_BAD_PORT');
});

// ---- send_expect ----

test('send_expect: a Redis PING answered +PONG passes and the server sees exactly PING then a FIN', async (t) => {
  let got: Buffer | null = null;
  let end: Promise<{ sawEnd: boolean; error: string | null }> | null = null;
  const server = await listen(t, (socket) => {
    end = ending(socket);
    const chunks: Buffer[] = [];
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('end', () => (got = Buffer.concat(chunks)));
    redis(socket);
  });
  const result = await runCheck(server.target, PING);
  assert.equal(result.ok, true, JSON.stringify(result));
  await eventually(() => end !== null, 'the accept', 2000);
  assert.deepEqual(await end, { sawEnd: true, error: null });
  assert.equal(got!.toString(), 'PING\r\n');
});

test('send_expect: a reply that keeps coming after the expected prefix is drained, so the check still ends with a FIN', async (t) => {
  let end: Promise<{ sawEnd: boolean; error: string | null }> | null = null;
  const server = await listen(
    t,
    afterBytes(6, (socket) => {
      end = ending(socket);
      socket.write('+PONG\r\n');
      socket.write(Buffer.alloc(256 * 1024, 'x'));
      socket.resume();
    }),
  );
  const result = await runCheck(server.target, PING);
  assert.equal(result.ok, true, JSON.stringify(result));
  await eventually(() => end !== null, 'the reply', 2000);
  assert.deepEqual(await end, { sawEnd: true, error: null });
});

test('a tcp check on a server that talks first (32 MB) reads and drops it, so it still ends with a FIN', async (t) => {
  // More than the socket buffers hold: a check that stopped reading would be destroyed by its
  // linger bound with bytes unread, which is an RST the server sees.
  const talk = Buffer.alloc(32 * 1024 * 1024, 'x');
  let end: Promise<{ sawEnd: boolean; error: string | null }> | null = null;
  const server = await listen(t, (socket) => {
    end = ending(socket);
    socket.write(talk);
    socket.resume();
    socket.on('end', () => socket.end());
  });
  // timeoutMs is also the linger bound: long enough to drain 32 MB on a loaded machine.
  assert.equal((await runCheck(server.target, def({ timeoutMs: 5000 }))).ok, true);
  await eventually(() => end !== null, 'the accept', 2000);
  assert.deepEqual(await end, { sawEnd: true, error: null });
});

test('send_expect: a server answering -ERR fails with unexpected reply without waiting for the timeout', async (t) => {
  const server = await listen(
    t,
    afterBytes(6, (socket) => {
      socket.write('-ERR unknown command\r\n');
      socket.resume();
    }),
  );
  const result = await runCheck(server.target, def({ ...PING, timeoutMs: 5000 }));
  assert.equal(failed(result), 'unexpected reply');
  assert.ok(result.ms < 1000);
});

test('send_expect: a prefix split over several writes still matches', async (t) => {
  const server = await listen(
    t,
    afterBytes(6, (socket) => {
      socket.setNoDelay(true);
      socket.write('+PO');
      setTimeout(() => socket.write('NG\r'), 20);
      setTimeout(() => socket.write('\n'), 40);
      socket.resume();
    }),
  );
  const result = await runCheck(server.target, PING);
  assert.equal(result.ok, true, JSON.stringify(result));
});

test('send_expect: a peer that closes before the expected bytes fails with unexpected reply', async (t) => {
  const server = await listen(
    t,
    afterBytes(6, (socket) => {
      socket.end('+PON');
      socket.resume();
    }),
  );
  assert.equal(failed(await runCheck(server.target, def({ ...PING, timeoutMs: 5000 }))), 'unexpected reply');
});

test('send_expect: 4 KB without a regex match fails with unexpected reply before the timeout', async (t) => {
  const server = await listen(t, (socket) => {
    socket.write(Buffer.alloc(5000, 'x'));
    socket.resume();
  });
  const result = await runCheck(server.target, def({ type: 'send_expect', timeoutMs: 5000, expect: { kind: 'regex', regex: /^220 / } }));
  assert.equal(failed(result), 'unexpected reply');
  assert.ok(result.ms < 1000);
});

test('send_expect: an SMTP banner matches ^220 with nothing sent, also with a shared /g regex run twice', async (t) => {
  const received: Buffer[] = [];
  const server = await listen(t, (socket) => {
    socket.write('220 mail.example.com ESMTP ready\r\n');
    socket.on('data', (c: Buffer) => received.push(c));
    socket.on('end', () => socket.end());
  });
  const banner = def({ type: 'send_expect', expect: { kind: 'regex', regex: /^220 /g } });
  for (let i = 0; i < 2; i++) assert.equal((await runCheck(server.target, banner)).ok, true);
  await eventually(() => server.sockets.size === 0, 'both connections closed', 2000);
  assert.equal(Buffer.concat(received).length, 0);
});

test('send_expect: a server that never answers fails with timeout at the deadline', async (t) => {
  const server = await listen(t, silent);
  const result = await runCheck(server.target, def({ ...PING, timeoutMs: 200 }));
  assert.equal(failed(result), 'timeout');
  assert.ok(result.ms >= 195 && result.ms < 450, `${result.ms} ms`);
  await eventually(() => server.sockets.size === 0, 'the check connection destroyed', 2000);
});

test('a PROXY header arrives first, exactly followed by the bytes of send', async (t) => {
  const header = writeProxyHeaderV2Local();
  let got: Buffer | null = null;
  const server = await listen(
    t,
    afterBytes(header.length + 6, (socket, data) => {
      got = data;
      socket.write('+PONG\r\n');
      socket.resume();
    }),
  );
  const result = await runCheck(server.target, def({ ...PING, proxyHeader: header }));
  assert.equal(result.ok, true, JSON.stringify(result));
  assert.deepEqual(got, Buffer.concat([header, Buffer.from('PING\r\n')]));
});

test('a tcp check with a PROXY header writes exactly the header, then a FIN', async (t) => {
  const header = writeProxyHeaderV2Local();
  let got: Buffer | null = null;
  const server = await listen(t, (socket) => {
    const chunks: Buffer[] = [];
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('end', () => {
      got = Buffer.concat(chunks);
      socket.end();
    });
  });
  assert.equal((await runCheck(server.target, def({ proxyHeader: header }))).ok, true);
  await eventually(() => got !== null, 'the FIN', 2000);
  assert.deepEqual(got, header);
});

test('after a success, a peer that never closes its side costs at most timeoutMs: the socket is destroyed', async (t) => {
  const server = await listen(t, (socket) => socket.resume()); // allowHalfOpen, never ends
  const before = socketCount();
  assert.equal((await runCheck(server.target, def({ timeoutMs: 200 }))).ok, true);
  await eventually(() => server.sockets.size === 1, 'the accept', 2000);
  assert.equal(socketCount(), before + 2); // ours, lingering, and the server's
  await eventually(() => socketCount() === before + 1, 'our socket destroyed', 200 + 300);
});

// ---- tls ----

async function tlsServer(t: TestContext): Promise<Server & { names: Array<string | false | null>; ends: Array<Promise<{ sawEnd: boolean; error: string | null }>> }> {
  const names: Array<string | false | null> = [];
  const ends: Array<Promise<{ sawEnd: boolean; error: string | null }>> = [];
  const server = tls.createServer({ cert: CERT, key: KEY }, (socket) => {
    names.push(socket.servername);
    ends.push(ending(socket));
    socket.resume();
    socket.on('end', () => socket.end());
  });
  server.on('tlsClientError', () => {});
  const s = await listen(t, () => {}, server);
  return Object.assign(s, { names, ends });
}

test('a tls check passes on a self-signed server with verify off, sends the SNI given, and ends with close_notify and a FIN', async (t) => {
  const server = await tlsServer(t);
  const result = await runCheck(server.target, def({ type: 'tls', tlsServerName: 'api.example.com' }));
  assert.equal(result.ok, true, JSON.stringify(result));
  // With TLS 1.3 the client is done before the server's handler runs.
  await eventually(() => server.names.length === 1, 'the server handshake', 2000);
  assert.deepEqual(server.names, ['api.example.com']);
  assert.deepEqual(await server.ends[0], { sawEnd: true, error: null });
});

test('a tls check with no server name sends no SNI', async (t) => {
  const server = await tlsServer(t);
  assert.equal((await runCheck(server.target, def({ type: 'tls' }))).ok, true);
  await eventually(() => server.names.length === 1, 'the server handshake', 2000);
  assert.deepEqual(server.names, [false]);
});

test('a tls check with verify on fails on a self-signed certificate with the verification code', async (t) => {
  const server = await tlsServer(t);
  const result = await runCheck(server.target, def({ type: 'tls', tlsServerName: 'api.example.com', tlsVerify: true }));
  assert.equal(failed(result), 'DEPTH_ZERO_SELF_SIGNED_CERT');
});

test('a tls check on a server that hangs up fails with ECONNRESET', async (t) => {
  const server = await listen(t, (socket) => socket.once('data', () => socket.end()));
  assert.equal(failed(await runCheck(server.target, def({ type: 'tls' }))), 'ECONNRESET');
});

test('a tls check with a PROXY header sends the header raw, then the handshake', async (t) => {
  const header = writeProxyHeaderV2Local();
  const inner = tls.createServer({ cert: CERT, key: KEY }, (socket) => {
    socket.resume();
    socket.on('end', () => socket.end());
  });
  inner.on('tlsClientError', () => {});
  let got: Buffer | null = null;
  const server = await listen(t, (socket) => {
    // Take the header off, then hand the rest of the stream to a TLS server.
    const onReadable = (): void => {
      const h = socket.read(header.length) as Buffer | null;
      if (h === null) return;
      socket.off('readable', onReadable);
      got = h;
      inner.emit('connection', socket);
    };
    socket.on('readable', onReadable);
  });
  const result = await runCheck(server.target, def({ type: 'tls', proxyHeader: header }));
  assert.equal(result.ok, true, JSON.stringify(result));
  assert.deepEqual(got, header);
});

// ---- HealthChecker ----

test('a target killed mid-run goes down after exactly fall failures and is back after rise successes on the same port', async (t) => {
  const server = await listen(t, silent);
  const { hc, log } = checker(t);
  hc.update([{ key: 'b1', target: server.target, def: def({ fall: 3, rise: 2 }) }]);
  const started = Date.now();
  assert.deepEqual(hc.state('b1'), { up: true, last: null, since: hc.state('b1')!.since });
  assert.ok(Math.abs(hc.state('b1')!.since - started) < 50);
  await eventually(() => log.filter((e) => e.result.ok).length >= 2, 'two successes', 2000);
  assert.equal(log.some((e) => e.change), false, 'no onChange at start or while up');

  await server.kill();
  const killedAt = log.length;
  await eventually(() => log.some((e) => e.change?.up === false), 'down', 2000);
  const afterKill = log.slice(killedAt);
  // A check already connected when the server died may still pass; then exactly 3 failures and the change.
  const firstFailure = afterKill.findIndex((e) => !e.result.ok);
  const run = afterKill.slice(firstFailure);
  assert.deepEqual(
    run.map((e) => (e.change ? `down after ${e.change.streak}` : e.result.ok ? 'ok' : failed(e.result))),
    ['ECONNREFUSED', 'ECONNREFUSED', 'ECONNREFUSED', 'down after 3'],
  );
  const down = hc.state('b1')!;
  assert.equal(down.up, false);
  assert.equal(failed(down.last!), 'ECONNREFUSED');
  assert.ok(down.since >= started);

  await new Promise<void>((resolve) => server.server.listen(server.port, '127.0.0.1', resolve));
  const relistenAt = log.length;
  await eventually(() => log.some((e) => e.change?.up === true), 'up again', 2000);
  const back = log.slice(relistenAt).filter((e) => e.result.ok);
  assert.deepEqual(
    back.map((e) => (e.change ? `up after ${e.change.streak}` : 'ok')),
    ['ok', 'ok', 'up after 2'],
  );
  assert.equal(hc.state('b1')!.up, true);
  assert.ok(hc.state('b1')!.since > down.since);
  assert.equal(log.filter((e) => e.change).length, 2, 'one onChange per transition');
});

test('failures that are not consecutive never take a target down', async (t) => {
  let n = 0;
  const server = await listen(
    t,
    afterBytes(6, (socket) => {
      socket.write(n++ % 2 === 0 ? '+PONG\r\n' : '-ERR\r\n');
      socket.resume();
    }),
  );
  const { hc, log, results } = checker(t);
  hc.update([{ key: 'flaky', target: server.target, def: def({ ...PING, fall: 2, rise: 1 }) }]);
  await eventually(() => results('flaky').length >= 8, 'eight results', 5000);
  hc.close();
  assert.deepEqual(
    results('flaky').slice(0, 8).map((r) => r.ok),
    [true, false, true, false, true, false, true, false],
  );
  assert.equal(log.filter((e) => e.change).length, 0);
  assert.equal(hc.state('flaky'), undefined);
});

test('one check in flight per key at a time: the next starts an interval after the previous one ended', async (t) => {
  const REPLY_DELAY = 60;
  const INTERVAL = 40;
  let pending = 0;
  let maxPending = 0;
  const accepts: number[] = [];
  const server = await listen(
    t,
    afterBytes(6, (socket) => {
      accepts.push(performance.now());
      pending++;
      maxPending = Math.max(maxPending, pending);
      setTimeout(() => {
        pending--;
        socket.write('+PONG\r\n');
        socket.resume();
      }, REPLY_DELAY);
    }),
  );
  const { hc, results } = checker(t);
  hc.update([{ key: 'redis', target: server.target, def: def({ ...PING, intervalMs: INTERVAL }) }]);
  await eventually(() => results('redis').length >= 5, 'five results', 5000);
  hc.close();
  assert.equal(maxPending, 1);
  assert.ok(results('redis').every((r) => r.ok && r.ms >= REPLY_DELAY - 5));
  for (let i = 1; i < accepts.length; i++) {
    const gap = accepts[i]! - accepts[i - 1]!;
    assert.ok(gap >= REPLY_DELAY + INTERVAL - 5, `gap ${i}: ${gap} ms`);
  }
});

test('jitter spreads intervals by ±jitterPct and the first check starts within one interval', async (t) => {
  const server = await listen(t, silent);
  const randoms = [0, 0.99, 0, 0.99, 0, 0.99];
  let i = 0;
  const starts: number[] = [];
  server.server.on('connection', () => starts.push(performance.now()));
  const { hc, results } = checker(t, () => randoms[i++ % randoms.length]!);
  const added = performance.now();
  // First delay: 0 x 200 = 0; then 200 x (1 + 0.5 x (2 x 0.99 - 1)) = 298, then 200 x 0.5 = 100.
  hc.update([{ key: 'j', target: server.target, def: def({ intervalMs: 200, jitterPct: 50 }) }]);
  await eventually(() => results('j').length >= 3, 'three results', 3000);
  hc.close();
  assert.ok(starts[0]! - added < 60, `first ${starts[0]! - added}`);
  const gap1 = starts[1]! - starts[0]!;
  const gap2 = starts[2]! - starts[1]!;
  assert.ok(gap1 >= 295 && gap1 < 298 + 150, `gap1 ${gap1}`);
  assert.ok(gap2 >= 97 && gap2 < 190, `gap2 ${gap2}`); // below the plain interval: the minus side works
});

test('update() keeps the state of an unchanged key, resets a changed one, and a removed key stops with its in-flight result dropped', async (t) => {
  const dead = { host: '127.0.0.1', port: await closedPort() };
  const hanging = await listen(t, silent);
  const { hc, log, results } = checker(t);
  // Rebuilt on each call, as a reload rebuilds definitions: equal, never identical.
  const deadDef = (): CheckDefinition =>
    def({ ...PING, fall: 1, expect: { kind: 'regex', regex: /^\+PONG/ }, proxyHeader: writeProxyHeaderV2Local() });
  const hangDef = def({ ...PING, timeoutMs: 5000 });
  hc.update([
    { key: 'dead', target: dead, def: deadDef() },
    { key: 'hang', target: hanging.target, def: hangDef },
  ]);
  await eventually(() => hc.state('dead')?.up === false && hanging.sockets.size === 1, 'dead down and hang in flight', 2000);
  const downSince = hc.state('dead')!.since;

  // Same key, an equal (not identical) definition and target: state and schedule kept.
  hc.update([
    { key: 'dead', target: { ...dead }, def: deadDef() },
    { key: 'hang', target: hanging.target, def: hangDef },
  ]);
  assert.equal(hc.state('dead')!.up, false);
  assert.equal(hc.state('dead')!.since, downSince);
  assert.equal(hanging.accepted, 1, 'the in-flight check was not restarted');
  assert.equal(hanging.sockets.size, 1);

  // Removing 'hang' destroys its in-flight check; its result never arrives and no check follows.
  const deadResults = results('dead').length;
  hc.update([{ key: 'dead', target: dead, def: deadDef() }]);
  assert.equal(hc.state('hang'), undefined);
  await eventually(() => hanging.sockets.size === 0, 'the in-flight check destroyed', 2000);
  await eventually(() => results('dead').length >= deadResults + 3, 'dead still checked', 2000);
  assert.equal(hanging.accepted, 1);
  assert.equal(results('hang').length, 0);

  // A changed definition starts over: up, no last result, no transition reported.
  const changes = log.filter((e) => e.change).length;
  hc.update([{ key: 'dead', target: dead, def: { ...deadDef(), expect: { kind: 'prefix', bytes: Buffer.from('+PONG') } } }]);
  const reset = hc.state('dead')!;
  assert.equal(reset.up, true);
  assert.equal(reset.last, null);
  assert.equal(log.filter((e) => e.change).length, changes);
});

test('an onResult that closes the checker stops it for good: no onChange, no further check, no timer', async (t) => {
  const timers = trackCheckerTimers(t);
  const dead = { host: '127.0.0.1', port: await closedPort() };
  const calls: string[] = [];
  const hc = new HealthChecker({
    onResult: (key, result) => {
      calls.push(`result ${key} ${result.ok}`);
      hc.close();
    },
    onChange: (key, up) => calls.push(`change ${key} ${up}`),
    random: () => 0,
  });
  t.after(() => hc.close());
  hc.update([{ key: 'dead', target: dead, def: def({ fall: 1 }) }]);
  await eventually(() => calls.length > 0, 'the first result', 2000);
  await eventually(() => timers.live.size === 0, 'every checker timer cleared', 2000);
  await quiet(100); // three intervals
  assert.deepEqual(calls, ['result dead false']);
});

test('close() stops every timer and check, leaves no socket or timer behind, and is idempotent', async (t) => {
  const timers = trackCheckerTimers(t);
  const up = await listen(t, silent);
  const hanging = await listen(t, silent);
  const lingering = await listen(t, (socket) => socket.resume()); // never closes its side
  const dead = { host: '127.0.0.1', port: await closedPort() };
  const socketsBefore = socketCount();
  const { hc, log } = checker(t);
  hc.update([
    { key: 'up', target: up.target, def: def() },
    { key: 'hang', target: hanging.target, def: def({ ...PING, timeoutMs: 5000 }) },
    { key: 'linger', target: lingering.target, def: def({ timeoutMs: 5000 }) },
    { key: 'dead', target: dead, def: def({ fall: 1 }) },
    { key: 'far', target: up.target, def: def({ intervalMs: 60_000 }) }, // still waiting for its first check
  ]);
  await eventually(
    () => hanging.sockets.size === 1 && lingering.sockets.size >= 1 && log.some((e) => e.key === 'up') && log.some((e) => e.key === 'dead'),
    'every kind of check under way',
    3000,
  );
  assert.ok(timers.live.size > 0, 'the hook sees the checker timers');
  hc.close();
  hc.close();
  assert.equal(hc.state('up'), undefined);
  const results = log.length;
  // The lingering server never closes its side of any check, so its sockets stay; ours must not.
  const remaining = (): number => socketsBefore + lingering.sockets.size;
  await eventually(() => socketCount() === remaining(), 'every check socket closed', 2000);
  await eventually(() => timers.live.size === 0, 'every checker timer cleared', 2000);
  hc.update([{ key: 'up', target: up.target, def: def() }]); // ignored after close
  await quiet(100); // three intervals: nothing may run any more
  assert.equal(log.length, results);
  assert.equal(socketCount(), remaining());
  assert.equal(timers.live.size, 0);
});
