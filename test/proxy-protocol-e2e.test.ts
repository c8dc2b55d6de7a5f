// PROXY protocol end to end (issue 6): what a listener does with a header it receives (trusted or
// not, well-formed or not, complete or not), what a route sends to its backend, a chain of two
// smartproxies, and interop with HAProxy when it is installed.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import tls from 'node:tls';
import type { Connection } from '../src/connection/connection.ts';
import { clientHello } from './support/audit.ts';
import { parseProxyHeader, PP2_TYPE, type ProxyHeader } from '../src/proxy-protocol/parse.ts';
import { writeProxyHeaderV1, writeProxyHeaderV2, writeProxyHeaderV2Local } from '../src/proxy-protocol/write.ts';
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
  type Backend,
  type ProxyUnderTest,
} from './support/harness.ts';

// ---- fixtures --------------------------------------------------------------------------------

/** A header naming `source` as the client of a balancer that was dialled at 127.0.0.1:443. */
function headerFrom(version: 'v1' | 'v2', source: string, port = 40000): Buffer {
  const fields = { source: { address: source, port }, destination: { address: '127.0.0.1', port: 443 } };
  return version === 'v1' ? writeProxyHeaderV1(fields) : writeProxyHeaderV2(fields);
}

/** The "connection closed" debug lines: one per closed connection, with its reason and describe(). */
function closeLines(proxy: ProxyUnderTest): Array<Record<string, unknown>> {
  return proxy.lines.filter((line) => line.msg === 'connection closed');
}

function reasons(proxy: ProxyUnderTest): string[] {
  return closeLines(proxy).map((line) => String(line.reason));
}

/** One connection accepted by a raw backend. */
interface Peer {
  readonly socket: net.Socket;
  /** The first chunk read from the proxy. */
  readonly first: Promise<Buffer>;
  /** Every byte until the proxy ended its side (this side then ends too). */
  readonly all: Promise<Buffer>;
}

interface RawBackend {
  readonly backend: Backend;
  /** The i-th connection accepted (0-based), once it arrives. */
  peer(i: number): Promise<Peer>;
}

/** A TCP server that records what each connection sends and answers nothing; ends when the proxy ends. */
async function startRawBackend(t: TestContext): Promise<RawBackend> {
  const arrivals: Array<{ promise: Promise<Peer>; resolve: (peer: Peer) => void }> = [];
  const slot = (i: number): { promise: Promise<Peer>; resolve: (peer: Peer) => void } => {
    let entry = arrivals[i];
    if (entry === undefined) {
      let resolve!: (peer: Peer) => void;
      const promise = new Promise<Peer>((r) => (resolve = r));
      entry = { promise, resolve };
      arrivals[i] = entry;
    }
    return entry;
  };
  let count = 0;
  const backend = await startBackend(t, (socket) => {
    const chunks: Buffer[] = [];
    const first = new Promise<Buffer>((resolve) => socket.once('data', resolve));
    const all = new Promise<Buffer>((resolve) => {
      socket.on('data', (chunk: Buffer) => chunks.push(chunk));
      socket.on('end', () => {
        socket.end();
        resolve(Buffer.concat(chunks));
      });
      socket.on('close', () => resolve(Buffer.concat(chunks)));
    });
    slot(count++).resolve({ socket, first, all });
  });
  return { backend, peer: (i) => slot(i).promise };
}

/** Splits a stream received by a backend into its leading PROXY header and the bytes after it. */
function splitHeader(stream: Buffer): { header: ProxyHeader; rest: Buffer } {
  const result = parseProxyHeader(stream, 'any');
  assert.equal(result.kind, 'header', `the backend stream does not start with a PROXY header: ${JSON.stringify(result)}`);
  assert.ok(result.kind === 'header');
  return { header: result.header, rest: stream.subarray(result.consumed) };
}

/** A smartproxy "edge" listener routing api.example.com and web.example.com, accepting PROXY headers. */
function edgeToml(o: {
  api: number;
  web: number;
  accept?: 'v1' | 'v2' | 'any';
  require?: boolean;
  clientHello?: string;
  block?: string[];
  send?: 'v1' | 'v2';
  passThrough?: number[];
}): string {
  const send = o.send === undefined ? '' : `send_proxy_protocol = "${o.send}"`;
  const pass = o.passThrough === undefined ? '' : `pass_through_tlvs = [${o.passThrough.join(', ')}]`;
  return `
[[listeners]]
name = "edge"
bind = ["127.0.0.1:0"]
  [listeners.timeouts]
  client_hello = "${o.clientHello ?? '5s'}"
  [listeners.firewall]
  block = ${JSON.stringify(o.block ?? [])}
  [listeners.proxy_protocol]
  accept = "${o.accept ?? 'any'}"
  trusted = ["127.0.0.1"]
  require = ${o.require ?? true}
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["127.0.0.1:${o.api}"]
  ${send}
  ${pass}
  [[listeners.routes]]
  name = "web"
  sni = ["web.example.com"]
  backends = ["127.0.0.1:${o.web}"]
`;
}

