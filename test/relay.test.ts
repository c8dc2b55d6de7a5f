// End-to-end relay through a real daemon on loopback: bytes both ways, half-close, SNI routing
// with real TLS clients, fragmented ClientHellos, and every deadline of a connection.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import { test, type TestContext } from 'node:test';
import tls from 'node:tls';
import type { Connection } from '../src/connection/connection.ts';
import { MAX_DURATION_MS } from '../src/config/units.ts';
import { startBlackhole } from './support/blackhole.ts';
import {
  closed,
  closedPort,
  connect,
  readAll,
  sha256,
  startBackend,
  startProxy,
  startTlsBackend,
  until,
  type ProxyUnderTest,
} from './support/harness.ts';

// ---- helpers of this file ----

/** A plain TCP listener "tcp" with one default route "main" over `backends` (ports). */
function tcpToml(backends: readonly number[], timeouts = ''): string {
  return `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
  [listeners.timeouts]
  ${timeouts}
  [[listeners.routes]]
  name = "main"
  default = true
  backends = [${backends.map((p) => `"127.0.0.1:${p}"`).join(', ')}]
`;
}

/** An SNI listener "tls": api.example.com -> api, *.example.org -> other, and optionally a default route. */
function sniToml(ports: { api: number; other: number; fallback?: number }, timeouts = ''): string {
  const fallback =
    ports.fallback === undefined
      ? ''
      : `
  [[listeners.routes]]
  name = "fallback"
  default = true
  backends = ["127.0.0.1:${ports.fallback}"]`;
  return `
[[listeners]]
name = "tls"
bind = ["127.0.0.1:0"]
  [listeners.timeouts]
  ${timeouts}
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["127.0.0.1:${ports.api}"]
  [[listeners.routes]]
  name = "other"
  sni = ["*.example.org"]
  backends = ["127.0.0.1:${ports.other}"]${fallback}
`;
}

interface ClosedLine {
  reason: string;
  route: string | null;
  sni: string | null;
  backend: string | null;
  bytesFromClient: number;
  bytesFromBackend: number;
}

/** The debug "connection closed" lines of a proxy started with logLevel 'debug', in order. */
function closedLines(proxy: ProxyUnderTest): ClosedLine[] {
  return proxy.lines.filter((l) => l.msg === 'connection closed') as unknown as ClosedLine[];
}

/** The single connection in the registry (waits for it to appear). */
async function onlyConnection(proxy: ProxyUnderTest): Promise<Connection> {
  await until(() => proxy.daemon.registry.size === 1, 5000, 'one connection in the registry');
  return [...proxy.daemon.registry.values()][0]!;
}

/** A backend that records everything it receives, echoes it back once the client ends, then ends. */
async function startRecorder(t: TestContext): Promise<{ port: number; accepted: () => number; received: Buffer[] }> {
  const received: Buffer[] = [];
  const backend = await startBackend(t, (socket) => {
    const chunks: Buffer[] = [];
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('end', () => {
      const all = Buffer.concat(chunks);
      received.push(all);
      socket.end(all);
    });
  });
  return { port: backend.port, accepted: () => backend.accepted, received };
}

/** The exact bytes of the first TLS record a node:tls client sends (its ClientHello). */
async function captureClientHello(opts: tls.ConnectionOptions): Promise<Buffer> {
  let client: tls.TLSSocket | undefined;
  const server = net.createServer();
  try {
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as net.AddressInfo).port;
    const hello = new Promise<Buffer>((resolve, reject) => {
      server.once('connection', (socket: net.Socket) => {
        let buf = Buffer.alloc(0);
        socket.on('error', () => {});
        socket.on('data', (c: Buffer) => {
          buf = Buffer.concat([buf, c]);
          if (buf.length >= 5 && buf.length >= 5 + buf.readUInt16BE(3)) {
            resolve(buf.subarray(0, 5 + buf.readUInt16BE(3)));
            socket.destroy();
          }
        });
        socket.on('close', () => reject(new Error('closed before a whole ClientHello arrived')));
      });
    });
    client = tls.connect({ port, host: '127.0.0.1', rejectUnauthorized: false, ...opts });
    client.on('error', () => {});
    const bytes = await hello;
    assert.equal(bytes[0], 0x16, 'a TLS handshake record');
    return bytes;
  } finally {
    client?.destroy();
    server.close();
  }
}