/** Writes `bytes` one byte per write, each flushed to the kernel before the next. */
async function writeByteByByte(socket: net.Socket, bytes: Buffer): Promise<void> {
  socket.setNoDelay(true);
  for (let i = 0; i < bytes.length; i++) {
    await new Promise<void>((resolve, reject) => socket.write(bytes.subarray(i, i + 1), (err) => (err ? reject(err) : resolve())));
    await new Promise((resolve) => setImmediate(resolve));
  }
}

/** Sends a header (or anything) and expects the proxy to refuse the connection with a reset. */
async function expectRefused(port: number, bytes: Buffer, localAddress?: string): Promise<void> {
  const client = await connect(port, { localAddress });
  const ended = closed(client);
  client.write(bytes);
  assert.deepEqual(await ended, { reset: true }, 'the refusal is a reset');
}

/** The only live connection of a daemon. */
function onlyConnection(proxy: ProxyUnderTest): Connection {
  const live = [...proxy.daemon.registry.values()];
  assert.equal(live.length, 1, 'exactly one live connection');
  return live[0]!;
}

// ---- receiving a header ----------------------------------------------------------------------

test('a header and a ClientHello in one write route by SNI, and the backend receives only the ClientHello', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port }), { logLevel: 'debug' });
  const versions = ['v1', 'v2'] as const;
  for (const [i, version] of versions.entries()) {
    const hello = clientHello('api.example.com');
    const client = await connect(proxy.port('edge'));
    const answer = readAll(client);
    client.end(Buffer.concat([headerFrom(version, '127.0.0.7', 40000 + i), hello]));
    const peer = await api.peer(i);
    assert.deepEqual(await peer.all, hello, `${version}: the backend got exactly the ClientHello, no header byte`);
    assert.equal((await answer).error, null);
  }
  await proxy.daemon.registry.whenEmpty();
  assert.equal(api.backend.accepted, 2);
  assert.equal(web.backend.accepted, 0);
  assert.deepEqual(reasons(proxy), ['done', 'done']);
  assert.deepEqual(
    closeLines(proxy).map((l) => [l.client, l.via, l.sni, l.route]),
    [
      ['127.0.0.7:40000', '127.0.0.1', 'api.example.com', 'api'],
      ['127.0.0.7:40001', '127.0.0.1', 'api.example.com', 'api'],
    ],
  );
  assert.equal(proxy.daemon.registry.size, 0);
});