/** A TLS client through the proxy: the first line its backend sends (the backend's name), or the error. */
function tlsFirstLine(port: number, servername: string | undefined): Promise<string> {
  return new Promise((resolve) => {
    const opts: tls.ConnectionOptions = { port, host: '127.0.0.1', rejectUnauthorized: false };
    // No servername and an IP host: node:tls sends no SNI extension at all.
    if (servername !== undefined) opts.servername = servername;
    const socket = tls.connect(opts);
    socket.once('data', (d: Buffer) => {
      resolve(d.toString());
      socket.destroy();
    });
    socket.once('error', (e: NodeJS.ErrnoException) => resolve(`error:${e.code ?? e.message}`));
    socket.once('close', () => resolve('closed'));
  });
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

// ---- bytes ----

test('1 MB of random bytes sent by the client comes back intact from an echo backend', { timeout: 15_000 }, async (t) => {
  const backend = await startBackend(t);
  const proxy = await startProxy(t, tcpToml([backend.port]));
  const payload = randomBytes(1 << 20);
  const client = await connect(proxy.port('tcp'));
  const received = readAll(client);
  client.end(payload);
  const { data, error } = await received;
  assert.equal(error, null);
  assert.equal(data.length, payload.length);
  assert.equal(sha256(data), sha256(payload));
  await proxy.daemon.registry.whenEmpty();
  assert.equal(backend.accepted, 1);
});

test('1 MB each way of distinct data arrives intact in both directions at once', { timeout: 15_000 }, async (t) => {
  const fromClient = randomBytes(1 << 20);
  const fromBackend = randomBytes(1 << 20);
  let backendGot: Promise<Buffer> | undefined;
  const backend = await startBackend(t, (socket) => {
    backendGot = new Promise((resolve) => {
      const chunks: Buffer[] = [];
      socket.on('data', (c: Buffer) => chunks.push(c));
      socket.on('end', () => resolve(Buffer.concat(chunks)));
    });
    socket.end(fromBackend); // its own data, independent of what it reads
  });
  const proxy = await startProxy(t, tcpToml([backend.port]));
  const client = await connect(proxy.port('tcp'));
  const received = readAll(client);
  client.end(fromClient);
  const { data, error } = await received;
  assert.equal(error, null);
  assert.equal(sha256(data), sha256(fromBackend));
  await until(() => backendGot !== undefined);
  const got = await backendGot!;
  assert.equal(got.length, fromClient.length);
  assert.equal(sha256(got), sha256(fromClient));
  await proxy.daemon.registry.whenEmpty();
});

test('concurrent downloads of distinct data arrive intact while some clients lag behind', { timeout: 30_000 }, async (t) => {
  // Backend reads share one buffer, and bursts get buffers of their own (Connection.onBackendRead).
  // A lagging client leaves the proxy's writes to it pending while the other backends go on
  // reading: no byte of one download may end up in another.
  // Odd ids trickle (small reads, into the shared buffer), even ids send in one go (whole reads);
  // ids 2, 3, 6, 7 lag: every kind of backend read meets every kind of client.
  const count = 8;
  const payloads = Array.from({ length: count }, () => randomBytes(8 << 20));
  const backend = await startBackend(t, (socket) => {
    socket.once('data', (idByte: Buffer) => {
      const id = idByte[0]!;
      const payload = payloads[id]!;
      if (id % 2 === 0) return void socket.end(payload);
      let offset = 0;
      const trickle = (): void => {
        if (offset >= payload.length) return void socket.end();
        const piece = payload.subarray(offset, offset + 4096);
        offset += piece.length;
        if (socket.write(piece)) setImmediate(trickle);
        else socket.once('drain', trickle);
      };
      trickle();
    });
  });
  const proxy = await startProxy(t, tcpToml([backend.port]));
  const downloads = payloads.map(async (payload, id) => {
    const client = await connect(proxy.port('tcp'));
    const lagging = (id >> 1) % 2 === 1;
    const hash = createHash('sha256');
    let length = 0;
    const done = closed(client);
    client.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      length += chunk.length;
      if (lagging) {
        // Stops and starts: one event-loop turn between reads.
        client.pause();
        setImmediate(() => client.resume());
      }
    });
    client.on('end', () => client.end());
    if (lagging) client.pause();
    client.write(Buffer.from([id]));
    if (lagging) {
      // Read nothing until the proxy holds bytes it could not write to this client.
      const port = client.localPort;
      await until(
        () => [...proxy.daemon.registry.values()].some((c) => c.clientPort === port && c.client.writableLength > 0),
        10_000,
        `pending writes to client ${id}`,
      );
      client.resume();
    }
    await done;
    return { id, length, digest: hash.digest('hex') };
  });
  for (const { id, length, digest } of await Promise.all(downloads)) {
    assert.equal(length, payloads[id]!.length, `download ${id}`);
    assert.equal(digest, sha256(payloads[id]!), `download ${id}`);
  }
  await proxy.daemon.registry.whenEmpty();
});