test('a header and a ClientHello written one byte at a time still route by SNI', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port }), { logLevel: 'debug' });
  const versions = ['v1', 'v2'] as const;
  for (const [i, version] of versions.entries()) {
    const hello = clientHello('web.example.com');
    const client = await connect(proxy.port('edge'));
    const answer = readAll(client);
    await writeByteByByte(client, Buffer.concat([headerFrom(version, '127.0.0.8'), hello]));
    client.end();
    assert.deepEqual(await (await web.peer(i)).all, hello, `${version}: the backend got exactly the ClientHello`);
    assert.equal((await answer).error, null);
  }
  await proxy.daemon.registry.whenEmpty();
  assert.equal(web.backend.accepted, 2);
  assert.equal(api.backend.accepted, 0);
  assert.deepEqual(reasons(proxy), ['done', 'done']);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('a real TLS handshake after a PROXY v2 header completes with the backend chosen by SNI', { timeout: 10_000 }, async (t) => {
  const api = await startTlsBackend(t, 'api');
  const web = await startTlsBackend(t, 'web');
  const proxy = await startProxy(t, edgeToml({ api: api.port, web: web.port }));
  const raw = await connect(proxy.port('edge'));
  raw.write(headerFrom('v2', '127.0.0.9'));
  const secure = tls.connect({ socket: raw, servername: 'web.example.com', rejectUnauthorized: false });
  const [line] = (await once(secure, 'data')) as [Buffer];
  assert.equal(line.toString(), 'web\n');
  const live = onlyConnection(proxy).describe();
  assert.equal(live.client, '127.0.0.9:40000');
  assert.equal(live.via, '127.0.0.1');
  secure.destroy();
  await proxy.daemon.registry.whenEmpty();
  assert.equal(web.accepted, 1);
  assert.equal(api.accepted, 0);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('a trusted source whose header never completes is cut at client_hello with client_hello_timeout', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port, clientHello: '300ms' }), { logLevel: 'debug' });
  const full = headerFrom('v2', '127.0.0.7');
  const partials = [
    Buffer.from('PROXY TCP4 127.0.0.7 127.0.0.1 4000'), // no CRLF yet
    full.subarray(0, 8), // half the v2 signature
    full.subarray(0, full.length - 3), // all but the last bytes of the address block
    Buffer.alloc(0), // nothing at all
  ];
  const started = Date.now();
  await Promise.all(partials.map((partial) => expectRefused(proxy.port('edge'), partial)));
  assert.ok(Date.now() - started >= 250, `cut by the deadline, not before (${Date.now() - started} ms)`);
  assert.deepEqual(reasons(proxy), Array(partials.length).fill('client_hello_timeout'));
  assert.equal(api.backend.accepted + web.backend.accepted, 0);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('a malformed header is refused with proxy_header_invalid and never reaches a backend', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port }), { logLevel: 'debug' });
  const v2 = headerFrom('v2', '127.0.0.7');
  const badVersion = Buffer.from(v2);
  badVersion[12] = 0x31; // version 3
  const tooLong = Buffer.from(v2);
  tooLong.writeUInt16BE(5000, 14);
  const malformed = [
    Buffer.from('PROXY TCP4 127.0.0.999 127.0.0.1 40000 443\r\n'),
    Buffer.from('PROXY TCP9 127.0.0.7 127.0.0.1 40000 443\r\n'),
    Buffer.from(`PROXY TCP4 ${'1'.repeat(120)}`), // no CRLF within 107 bytes
    badVersion,
    tooLong,
  ];
  for (const bytes of malformed) await expectRefused(proxy.port('edge'), Buffer.concat([bytes, clientHello('api.example.com')]));
  assert.deepEqual(reasons(proxy), Array(malformed.length).fill('proxy_header_invalid'));
  assert.equal(api.backend.accepted + web.backend.accepted, 0);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('with require = true a trusted source that sends no header is refused with proxy_header_invalid', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port, require: true }), { logLevel: 'debug' });
  await expectRefused(proxy.port('edge'), clientHello('api.example.com'));
  assert.deepEqual(reasons(proxy), ['proxy_header_invalid']);
  assert.equal(api.backend.accepted, 0);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('with require = false a trusted source that sends no header is served as a direct client', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port, require: false }), { logLevel: 'debug' });
  const hello = clientHello('api.example.com');
  const client = await connect(proxy.port('edge'));
  const clientPort = client.localPort;
  const answer = readAll(client);
  client.end(hello);
  assert.deepEqual(await (await api.peer(0)).all, hello);
  assert.equal((await answer).error, null);
  await proxy.daemon.registry.whenEmpty();
  const [line] = closeLines(proxy);
  assert.equal(line?.reason, 'done');
  assert.equal(line?.client, `127.0.0.1:${clientPort}`);
  assert.equal(line?.via, null);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('an untrusted source that sends a PROXY header is refused with proxy_untrusted', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port }), { logLevel: 'debug' });
  for (const version of ['v1', 'v2'] as const) {
    const spoof = Buffer.concat([headerFrom(version, '127.0.0.1'), clientHello('api.example.com')]);
    await expectRefused(proxy.port('edge'), spoof, '127.0.0.2');
  }
  // A header cut short is refused at once too: a whole signature is no ClientHello's first bytes.
  const started = Date.now();
  await expectRefused(proxy.port('edge'), Buffer.from('PROXY TCP4 127.0.0.1'), '127.0.0.2');
  await expectRefused(proxy.port('edge'), headerFrom('v2', '127.0.0.1').subarray(0, 12), '127.0.0.2');
  assert.ok(Date.now() - started < 2000, 'refused without waiting for client_hello (5 s)');
  assert.deepEqual(reasons(proxy), Array(4).fill('proxy_untrusted'));
  assert.deepEqual(
    closeLines(proxy).map((l) => [String(l.client).split(':')[0], l.via]),
    Array(4).fill(['127.0.0.2', null]),
  );
  assert.equal(api.backend.accepted + web.backend.accepted, 0);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('an untrusted client that sends a plain ClientHello is served as itself', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port }), { logLevel: 'debug' });
  const hello = clientHello('api.example.com');
  const client = await connect(proxy.port('edge'), { localAddress: '127.0.0.2' });
  const answer = readAll(client);
  client.write(hello);
  const peer = await api.peer(0);
  assert.deepEqual(await peer.first, hello);
  const live = onlyConnection(proxy).describe();
  assert.equal(live.client, `127.0.0.2:${client.localPort}`);
  assert.equal(live.via, null);
  assert.equal(live.state, 'relaying');
  client.end();
  assert.deepEqual(await peer.all, hello);
  assert.equal((await answer).error, null);
  await proxy.daemon.registry.whenEmpty();
  assert.deepEqual(reasons(proxy), ['done']);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('with accept = "v1" a v1 header is accepted and a v2 header is refused with proxy_header_invalid', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port, accept: 'v1' }), { logLevel: 'debug' });
  await expectRefused(proxy.port('edge'), Buffer.concat([headerFrom('v2', '127.0.0.7'), clientHello('api.example.com')]));
  const hello = clientHello('api.example.com');
  const client = await connect(proxy.port('edge'));
  const answer = readAll(client);
  client.end(Buffer.concat([headerFrom('v1', '127.0.0.7'), hello]));
  assert.deepEqual(await (await api.peer(0)).all, hello);
  await answer;
  await proxy.daemon.registry.whenEmpty();
  assert.deepEqual(reasons(proxy), ['proxy_header_invalid', 'done']);
  assert.equal(api.backend.accepted, 1);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('a live connection behind a balancer shows the real client and the balancer as via; a LOCAL header keeps the balancer', { timeout: 10_000 }, async (t) => {
  const api = await startBackend(t); // echo
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.port, web: web.backend.port }));
  for (const [header, client, via] of [
    [headerFrom('v2', '127.0.0.7', 41234), '127.0.0.7:41234', '127.0.0.1'],
    [writeProxyHeaderV2Local(), null, null],
  ] as const) {
    const hello = clientHello('api.example.com');
    const socket = await connect(proxy.port('edge'));
    const echoed: Buffer[] = [];
    socket.on('data', (chunk: Buffer) => echoed.push(chunk));
    socket.write(Buffer.concat([header, hello]));
    await until(() => Buffer.concat(echoed).length === hello.length, 5000, 'the ClientHello echoed back');
    const live = onlyConnection(proxy).describe();
    assert.deepEqual(
      { client: live.client, via: live.via, sni: live.sni, route: live.route, state: live.state },
      { client: client ?? `127.0.0.1:${socket.localPort}`, via, sni: 'api.example.com', route: 'api', state: 'relaying' },
    );
    socket.destroy();
    await proxy.daemon.registry.whenEmpty();
  }
  assert.equal(proxy.daemon.registry.size, 0);
});

test('the listener firewall judges the client named in the header, not the balancer', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port, block: ['127.0.0.66'] }), { logLevel: 'debug' });
  await expectRefused(proxy.port('edge'), Buffer.concat([headerFrom('v1', '127.0.0.66'), clientHello('api.example.com')]));
  const hello = clientHello('api.example.com');
  const client = await connect(proxy.port('edge'));
  const answer = readAll(client);
  client.end(Buffer.concat([headerFrom('v1', '127.0.0.67'), hello]));
  assert.deepEqual(await (await api.peer(0)).all, hello);
  await answer;
  await proxy.daemon.registry.whenEmpty();
  assert.deepEqual(reasons(proxy), ['firewall', 'done']);
  assert.equal(closeLines(proxy)[0]?.client, '127.0.0.66:40000');
  assert.equal(api.backend.accepted, 1);
  assert.equal(proxy.daemon.registry.size, 0);
});

// ---- sending a header ------------------------------------------------------------------------

test('a v1 route sends one header with the real client and the address it dialled, before any client byte', { timeout: 10_000 }, async (t) => {
  const raw = await startRawBackend(t);
  const proxy = await startProxy(t, `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "raw"
  default = true
  backends = ["127.0.0.1:${raw.backend.port}"]
  send_proxy_protocol = "v1"
`);
  const payload = randomBytes(64 * 1024);
  const client = await connect(proxy.port('tcp'), { localAddress: '127.0.0.3' });
  const answer = readAll(client);
  client.end(payload);
  const peer = await raw.peer(0);
  // The header is one write: the first segment the backend reads holds all of it.
  assert.equal(parseProxyHeader(await peer.first, 'any').kind, 'header');
  const { header, rest } = splitHeader(await peer.all);
  assert.deepEqual(
    { version: header.version, command: header.command, family: header.family, source: header.source, destination: header.destination },
    {
      version: 1,
      command: 'proxy',
      family: 'tcp4',
      source: { address: '127.0.0.3', port: client.localPort },
      destination: { address: '127.0.0.1', port: proxy.port('tcp') },
    },
  );
  assert.equal(sha256(rest), sha256(payload), 'every client byte follows the header, unchanged');
  assert.equal((await answer).error, null);
  await proxy.daemon.registry.whenEmpty();
  assert.equal(proxy.daemon.registry.size, 0);
});