test('when both sides have sent FIN, bytes still queued for either one are delivered before the close', { timeout: 20_000 }, async (t) => {
  // Connection closes at once when both peers have ended and nothing is queued; here something
  // is: the receiver reads nothing until the proxy holds bytes for it and has seen both FINs.
  for (const sender of ['backend', 'client'] as const) {
    const sent = createHash('sha256');
    let sentLength = 0;
    let backendSocket: net.Socket | undefined;
    const backend = await startBackend(t, (socket) => {
      backendSocket = socket;
      if (sender === 'client') {
        socket.pause(); // the receiver
        socket.end(); // its FIN first
      }
    });
    const proxy = await startProxy(t, tcpToml([backend.port]), { logLevel: 'debug' });
    const client = await connect(proxy.port('tcp'));
    const conn = await onlyConnection(proxy);
    await until(() => backendSocket !== undefined && (conn.state === 'relaying' || conn.state === 'closing'), 5000, 'the relay to start');
    const [from, to] = sender === 'backend' ? [backendSocket!, client] : [client, backendSocket!];
    const toward = (): net.Socket => (sender === 'backend' ? conn.client : conn.backend!);
    const received = readAll(to);
    to.pause();
    if (sender === 'backend') client.end(); // the receiver's FIN first
    await until(() => conn.state === 'closing', 5000, 'the receiver FIN at the proxy');
    // 1 KB pieces until one waits in the proxy for the receiver: far below the high-water mark,
    // so the proxy keeps reading the sender and sees its FIN while that piece is still queued.
    for (let i = 0; toward().writableLength === 0; i++) {
      assert.ok(i < 100_000, 'the proxy never queued bytes for a receiver that reads nothing');
      const piece = randomBytes(1024);
      sent.update(piece);
      sentLength += piece.length;
      from.write(piece);
      await tick();
    }
    from.end();
    await until(() => (sender === 'backend' ? conn.backend!.readableEnded : conn.client.readableEnded) || conn.state === 'closed', 5000, 'the sender FIN at the proxy');
    to.resume();
    const { data, error } = await received;
    assert.equal(error, null, sender);
    assert.equal(data.length, sentLength, `bytes from the ${sender}`);
    assert.equal(sha256(data), sent.digest('hex'), `bytes from the ${sender}`);
    await proxy.daemon.registry.whenEmpty();
    assert.deepEqual(closedLines(proxy).map((l) => l.reason), ['done'], sender);
  }
});

test('after the client ends its writing half it still receives the reply the backend sends only after that FIN', { timeout: 10_000 }, async (t) => {
  const hashing = async (): Promise<number> =>
    (
      await startBackend(t, (socket) => {
        const hash = createHash('sha256');
        socket.on('data', (c: Buffer) => hash.update(c));
        // The reply exists only once the FIN has been seen.
        socket.on('end', () => socket.end(`${hash.digest('hex')}\n`));
      })
    ).port;
  const proxy = await startProxy(t, sniToml({ api: await hashing(), other: await hashing() }), { logLevel: 'debug' });
  const hello = await captureClientHello({ servername: 'api.example.com' });
  // The FIN can reach the proxy before the backend is connected (in the same read as the last
  // ClientHello byte: passed on once connected) or while relaying. Both keep the reply path open.
  for (const when of ['before the backend is connected', 'while relaying'] as const) {
    const payload = when === 'while relaying' ? randomBytes(256 * 1024) : Buffer.alloc(0);
    const client = await connect(proxy.port('tls'));
    const received = readAll(client);
    if (when === 'while relaying') {
      client.write(hello);
      const conn = await onlyConnection(proxy);
      await until(() => conn.state === 'relaying', 5000, 'the relay to start');
      client.end(payload);
    } else {
      client.end(hello);
    }
    const { data, error } = await received;
    assert.equal(error, null, when);
    assert.equal(data.toString(), `${sha256(Buffer.concat([hello, payload]))}\n`, when);
    await proxy.daemon.registry.whenEmpty();
  }
  assert.deepEqual(
    closedLines(proxy).map((l) => [l.reason, l.route]),
    [
      ['done', 'api'],
      ['done', 'api'],
    ],
  );
});

// ---- SNI routing ----

test('TLS clients are routed by SNI: exact, wildcard, case-insensitive, no SNI and unknown SNI to the default', { timeout: 15_000 }, async (t) => {
  const api = await startTlsBackend(t, 'api');
  const other = await startTlsBackend(t, 'other');
  const fallback = await startTlsBackend(t, 'fallback');
  const proxy = await startProxy(t, sniToml({ api: api.port, other: other.port, fallback: fallback.port }), { logLevel: 'debug' });
  const port = proxy.port('tls');
  const cases: Array<[string | undefined, string, string | null]> = [
    ['api.example.com', 'api', 'api.example.com'],
    ['www.example.org', 'other', 'www.example.org'],
    ['a.b.example.org', 'other', 'a.b.example.org'],
    ['API.Example.COM', 'api', 'api.example.com'],
    ['WWW.EXAMPLE.ORG', 'other', 'www.example.org'],
    [undefined, 'fallback', null],
    ['example.org', 'fallback', 'example.org'], // the wildcard does not cover the bare suffix
    ['unknown.example.net', 'fallback', 'unknown.example.net'],
  ];
  for (const [servername, expected] of cases) {
    assert.equal(await tlsFirstLine(port, servername), `${expected}\n`, `servername ${servername ?? '(none)'}`);
  }
  await proxy.daemon.registry.whenEmpty();
  assert.equal(api.accepted, 2);
  assert.equal(other.accepted, 3);
  assert.equal(fallback.accepted, 3);
  const lines = closedLines(proxy);
  assert.deepEqual(
    lines.map((l) => [l.route, l.sni]),
    cases.map(([, route, sni]) => [route, sni]),
  );
});