test('a v2 route sends AUTHORITY = SNI and UNIQUE_ID = the connection uniqueId', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  // No PROXY header expected here: a plain SNI listener.
  const proxy = await startProxy(t, `
[[listeners]]
name = "tls"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["127.0.0.1:${api.backend.port}"]
  send_proxy_protocol = "v2"
  [[listeners.routes]]
  name = "web"
  sni = ["web.example.com"]
  backends = ["127.0.0.1:${web.backend.port}"]
`);
  const hello = clientHello('api.example.com');
  const client = await connect(proxy.port('tls'), { localAddress: '127.0.0.3' });
  const answer = readAll(client);
  client.write(hello);
  const peer = await api.peer(0);
  const first = parseProxyHeader(await peer.first, 'any');
  assert.equal(first.kind, 'header', 'the whole header arrives first');
  const uniqueId = onlyConnection(proxy).uniqueId;
  client.end();
  const { header, rest } = splitHeader(await peer.all);
  assert.equal(header.version, 2);
  assert.deepEqual(header.source, { address: '127.0.0.3', port: client.localPort });
  assert.deepEqual(header.destination, { address: '127.0.0.1', port: proxy.port('tls') });
  assert.equal(header.authority, 'api.example.com');
  assert.match(uniqueId, /^[0-9a-f]{8}-\d+$/);
  assert.equal(header.uniqueId?.toString('latin1'), uniqueId);
  assert.deepEqual(rest, hello);
  assert.equal((await answer).error, null);
  await proxy.daemon.registry.whenEmpty();
  assert.equal(web.backend.accepted, 0);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('pass_through_tlvs copies a 0xEA TLV from the balancer and forwards the balancer\'s client and destination', { timeout: 10_000 }, async (t) => {
  const api = await startRawBackend(t);
  const web = await startRawBackend(t);
  const proxy = await startProxy(t, edgeToml({ api: api.backend.port, web: web.backend.port, accept: 'v2', send: 'v2', passThrough: [0xea] }));
  const received = writeProxyHeaderV2({
    source: { address: '127.0.0.10', port: 5555 },
    destination: { address: '127.0.0.11', port: 8443 },
    tlvs: [
      { type: 0xea, value: Buffer.from('tenant-42') },
      { type: 0xeb, value: Buffer.from('not listed') },
      { type: PP2_TYPE.UNIQUE_ID, value: Buffer.from('balancer-id') },
    ],
  });
  const hello = clientHello('api.example.com');
  const client = await connect(proxy.port('edge'));
  const answer = readAll(client);
  client.end(Buffer.concat([received, hello]));
  const { header, rest } = splitHeader(await (await api.peer(0)).all);
  assert.deepEqual(header.source, { address: '127.0.0.10', port: 5555 });
  assert.deepEqual(header.destination, { address: '127.0.0.11', port: 8443 }, 'the original destination is the balancer\'s');
  assert.equal(header.authority, 'api.example.com');
  assert.deepEqual(
    header.tlvs.filter((tlv) => tlv.type === 0xea).map((tlv) => tlv.value.toString()),
    ['tenant-42'],
  );
  assert.equal(header.tlvs.some((tlv) => tlv.type === 0xeb), false, 'a TLV not listed is not copied');
  assert.notEqual(header.uniqueId?.toString(), 'balancer-id', 'UNIQUE_ID is ours, not the balancer\'s');
  assert.deepEqual(rest, hello);
  await answer;
  await proxy.daemon.registry.whenEmpty();
  assert.equal(proxy.daemon.registry.size, 0);
});

// ---- a chain: client -> smartproxy A (send v2) -> smartproxy B (accept v2) -> echo ----------

interface Chain {
  readonly a: ProxyUnderTest;
  readonly b: ProxyUnderTest;
  readonly echo: Backend;
  readonly port: number;
}

async function startChain(t: TestContext): Promise<Chain> {
  const echo = await startBackend(t);
  const b = await startProxy(t, `
[[listeners]]
name = "b"
bind = ["127.0.0.1:0"]
  [listeners.limits]
  max_connections_per_ip = 2
  [listeners.proxy_protocol]
  accept = "v2"
  trusted = ["127.0.0.1"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${echo.port}"]
`, { logLevel: 'debug' });
  const a = await startProxy(t, `
[[listeners]]
name = "a"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "to-b"
  default = true
  backends = ["127.0.0.1:${b.port('b')}"]
  send_proxy_protocol = "v2"
`, { logLevel: 'debug' });
  return { a, b, echo, port: a.port('a') };
}

/** A client of the chain that remembers every byte echoed back and ends when its peer ends. */
interface ChainClient {
  readonly socket: net.Socket;
  /** Kept: a closed socket forgets its port. */
  readonly localPort: number;
  readonly sent: Buffer[];
  readonly received: Buffer[];
  readonly closed: Promise<void>;
}

async function chainClient(port: number, localAddress: string): Promise<ChainClient> {
  const socket = await connect(port, { localAddress });
  const received: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => received.push(chunk));
  socket.on('end', () => socket.end());
  socket.on('error', () => {});
  const ended = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  return { socket, localPort: socket.localPort!, sent: [], received, closed: ended };
}

/** Sends `bytes` and waits until all of it (and everything before) has come back. */
async function roundTrip(client: ChainClient, bytes: Buffer): Promise<void> {
  client.sent.push(bytes);
  const total = Buffer.concat(client.sent).length;
  client.socket.write(bytes);
  await until(() => Buffer.concat(client.received).length >= total, 5000, 'the echo through the chain');
}

test('through two proxies the per-IP limit of the second applies to the real clients', { timeout: 15_000 }, async (t) => {
  const { a, b, echo, port } = await startChain(t);
  const clients: ChainClient[] = [];
  for (const address of ['127.0.0.2', '127.0.0.3', '127.0.0.2', '127.0.0.3']) {
    const client = await chainClient(port, address);
    await roundTrip(client, randomBytes(32 * 1024));
    clients.push(client);
  }
  assert.equal(echo.accepted, 4);
  assert.deepEqual(
    [...b.daemon.registry.values()].map((c) => c.describe().client.split(':')[0]).sort(),
    ['127.0.0.2', '127.0.0.2', '127.0.0.3', '127.0.0.3'],
  );
  assert.ok([...b.daemon.registry.values()].every((c) => c.via === '127.0.0.1'));

  // A third connection from 127.0.0.2: A accepts it, B refuses the client A names.
  const third = await chainClient(port, '127.0.0.2');
  await third.closed;
  assert.equal(Buffer.concat(third.received).length, 0);
  const refusal = closeLines(b).find((l) => l.reason === 'ip_limit');
  assert.equal(refusal?.client, `127.0.0.2:${third.localPort}`);
  assert.equal(refusal?.via, '127.0.0.1');
  assert.equal(echo.accepted, 4, 'the refused connection never reached the backend');

  // 127.0.0.3 is unaffected, and so are the two connections of 127.0.0.2 already in.
  for (const client of clients) await roundTrip(client, randomBytes(64 * 1024));
  for (const client of clients) client.socket.end();
  await Promise.all(clients.map((c) => c.closed));
  for (const client of clients) assert.equal(sha256(Buffer.concat(client.received)), sha256(Buffer.concat(client.sent)));

  // Their counts at B were released: 127.0.0.2 gets in again.
  const again = await chainClient(port, '127.0.0.2');
  await roundTrip(again, randomBytes(1024));
  again.socket.end();
  await again.closed;

  await Promise.all([a.daemon.registry.whenEmpty(), b.daemon.registry.whenEmpty()]);
  assert.deepEqual(reasons(b).sort(), ['done', 'done', 'done', 'done', 'done', 'ip_limit']);
  assert.deepEqual(reasons(a).sort(), ['backend_reset', 'done', 'done', 'done', 'done', 'done']);
  assert.equal(a.daemon.registry.size, 0);
  assert.equal(b.daemon.registry.size, 0);
});

test('when the backend behind the chain resets, both proxies close every connection', { timeout: 10_000 }, async (t) => {
  const { a, b, echo, port } = await startChain(t);
  const clients: ChainClient[] = [];
  for (const address of ['127.0.0.2', '127.0.0.3', '127.0.0.4', '127.0.0.5', '127.0.0.6']) {
    const client = await chainClient(port, address);
    await roundTrip(client, randomBytes(4096));
    clients.push(client);
  }
  assert.equal(a.daemon.registry.size, 5);
  assert.equal(b.daemon.registry.size, 5);
  for (const socket of echo.sockets) socket.resetAndDestroy();
  await Promise.all(clients.map((c) => c.closed));
  await Promise.all([a.daemon.registry.whenEmpty(), b.daemon.registry.whenEmpty()]);
  assert.deepEqual(reasons(b), Array(5).fill('backend_reset'));
  assert.equal(reasons(a).length, 5);
  assert.equal(a.daemon.registry.size, 0);
  assert.equal(b.daemon.registry.size, 0);
});