test('an unknown SNI with no default route is refused and no backend is dialled', { timeout: 10_000 }, async (t) => {
  const api = await startTlsBackend(t, 'api');
  const other = await startTlsBackend(t, 'other');
  const proxy = await startProxy(t, sniToml({ api: api.port, other: other.port }), { logLevel: 'debug' });
  const port = proxy.port('tls');
  assert.match(await tlsFirstLine(port, 'unknown.example.net'), /^(error:|closed)/);
  assert.match(await tlsFirstLine(port, undefined), /^(error:|closed)/);
  await proxy.daemon.registry.whenEmpty();
  assert.equal(api.accepted + other.accepted, 0);
  assert.deepEqual(
    closedLines(proxy).map((l) => [l.reason, l.backend]),
    [
      ['no_route', null],
      ['no_route', null],
    ],
  );
  // A known name still works on the same listener.
  assert.equal(await tlsFirstLine(port, 'api.example.com'), 'api\n');
  await proxy.daemon.registry.whenEmpty();
});

test('a ClientHello written one byte at a time still routes by SNI and reaches the backend unchanged', { timeout: 15_000 }, async (t) => {
  const hello = await captureClientHello({ servername: 'api.example.com' });
  const api = await startRecorder(t);
  const other = await startRecorder(t);
  const fallback = await startRecorder(t);
  const proxy = await startProxy(t, sniToml({ api: api.port, other: other.port, fallback: fallback.port }), { logLevel: 'debug' });
  const client = await connect(proxy.port('tls'));
  client.setNoDelay(true);
  const echoed = readAll(client);
  const conn = await onlyConnection(proxy);
  for (let i = 0; i < hello.length; i++) {
    client.write(hello.subarray(i, i + 1));
    // Wait until the proxy has read this byte, so every byte is a separate read on its side.
    while (conn.client.bytesRead < i + 1 && conn.state === 'handshake') await tick();
    if (i < hello.length - 1) assert.equal(conn.state, 'handshake', `routed after only ${i + 1} of ${hello.length} bytes`);
  }
  client.end();
  const { data } = await echoed;
  await proxy.daemon.registry.whenEmpty();
  assert.equal(api.accepted(), 1);
  assert.equal(other.accepted() + fallback.accepted(), 0);
  assert.deepEqual(api.received, [hello]);
  assert.deepEqual(data, hello);
  assert.deepEqual(
    closedLines(proxy).map((l) => [l.route, l.sni, l.bytesFromClient]),
    [['api', 'api.example.com', hello.length]],
  );
});

test('a ClientHello of about 2 KB written in two segments routes by SNI', { timeout: 15_000 }, async (t) => {
  // Forty 50-byte ALPN names make node:tls send a ClientHello of about 2.5 KB in one record.
  const alpn = Array.from({ length: 40 }, (_, i) => `protocol-${String(i).padStart(2, '0')}-${'x'.repeat(38)}`);
  const hello = await captureClientHello({ servername: 'www.example.org', ALPNProtocols: alpn });
  assert.ok(hello.length > 2000 && hello.length < 4000, `ClientHello is ${hello.length} bytes`);
  const api = await startRecorder(t);
  const other = await startRecorder(t);
  const fallback = await startRecorder(t);
  const proxy = await startProxy(t, sniToml({ api: api.port, other: other.port, fallback: fallback.port }));
  const client = await connect(proxy.port('tls'));
  client.setNoDelay(true);
  const echoed = readAll(client);
  const conn = await onlyConnection(proxy);
  const cut = 1024;
  client.write(hello.subarray(0, cut));
  await until(() => conn.client.bytesRead >= cut, 5000, 'the proxy to read the first segment');
  assert.equal(conn.state, 'handshake', 'the first segment alone cannot route');
  client.end(hello.subarray(cut));
  const { data } = await echoed;
  await proxy.daemon.registry.whenEmpty();
  assert.equal(other.accepted(), 1);
  assert.equal(api.accepted() + fallback.accepted(), 0);
  assert.deepEqual(other.received, [hello]);
  assert.deepEqual(data, hello);
});