test('when the second proxy stops, the first closes its connections and new ones end backend_unavailable', { timeout: 10_000 }, async (t) => {
  const { a, b, port } = await startChain(t);
  const clients: ChainClient[] = [];
  for (const address of ['127.0.0.2', '127.0.0.3', '127.0.0.4']) {
    const client = await chainClient(port, address);
    await roundTrip(client, randomBytes(4096));
    clients.push(client);
  }
  await b.daemon.shutdown({ immediate: true });
  await Promise.all(clients.map((c) => c.closed));
  await a.daemon.registry.whenEmpty();
  assert.deepEqual(reasons(b), ['shutdown', 'shutdown', 'shutdown']);
  assert.equal(reasons(a).length, 3);

  const late = await chainClient(port, '127.0.0.2');
  await late.closed;
  await a.daemon.registry.whenEmpty();
  assert.equal(reasons(a)[3], 'backend_unavailable');
  assert.equal(a.daemon.registry.size, 0);
  assert.equal(b.daemon.registry.size, 0);
});

// ---- HAProxy interop ---------------------------------------------------------------------------

/** The haproxy binary, or null when it is not installed. */
function findHaproxy(): string | null {
  // /usr/sbin is not on a non-root user's PATH on Debian, where the package installs it.
  for (const candidate of ['haproxy', '/usr/sbin/haproxy']) {
    const probe = spawnSync(candidate, ['-v'], { encoding: 'utf8' });
    if (probe.error === undefined && probe.status === 0) return candidate;
  }
  return null;
}

const HAPROXY = findHaproxy();
// In CI a missing haproxy is a failure, not a skip: .ci/run installs it, and a skipped interop
// test proves nothing.
if (HAPROXY === null && process.env.CI) throw new Error('haproxy not installed, and CI is set: .ci/run must install it');
const NO_HAPROXY = 'haproxy not installed: `apt-get install -y haproxy` to run the interop tests';

/** Resolves true once something accepts on the port (nothing is sent; resets are ignored). */
function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' });
    socket.on('error', () => resolve(false));
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
  });
}

/**
 * Runs `haproxy -db -f <cfg>` in the foreground as our child. `probePort` must be a frontend of
 * the config that rejects at once: its answering means every frontend is bound.
 */