test('bytes that are not TLS go to the default route and are replayed unchanged', { timeout: 10_000 }, async (t) => {
  const api = await startRecorder(t);
  const other = await startRecorder(t);
  const fallback = await startRecorder(t);
  const proxy = await startProxy(t, sniToml({ api: api.port, other: other.port, fallback: fallback.port }));
  const garbage = Buffer.concat([Buffer.from('GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n'), randomBytes(64 * 1024)]);
  const client = await connect(proxy.port('tls'));
  const echoed = readAll(client);
  client.end(garbage);
  const { data, error } = await echoed;
  assert.equal(error, null);
  await proxy.daemon.registry.whenEmpty();
  assert.equal(fallback.accepted(), 1);
  assert.equal(api.accepted() + other.accepted(), 0);
  assert.equal(sha256(fallback.received[0]!), sha256(garbage));
  assert.equal(sha256(data), sha256(garbage));
});

// ---- client_hello deadline ----

test('a client that sends nothing is cut at the client_hello deadline with a reset', { timeout: 10_000 }, async (t) => {
  const api = await startRecorder(t);
  const other = await startRecorder(t);
  const fallback = await startRecorder(t);
  const proxy = await startProxy(t, sniToml({ api: api.port, other: other.port, fallback: fallback.port }, 'client_hello = "500ms"'), {
    logLevel: 'debug',
  });
  const started = Date.now();
  const client = await connect(proxy.port('tls'));
  const { reset } = await closed(client);
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 490 && elapsed < 1500, `cut after ${elapsed} ms`);
  assert.equal(reset, true);
  await proxy.daemon.registry.whenEmpty();
  assert.deepEqual(
    closedLines(proxy).map((l) => l.reason),
    ['client_hello_timeout'],
  );
  assert.equal(api.accepted() + other.accepted() + fallback.accepted(), 0);
});

test('a ClientHello trickled a byte at a time is cut at the client_hello deadline although bytes keep arriving', { timeout: 10_000 }, async (t) => {
  // One byte every 100 ms: five bytes arrive inside the 500 ms deadline, so a deadline that
  // data pushes back (an idle timer) would never fire before the hello completes (~40 s).
  const hello = await captureClientHello({ servername: 'api.example.com' });
  const api = await startRecorder(t);
  const other = await startRecorder(t);
  const fallback = await startRecorder(t);
  const proxy = await startProxy(t, sniToml({ api: api.port, other: other.port, fallback: fallback.port }, 'client_hello = "500ms"'), {
    logLevel: 'debug',
  });
  const started = Date.now();
  const client = await connect(proxy.port('tls'));
  client.setNoDelay(true);
  const ended = closed(client);
  let sent = 0;
  const trickle = setInterval(() => {
    if (!client.destroyed && !client.writableEnded) client.write(hello.subarray(sent, ++sent));
  }, 100);
  t.after(() => clearInterval(trickle));
  const { reset } = await ended;
  clearInterval(trickle);
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 490 && elapsed < 1000, `cut after ${elapsed} ms`);
  assert.ok(sent >= 3, `only ${sent} bytes were sent before the cut`);
  assert.equal(reset, true);
  await proxy.daemon.registry.whenEmpty();
  assert.deepEqual(
    closedLines(proxy).map((l) => l.reason),
    ['client_hello_timeout'],
  );
  assert.equal(api.accepted() + other.accepted() + fallback.accepted(), 0);
});

// ---- relay deadlines ----

test('the idle timeout closes a silent connection, and bytes in either direction alone keep it open', { timeout: 10_000 }, async (t) => {
  // The first byte picks what the backend does: "S" = swallow everything and never answer,
  // "P" = push one byte every 100 ms six times, then fall silent. Never an echo, so each
  // connection has traffic in one direction only.
  const backend = await startBackend(t, (socket) => {
    socket.once('data', (c: Buffer) => {
      socket.resume();
      if (c[0] !== 0x50) return;
      let pushes = 0;
      const timer = setInterval(() => {
        if (++pushes === 6 || socket.destroyed) clearInterval(timer);
        if (!socket.destroyed) socket.write('p');
      }, 100);
      socket.on('close', () => clearInterval(timer));
    });
  });
  const proxy = await startProxy(t, tcpToml([backend.port], 'idle = "300ms"'), { logLevel: 'debug' });

  const fromClient = async (): Promise<number> => {
    const client = await connect(proxy.port('tcp'));
    client.on('end', () => client.end()); // the proxy's FIN: finish our half too, so 'close' comes
    const ended = closed(client);
    let last = 0;
    for (let i = 0; i < 6; i++) {
      client.write(i === 0 ? 'S' : 's');
      last = Date.now();
      await new Promise((r) => setTimeout(r, 100));
    }
    await ended;
    return Date.now() - last;
  };
  const fromBackend = async (): Promise<number> => {
    const client = await connect(proxy.port('tcp'));
    client.on('end', () => client.end());
    let last = 0;
    client.on('data', () => (last = Date.now()));
    const ended = closed(client);
    client.write('P');
    await ended;
    return Date.now() - last;
  };
  const started = Date.now();
  const quiet = await Promise.all([fromClient(), fromBackend()]);
  const total = Date.now() - started;
  for (const ms of quiet) assert.ok(ms >= 290 && ms < 1000, `closed after ${ms} ms of silence`);
  assert.ok(total >= 800, `both lived through 600 ms of one-way traffic (${total} ms)`);
  await proxy.daemon.registry.whenEmpty();
  assert.deepEqual(
    closedLines(proxy)
      .map((l) => [l.reason, l.bytesFromClient, l.bytesFromBackend])
      .sort(),
    [
      ['idle_timeout', 1, 6],
      ['idle_timeout', 6, 0],
    ],
  );
});

test('a backend that never ends after the client FIN is closed at the half_close deadline', { timeout: 10_000 }, async (t) => {
  let backendSawEnd = false;
  const backend = await startBackend(t, (socket) => {
    socket.resume();
    socket.on('end', () => (backendSawEnd = true)); // ...and never ends its own half
  });
  const proxy = await startProxy(t, tcpToml([backend.port], 'half_close = "300ms"'), { logLevel: 'debug' });
  const client = await connect(proxy.port('tcp'));
  const ended = closed(client);
  await until(() => backend.accepted === 1, 5000, 'the backend connection');
  const finAt = Date.now();
  client.end('bye');
  await ended;
  const elapsed = Date.now() - finAt;
  assert.ok(elapsed >= 290 && elapsed < 1000, `closed ${elapsed} ms after the FIN`);
  assert.equal(backendSawEnd, true, 'the FIN was passed on to the backend');
  await proxy.daemon.registry.whenEmpty();
  assert.deepEqual(
    closedLines(proxy).map((l) => l.reason),
    ['half_close_timeout'],
  );
});

test('max_lifetime closes a connection that is busy the whole time', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const proxy = await startProxy(t, tcpToml([backend.port], 'max_lifetime = "500ms"\n  idle = "200ms"'), { logLevel: 'debug' });
  const started = Date.now();
  const client = await connect(proxy.port('tcp'));
  const ended = closed(client);
  let echoed = 0;
  client.on('data', (c: Buffer) => (echoed += c.length));
  const pinger = setInterval(() => client.writable && client.write('x'), 20);
  t.after(() => clearInterval(pinger));
  await ended;
  clearInterval(pinger);
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 490 && elapsed < 1200, `closed after ${elapsed} ms`);
  assert.ok(echoed >= 15, `only ${echoed} bytes echoed: the connection was not busy`);
  await proxy.daemon.registry.whenEmpty();
  assert.deepEqual(
    closedLines(proxy).map((l) => l.reason),
    ['max_lifetime'],
  );
});

// ---- backend choice ----

test('a refused backend is skipped and the next one carries the connection', { timeout: 10_000 }, async (t) => {
  const refused = await closedPort();
  const live = await startBackend(t);
  const proxy = await startProxy(t, tcpToml([refused, live.port]), { logLevel: 'debug' });
  const payload = randomBytes(64 * 1024);
  const client = await connect(proxy.port('tcp'));
  const received = readAll(client);
  client.end(payload);
  const { data } = await received;
  assert.equal(sha256(data), sha256(payload));
  await proxy.daemon.registry.whenEmpty();
  assert.equal(live.accepted, 1);
  const failures = proxy.lines.filter((l) => l.msg === 'backend connect failed; trying the next one');
  assert.deepEqual(
    failures.map((l) => [l.backend, l.code]),
    [[`127.0.0.1:${refused}`, 'ECONNREFUSED']],
  );
  assert.deepEqual(
    closedLines(proxy).map((l) => [l.reason, l.backend]),
    [['done', `127.0.0.1:${live.port}`]],
  );
});

test('when every backend refuses the client is closed at once, long before the connect timeout', { timeout: 10_000 }, async (t) => {
  const [a, b] = [await closedPort(), await closedPort()];
  const proxy = await startProxy(t, tcpToml([a, b], 'connect = "5s"'), { logLevel: 'debug' });
  const started = Date.now();
  const client = await connect(proxy.port('tcp'));
  client.write('hello');
  await closed(client);
  const elapsed = Date.now() - started;
  assert.ok(elapsed < 1000, `closed after ${elapsed} ms`);
  await proxy.daemon.registry.whenEmpty();
  const failures = proxy.lines.filter((l) => String(l.msg).startsWith('backend connect failed'));
  assert.deepEqual(failures.map((l) => l.backend).sort(), [`127.0.0.1:${a}`, `127.0.0.1:${b}`].sort());
  assert.deepEqual(
    closedLines(proxy).map((l) => l.reason),
    ['backend_unavailable'],
  );
});