async function startHaproxy(t: TestContext, config: string, probePort: number): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'smartproxy-haproxy-'));
  const file = join(dir, 'haproxy.cfg');
  writeFileSync(file, config);
  const child = spawn(HAPROXY!, ['-db', '-f', file], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<void>((resolve) => child.once('close', () => resolve()));
  child.on('error', () => {});
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) process.kill(child.pid, 'SIGTERM');
    await exited;
    rmSync(dir, { recursive: true, force: true });
  });
  const deadline = Date.now() + 5000;
  while (!(await accepts(probePort))) {
    if (child.exitCode !== null) throw new Error(`haproxy exited with ${child.exitCode}:\n${stderr}`);
    if (Date.now() > deadline) throw new Error(`haproxy did not bind within 5 s:\n${stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function haproxyConfig(probePort: number, frontend: string, server: string): string {
  return haproxyConfigLines(probePort, [frontend], server);
}

function haproxyConfigLines(probePort: number, frontend: readonly string[], server: string): string {
  return `
global
  maxconn 100
defaults
  mode tcp
  timeout connect 2s
  timeout client 10s
  timeout server 10s
frontend probe
  bind 127.0.0.1:${probePort}
  tcp-request connection reject
frontend fe
  ${frontend.join('\n  ')}
  default_backend be
backend be
  ${server}
`;
}

test('HAProxy send-proxy-v2 in front of smartproxy: smartproxy sees and forwards the real client', { timeout: 15_000 }, async (t) => {
  if (HAPROXY === null) return t.skip(NO_HAPROXY);
  const raw = await startRawBackend(t);
  const proxy = await startProxy(t, `
[[listeners]]
name = "behind-haproxy"
bind = ["127.0.0.1:0"]
  [listeners.proxy_protocol]
  accept = "v2"
  trusted = ["127.0.0.1"]
  [[listeners.routes]]
  name = "raw"
  default = true
  backends = ["127.0.0.1:${raw.backend.port}"]
  send_proxy_protocol = "v1"
`, { logLevel: 'debug' });
  const [probePort, frontPort] = [await closedPort(), await closedPort()];
  await startHaproxy(
    t,
    haproxyConfig(probePort, `bind 127.0.0.1:${frontPort}`, `server s1 127.0.0.1:${proxy.port('behind-haproxy')} send-proxy-v2`),
    probePort,
  );
  const payload = randomBytes(16 * 1024);
  const client = await connect(frontPort, { localAddress: '127.0.0.4' });
  const answer = readAll(client);
  client.write(payload);
  const peer = await raw.peer(0);
  await peer.first;
  const live = onlyConnection(proxy).describe();
  assert.equal(live.client, `127.0.0.4:${client.localPort}`);
  assert.equal(live.via, '127.0.0.1');
  client.end();
  const { header, rest } = splitHeader(await peer.all);
  assert.deepEqual(header.source, { address: '127.0.0.4', port: client.localPort });
  assert.deepEqual(header.destination, { address: '127.0.0.1', port: frontPort }, 'the address the client dialled at HAProxy');
  assert.equal(sha256(rest), sha256(payload));
  assert.equal((await answer).error, null);
  await proxy.daemon.registry.whenEmpty();
  assert.deepEqual(reasons(proxy), ['done']);
  assert.equal(raw.backend.accepted, 1);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('smartproxy send_proxy_protocol v1 and v2 into HAProxy accept-proxy: HAProxy sees the real client', { timeout: 15_000 }, async (t) => {
  if (HAPROXY === null) return t.skip(NO_HAPROXY);
  const raw = await startRawBackend(t);
  const [probePort, frontPort] = [await closedPort(), await closedPort()];
  await startHaproxy(
    t,
    haproxyConfig(probePort, `bind 127.0.0.1:${frontPort} accept-proxy`, `server s1 127.0.0.1:${raw.backend.port} send-proxy`),
    probePort,
  );
  const proxy = await startProxy(t, `
[[listeners]]
name = "front"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "v1"
  sni = ["v1.example.com"]
  backends = ["127.0.0.1:${frontPort}"]
  send_proxy_protocol = "v1"
  [[listeners.routes]]
  name = "v2"
  sni = ["v2.example.com"]
  backends = ["127.0.0.1:${frontPort}"]
  send_proxy_protocol = "v2"
`);
  for (const [i, version] of ['v1', 'v2'].entries()) {
    const hello = clientHello(`${version}.example.com`);
    const client = await connect(proxy.port('front'), { localAddress: '127.0.0.5' });
    const answer = readAll(client);
    client.end(hello);
    const { header, rest } = splitHeader(await (await raw.peer(i)).all);
    assert.equal(header.version, 1, 'HAProxy re-sends what it parsed as v1');
    assert.deepEqual(header.source, { address: '127.0.0.5', port: client.localPort }, `${version}: HAProxy believed the real client`);
    assert.deepEqual(header.destination, { address: '127.0.0.1', port: proxy.port('front') });
    assert.deepEqual(rest, hello, `${version}: HAProxy passed on exactly the client bytes`);
    assert.equal((await answer).error, null);
  }
  await proxy.daemon.registry.whenEmpty();
  assert.equal(raw.backend.accepted, 2);
  assert.equal(proxy.daemon.registry.size, 0);
});

test('HAProxy reads the AUTHORITY and UNIQUE_ID that smartproxy sends in v2, and passes them on', { timeout: 15_000 }, async (t) => {
  if (HAPROXY === null) return t.skip(NO_HAPROXY);
  const raw = await startRawBackend(t);
  const [probePort, frontPort] = [await closedPort(), await closedPort()];
  await startHaproxy(
    t,
    haproxyConfigLines(
      probePort,
      [`bind 127.0.0.1:${frontPort} accept-proxy`, 'unique-id-format %[fc_pp_unique_id]'],
      `server s1 127.0.0.1:${raw.backend.port} send-proxy-v2 proxy-v2-options authority,unique-id`,
    ),
    probePort,
  );
  const proxy = await startProxy(t, `
[[listeners]]
name = "front"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["127.0.0.1:${frontPort}"]
  send_proxy_protocol = "v2"
`, { logLevel: 'debug' });
  const hello = clientHello('api.example.com');
  const client = await connect(proxy.port('front'), { localAddress: '127.0.0.5' });
  const clientPort = client.localPort;
  const answer = readAll(client);
  client.end(hello);
  const { header, rest } = splitHeader(await (await raw.peer(0)).all);
  assert.equal((await answer).error, null);
  await proxy.daemon.registry.whenEmpty();
  const [closedLine] = closeLines(proxy);
  assert.equal(header.version, 2);
  assert.deepEqual(header.source, { address: '127.0.0.5', port: clientPort });
  assert.equal(header.authority, 'api.example.com');
  assert.equal(header.uniqueId?.toString('latin1'), closedLine?.conn, 'HAProxy kept our connection id');
  assert.deepEqual(rest, hello);
  assert.equal(proxy.daemon.registry.size, 0);
});