test('a backend that never completes the TCP handshake is abandoned at the connect timeout for the next one', { timeout: 15_000 }, async (t) => {
  const blackhole = await startBlackhole(t);
  const live = await startBackend(t);
  const proxy = await startProxy(t, tcpToml([blackhole.port, live.port], 'connect = "300ms"'), { logLevel: 'debug' });
  const payload = randomBytes(16 * 1024);
  const started = Date.now();
  const client = await connect(proxy.port('tcp'));
  const received = readAll(client);
  client.end(payload);
  const { data } = await received;
  const elapsed = Date.now() - started;
  assert.equal(sha256(data), sha256(payload));
  assert.ok(elapsed >= 290 && elapsed < 2000, `relayed after ${elapsed} ms`);
  await proxy.daemon.registry.whenEmpty();
  const failures = proxy.lines.filter((l) => l.msg === 'backend connect failed; trying the next one');
  assert.deepEqual(
    failures.map((l) => [l.backend, l.code]),
    [[`127.0.0.1:${blackhole.port}`, 'ETIMEDOUT']],
  );
  assert.equal(live.accepted, 1);
});

// ---- backpressure ----

test('a client that reads nothing stalls the backend instead of growing the proxy buffers', { timeout: 30_000 }, async (t) => {
  const total = 64 << 20;
  const payload = randomBytes(total);
  let backendSocket: net.Socket | undefined;
  const backend = await startBackend(t, (socket) => {
    backendSocket = socket;
    // As fast as the proxy lets it: write until told to wait, continue on 'drain'.
    let offset = 0;
    const pump = (): void => {
      while (offset < total) {
        const chunk = payload.subarray(offset, offset + 256 * 1024);
        offset += chunk.length;
        if (!socket.write(chunk)) return void socket.once('drain', pump);
      }
      socket.end();
    };
    pump();
  });
  const proxy = await startProxy(t, tcpToml([backend.port]));
  const client = await connect(proxy.port('tcp'));
  client.pause();
  const conn = await onlyConnection(proxy);

  // The flow has stalled once the proxy has forwarded nothing more for a few polls.
  let last = -1;
  let stable = 0;
  await until(
    () => {
      const now = conn.bytesFromBackend;
      stable = now === last && now > 0 ? stable + 1 : 0;
      last = now;
      return stable >= 10;
    },
    10_000,
    'the flow to stall',
  );
  assert.ok(conn.bytesFromBackend < total, `the proxy forwarded all ${total} bytes to a client that reads nothing`);
  assert.ok(conn.client.writableLength < 1 << 20, `the proxy buffers ${conn.client.writableLength} bytes for the client`);
  assert.equal(conn.backend!.isPaused(), true, 'the proxy stopped reading the backend');
  assert.ok(backendSocket!.writableNeedDrain, 'the backend is waiting for the proxy');

  const hash = createHash('sha256');
  let length = 0;
  client.on('data', (c: Buffer) => {
    hash.update(c);
    length += c.length;
  });
  client.on('end', () => client.end());
  await closed(client); // resumes
  assert.equal(length, total);
  assert.equal(hash.digest('hex'), sha256(payload));
  await proxy.daemon.registry.whenEmpty();
});

test('a client that sends its request and FIN while queued is served once a worker frees up', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const proxy = await startProxy(t, `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
workers = 1
queue = 1
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`);
  const listener = proxy.daemon.listeners.get('tcp')!;
  const holder = await connect(proxy.port('tcp'));
  await until(() => listener.busy === 1, 2000, 'the first client to take the worker');
  const queued = await connect(proxy.port('tcp'), { localAddress: '127.0.0.2' });
  const reply = readAll(queued);
  queued.end('request while queued');
  await until(() => listener.queue.size === 1 && [...listener.queue][0]!.describe().bytesFromClient === 0, 2000, 'the second client to queue');
  holder.end();
  const { data, error } = await reply;
  assert.equal(error, null);
  assert.equal(data.toString(), 'request while queued');
  holder.destroy();
  await proxy.daemon.registry.whenEmpty();
});

test('the longest durations a config may hold arm their timers without TimeoutOverflowWarning', { timeout: 10_000 }, async (t) => {
  const warnings: string[] = [];
  const onWarning = (warning: Error): void => void warnings.push(warning.name);
  process.on('warning', onWarning);
  t.after(() => process.off('warning', onWarning));
  const backend = await startBackend(t);
  const longest = `"${MAX_DURATION_MS}ms"`; // if the cap is ever raised past what timers hold, this fails
  const proxy = await startProxy(t, tcpToml([backend.port], `idle = ${longest}\nhalf_close = ${longest}\nmax_lifetime = ${longest}`));
  const client = await connect(proxy.port('tcp'));
  const reply = readAll(client);
  client.write('ping');
  await until(() => backend.accepted === 1, 5000, 'the backend to accept');
  client.end();
  const { data } = await reply;
  assert.equal(data.toString(), 'ping');
  await proxy.daemon.registry.whenEmpty();
  // Warnings are emitted on the next tick; a timer that overflowed would also have fired (1 ms).
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(warnings.filter((name) => name === 'TimeoutOverflowWarning'), []);
});

test('the access log writes one info line per relayed connection with its route, backend, timings, bytes and reason, none for a refusal, none when off', { timeout: 15_000 }, async (t) => {
  const api = await startTlsBackend(t, 'api');
  const other = await startTlsBackend(t, 'other');
  const proxy = await startProxy(t, sniToml({ api: api.port, other: other.port }), { logLevel: 'info' });
  const port = proxy.port('tls');
  assert.equal(await tlsFirstLine(port, 'api.example.com'), 'api\n');
  assert.match(await tlsFirstLine(port, 'unknown.example.net'), /^(error:|closed)/); // no_route: a refusal
  await proxy.daemon.registry.whenEmpty();
  const lines = proxy.lines.filter((l) => l.msg === 'connection closed');
  assert.equal(lines.length, 1, 'one line, for the relayed connection only');
  const line = lines[0]!;
  assert.equal(line.level, 'info', 'the level by name');
  assert.equal(line.listener, 'tls');
  assert.equal(line.route, 'api');
  assert.equal(line.sni, 'api.example.com');
  assert.equal(line.backend, `127.0.0.1:${api.port}`);
  assert.match(String(line.client), /^127\.0\.0\.1:\d+$/);
  assert.equal(line.reason, 'done');
  assert.equal(line.attempts, 1);
  for (const key of ['queueMs', 'connectMs', 'durationMs'] as const) {
    assert.ok(typeof line[key] === 'number' && line[key] >= 0, `${key} = ${String(line[key])}`);
  }
  assert.ok((line.durationMs as number) >= (line.queueMs as number) + (line.connectMs as number));
  assert.ok((line.bytesFromClient as number) > 200, 'the ClientHello and the rest of the handshake');
  assert.ok((line.bytesFromBackend as number) > 200);

  const quiet = await startProxy(t, sniToml({ api: api.port, other: other.port }).replace('bind = ["127.0.0.1:0"]', 'bind = ["127.0.0.1:0"]\naccess_log = false'), { logLevel: 'info' });
  assert.equal(await tlsFirstLine(quiet.port('tls'), 'api.example.com'), 'api\n');
  await quiet.daemon.registry.whenEmpty();
  assert.deepEqual(quiet.lines.filter((l) => l.msg === 'connection closed'), []);
});

test('"trying the next one" is logged only when there is a next backend to try', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const dead = await closedPort();
  const proxy = await startProxy(t, tcpToml([dead, backend.port]), { logLevel: 'warn' });
  const client = await connect(proxy.port('tcp'));
  const reply = readAll(client);
  client.end('ping');
  assert.equal((await reply).data.toString(), 'ping');
  const onlyDead = await startProxy(t, tcpToml([dead]), { logLevel: 'warn' });
  const refused = await connect(onlyDead.port('tcp'));
  const ended = readAll(refused);
  refused.end('ping');
  assert.equal((await ended).data.length, 0, 'no backend answered');
  await proxy.daemon.registry.whenEmpty();
  await onlyDead.daemon.registry.whenEmpty();
  assert.deepEqual(proxy.lines.filter((l) => String(l.msg).startsWith('backend connect failed')).map((l) => l.msg), ['backend connect failed; trying the next one']);
  assert.deepEqual(onlyDead.lines.filter((l) => String(l.msg).startsWith('backend connect failed')).map((l) => l.msg), ['backend connect failed; no backend of the route is left to try']);
});

test('a queued client that closes without sending a byte has aborted: it leaves the queue at once, is never dialled, and its place goes to the next', { timeout: 10_000 }, async (t) => {
  const backend = await startBackend(t);
  const proxy = await startProxy(t, `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
workers = 1
queue = 1
queue_timeout = "30s"
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`, { logLevel: 'debug' });
  const listener = proxy.daemon.listeners.get('tcp')!;
  const holder = await connect(proxy.port('tcp'));
  await until(() => listener.busy === 1, 2000, 'the first client to take the worker');
  const quitter = await connect(proxy.port('tcp'), { localAddress: '127.0.0.2' });
  quitter.on('error', () => {}); // a refusal from the queue is a reset
  await until(() => listener.queue.size === 1, 2000, 'the quitter to queue');
  quitter.end(); // FIN without a byte, long before queue_timeout
  await until(() => listener.queue.size === 0, 2000, 'the quitter to leave the queue');
  // Its place is free: the next client queues (queue = 1) and is served when the worker frees.
  const next = await connect(proxy.port('tcp'), { localAddress: '127.0.0.3' });
  await until(() => listener.queue.size === 1, 2000, 'the next client to queue');
  const reply = readAll(next);
  next.write('next');
  holder.end();
  await until(() => backend.accepted === 2, 5000, 'the next client to reach the backend');
  next.end();
  assert.equal((await reply).data.toString(), 'next');
  holder.destroy();
  quitter.destroy();
  await proxy.daemon.registry.whenEmpty();
  assert.equal(backend.accepted, 2, 'the quitter was never dialled');
  const quitterLine = proxy.lines.find((l) => l.msg === 'connection closed' && String(l.client).startsWith('127.0.0.2:'));
  assert.equal(quitterLine?.reason, 'client_gone');
});
