import assert from 'node:assert/strict';
import { once } from 'node:events';
import net, { type AddressInfo } from 'node:net';
import { test, type TestContext } from 'node:test';
import tls from 'node:tls';

import { ClientHelloReader, MAX_HELLO_BYTES, parseClientHello, type HelloResult } from '../src/routing/client-hello.ts';

// ---------------------------------------------------------------------------------------------
// A small ClientHello builder: each function returns the wire bytes of one TLS structure.

const u8 = (n: number): Buffer => Buffer.from([n & 0xff]);
const u16 = (n: number): Buffer => Buffer.from([(n >> 8) & 0xff, n & 0xff]);
const u24 = (n: number): Buffer => Buffer.from([(n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]);
const vector8 = (data: Buffer): Buffer => Buffer.concat([u8(data.length), data]);
const vector16 = (data: Buffer): Buffer => Buffer.concat([u16(data.length), data]);

const EXT_SERVER_NAME = 0;
const EXT_ALPN = 16;
const EXT_PADDING = 21;
const EXT_SUPPORTED_VERSIONS = 43;

function extension(type: number, data: Buffer): Buffer {
  return Buffer.concat([u16(type), vector16(data)]);
}

/** A server_name extension with one host_name entry per name (raw bytes allowed for bad names). */
function serverNameExtension(...names: Array<string | Buffer>): Buffer {
  const entries = names.map((name) => Buffer.concat([u8(0), vector16(Buffer.from(name))]));
  return extension(EXT_SERVER_NAME, vector16(Buffer.concat(entries)));
}

function alpnExtension(...protocols: string[]): Buffer {
  const entries = protocols.map((protocol) => vector8(Buffer.from(protocol, 'latin1')));
  return extension(EXT_ALPN, vector16(Buffer.concat(entries)));
}

function paddingExtension(bytes: number): Buffer {
  return extension(EXT_PADDING, Buffer.alloc(bytes));
}

interface HelloParts {
  sessionId?: Buffer;
  cipherSuites?: Buffer;
  compressionMethods?: Buffer;
  /** null: the message ends right after compression_methods. */
  extensions?: Buffer[] | null;
  /** Added to the encoded extensions length, to make it lie. */
  extensionsLengthError?: number;
}

function clientHelloBody(parts: HelloParts = {}): Buffer {
  const fields = [
    u16(0x0303), // legacy_version
    Buffer.alloc(32, 0xab), // random
    vector8(parts.sessionId ?? Buffer.alloc(32, 0x11)),
    vector16(parts.cipherSuites ?? Buffer.from([0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f])),
    vector8(parts.compressionMethods ?? Buffer.from([0])),
  ];
  const extensions = parts.extensions === undefined ? [] : parts.extensions;
  if (extensions !== null) {
    const block = Buffer.concat(extensions);
    fields.push(u16(block.length + (parts.extensionsLengthError ?? 0)), block);
  }
  return Buffer.concat(fields);
}

/** Handshake header (RFC 8446 §4) around a body. */
function handshakeMessage(body: Buffer, type = 1): Buffer {
  return Buffer.concat([u8(type), u24(body.length), body]);
}

function record(fragment: Buffer, contentType = 0x16): Buffer {
  return Buffer.concat([u8(contentType), u16(0x0301), u16(fragment.length), fragment]);
}

/** Splits a handshake message into records whose fragments have the given sizes, then the rest. */
function inRecords(message: Buffer, fragmentSizes: number[] = []): Buffer {
  const out: Buffer[] = [];
  let offset = 0;
  for (const size of fragmentSizes) {
    out.push(record(message.subarray(offset, offset + size)));
    offset += size;
  }
  if (offset < message.length) out.push(record(message.subarray(offset)));
  return Buffer.concat(out);
}

/** One record holding a ClientHello with these extensions. */
function helloWith(...extensions: Buffer[]): Buffer {
  return inRecords(handshakeMessage(clientHelloBody({ extensions })));
}

function typicalHello(sni = 'api.example.com', alpn = ['h2', 'http/1.1']): Buffer {
  return handshakeMessage(
    clientHelloBody({
      extensions: [
        serverNameExtension(sni),
        extension(EXT_SUPPORTED_VERSIONS, Buffer.from([4, 0x03, 0x04, 0x03, 0x03])),
        alpnExtension(...alpn),
      ],
    }),
  );
}

/** ~2 KB, like a hello carrying a post-quantum key share. */
function bigHello(): Buffer {
  return handshakeMessage(
    clientHelloBody({
      extensions: [serverNameExtension('big.example.com'), paddingExtension(2000), alpnExtension('h2')],
    }),
  );
}

// ---------------------------------------------------------------------------------------------
// Assertion helpers

function assertTls(result: HelloResult, sni: string | null, alpn: readonly string[]): void {
  assert.deepEqual(result, { kind: 'tls', sni, alpn });
}

function assertMalformed(result: HelloResult, why: RegExp): void {
  assert.equal(result.kind, 'malformed', `expected malformed, got ${JSON.stringify(result)}`);
  if (result.kind === 'malformed') assert.match(result.why, why);
}

function assertEveryPrefixNeedsMore(bytes: Buffer): void {
  for (let length = 0; length < bytes.length; length++) {
    const result = parseClientHello(bytes.subarray(0, length));
    assert.equal(result.kind, 'need-more', `prefix of ${length}/${bytes.length}: ${JSON.stringify(result)}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Real ClientHellos from Node's own TLS client

/** Starts a TCP server on loopback that records what a tls.connect() client sends first. */
async function captureClientHello(t: TestContext, options: tls.ConnectionOptions): Promise<Buffer> {
  const accepted = new Set<net.Socket>();
  const received: Buffer[] = [];
  let resolve: (hello: Buffer) => void = () => {};
  const helloArrived = new Promise<Buffer>((settle) => {
    resolve = settle;
  });
  const server = net.createServer((socket) => {
    accepted.add(socket);
    socket.on('error', () => {});
    socket.on('data', (chunk: Buffer) => {
      received.push(chunk);
      const bytes = Buffer.concat(received);
      if (parseClientHello(bytes).kind !== 'need-more') resolve(bytes);
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;

  const client = tls.connect({ ...options, port, rejectUnauthorized: false });
  // We never answer, so the client ends with a reset or hang-up when we clean up.
  client.on('error', () => {});
  t.after(async () => {
    client.destroy();
    for (const socket of accepted) socket.destroy();
    server.close();
    await once(server, 'close');
  });
  return helloArrived;
}

test('a real Node ClientHello yields its SNI and ALPN protocols in order', { timeout: 5000 }, async (t) => {
  const hello = await captureClientHello(t, {
    host: '127.0.0.1',
    servername: 'api.example.com',
    ALPNProtocols: ['h2', 'http/1.1'],
  });
  assertTls(parseClientHello(hello), 'api.example.com', ['h2', 'http/1.1']);
});

test('a real ClientHello to an IP address carries no SNI and no ALPN', { timeout: 5000 }, async (t) => {
  const hello = await captureClientHello(t, { host: '127.0.0.1' });
  assertTls(parseClientHello(hello), null, []);
});

test('a real ClientHello with a 253-character server name keeps the whole name', { timeout: 5000 }, async (t) => {
  const longName = [63, 63, 63, 61].map((n, i) => String.fromCharCode(0x61 + i).repeat(n)).join('.');
  assert.equal(longName.length, 253);
  const hello = await captureClientHello(t, { host: '127.0.0.1', servername: longName });
  assertTls(parseClientHello(hello), longName, []);
});

test('every prefix of a real ClientHello needs more, and the whole routes', { timeout: 5000 }, async (t) => {
  const hello = await captureClientHello(t, {
    host: '127.0.0.1',
    servername: 'prefix.example.com',
    ALPNProtocols: ['http/1.1'],
  });
  assertEveryPrefixNeedsMore(hello);
  assertTls(parseClientHello(hello), 'prefix.example.com', ['http/1.1']);
});

// ---------------------------------------------------------------------------------------------
// Fragmentation: TCP segments and TLS records

test('a ClientHello arriving 1 byte at a time needs more until its last byte', { timeout: 5000 }, () => {
  const bytes = inRecords(typicalHello());
  assertEveryPrefixNeedsMore(bytes);
  assertTls(parseClientHello(bytes), 'api.example.com', ['h2', 'http/1.1']);
});

test('a 2 KB ClientHello split into two records still routes by SNI', { timeout: 5000 }, () => {
  const message = bigHello();
  assert.ok(message.length > 2000);
  const twoRecords = inRecords(message, [1000]);
  assertTls(parseClientHello(twoRecords), 'big.example.com', ['h2']);
  // ...and every prefix of the two records, one byte at a time, only needs more.
  assertEveryPrefixNeedsMore(twoRecords);
});

test('a 2 KB ClientHello in two TCP segments needs more after the first', { timeout: 5000 }, () => {
  const bytes = inRecords(bigHello());
  const firstSegment = bytes.subarray(0, 1460);
  assert.deepEqual(parseClientHello(firstSegment), { kind: 'need-more' });
  assertTls(parseClientHello(bytes), 'big.example.com', ['h2']);
});

test('a ClientHello spanning three records, with its handshake header split, routes', { timeout: 5000 }, () => {
  const message = typicalHello('three.example.com');
  const threeRecords = inRecords(message, [2, 40]);
  assert.equal(threeRecords.length, message.length + 3 * 5);
  assertTls(parseClientHello(threeRecords), 'three.example.com', ['h2', 'http/1.1']);
  assertEveryPrefixNeedsMore(threeRecords);
});

test('bytes after the ClientHello do not change the verdict', { timeout: 5000 }, () => {
  const changeCipherSpec = record(Buffer.from([1]), 0x14);
  const bytes = Buffer.concat([inRecords(typicalHello()), changeCipherSpec, Buffer.alloc(30_000, 0x17)]);
  assertTls(parseClientHello(bytes), 'api.example.com', ['h2', 'http/1.1']);
});

test('a ClientHello of 16000 bytes in 1000-byte records fits under the cap', { timeout: 5000 }, () => {
  const message = handshakeMessage(
    clientHelloBody({ extensions: [serverNameExtension('huge.example.com'), paddingExtension(15_900)] }),
  );
  const bytes = inRecords(message, Array.from({ length: 15 }, () => 1000));
  assert.ok(bytes.length < MAX_HELLO_BYTES);
  assertTls(parseClientHello(bytes), 'huge.example.com', []);
});

test('a reader fed a hello of 1-byte records one record at a time walks each record once (linear, not quadratic)', { timeout: 5000 }, () => {
  const message = handshakeMessage(clientHelloBody({ extensions: [serverNameExtension('slow.example.com'), paddingExtension(2000)] }));
  const sizes = Array.from({ length: message.length - 1 }, () => 1);
  const bytes = inRecords(message, sizes);
  const records = message.length;
  assert.equal(bytes.length, records * 6);
  const reader = new ClientHelloReader();
  let verdict: HelloResult = { kind: 'need-more' };
  for (let end = 6; end <= bytes.length; end += 6) {
    verdict = reader.read(bytes.subarray(0, end));
    if (end < bytes.length) assert.equal(verdict.kind, 'need-more', `after ${end / 6} records`);
  }
  assertTls(verdict, 'slow.example.com', []);
  // One header per complete record, plus one look at the (absent) next record per call. Parsing
  // the whole stream again on each read walked records * (records + 1) / 2 headers (~2.3 million here).
  assert.ok(reader.recordHeadersRead <= 2 * records, `${reader.recordHeadersRead} record headers read for ${records} records`);
});

test('a reader fed a 1-byte-record hello in 1-byte writes reads each record header a bounded number of times', { timeout: 5000 }, () => {
  const message = handshakeMessage(clientHelloBody({ extensions: [serverNameExtension('trickle.example.com')] }));
  const bytes = inRecords(message, Array.from({ length: message.length - 1 }, () => 1));
  const reader = new ClientHelloReader();
  let verdict: HelloResult = { kind: 'need-more' };
  for (let end = 1; end <= bytes.length; end++) verdict = reader.read(bytes.subarray(0, end));
  assertTls(verdict, 'trickle.example.com', []);
  assert.ok(reader.recordHeadersRead <= 2 * bytes.length);
});

test('a reader gives the same verdicts as parseClientHello for every prefix, and keeps its final verdict', { timeout: 10_000 }, () => {
  for (const bytes of [inRecords(typicalHello()), inRecords(bigHello(), [1000]), inRecords(typicalHello('three.example.com'), [2, 40])]) {
    const reader = new ClientHelloReader();
    for (let end = 0; end <= bytes.length; end++) {
      assert.deepEqual(reader.read(bytes.subarray(0, end)), parseClientHello(bytes.subarray(0, end)), `prefix of ${end} bytes`);
    }
    assert.deepEqual(reader.read(Buffer.concat([bytes, Buffer.from('trailing')])), parseClientHello(bytes));
  }
});

// ---------------------------------------------------------------------------------------------
// Server name and ALPN details

test('an upper-case server name is lower-cased', () => {
  const bytes = inRecords(typicalHello('API.Example.COM'));
  assertTls(parseClientHello(bytes), 'api.example.com', ['h2', 'http/1.1']);
});

test('one trailing dot is stripped from the server name', () => {
  const bytes = inRecords(typicalHello('api.example.com.'));
  assertTls(parseClientHello(bytes), 'api.example.com', ['h2', 'http/1.1']);
});

test('two trailing dots leave an empty label and are malformed', () => {
  assertMalformed(parseClientHello(inRecords(typicalHello('api.example.com..'))), /empty label/);
});

test('underscores, digits and hyphens are allowed in a server name', () => {
  assertTls(parseClientHello(inRecords(typicalHello('_svc.my-host-01.example'))), '_svc.my-host-01.example', [
    'h2',
    'http/1.1',
  ]);
});

test('a ClientHello that ends after compression_methods has no SNI and no ALPN', () => {
  const message = handshakeMessage(clientHelloBody({ extensions: null }));
  assertTls(parseClientHello(inRecords(message)), null, []);
});

test('an empty extensions block is a ClientHello with no SNI and no ALPN', () => {
  assertTls(parseClientHello(inRecords(handshakeMessage(clientHelloBody({ extensions: [] })))), null, []);
});

test('only the first host_name of the server_name list is used', () => {
  const message = handshakeMessage(
    clientHelloBody({ extensions: [serverNameExtension('first.example', 'second.example')] }),
  );
  assertTls(parseClientHello(inRecords(message)), 'first.example', []);
});

test('a server_name list with no host_name entry gives no SNI', () => {
  const otherNameType = Buffer.concat([u8(7), vector16(Buffer.from('opaque'))]);
  const message = handshakeMessage(
    clientHelloBody({ extensions: [extension(EXT_SERVER_NAME, vector16(otherNameType))] }),
  );
  assertTls(parseClientHello(inRecords(message)), null, []);
});

test('ALPN protocol names are returned as latin1 strings', () => {
  const message = handshakeMessage(clientHelloBody({ extensions: [alpnExtension('h2', 'x-\u00e9')] }));
  assertTls(parseClientHello(inRecords(message)), null, ['h2', 'x-\u00e9']);
});

// ---------------------------------------------------------------------------------------------
// Not TLS

test('not-tls is decided on the first byte of HTTP, garbage or an SSLv2 hello', () => {
  assert.deepEqual(parseClientHello(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')), { kind: 'not-tls' });
  assert.deepEqual(parseClientHello(Buffer.from('G')), { kind: 'not-tls' });
  assert.deepEqual(parseClientHello(Buffer.from([0x00])), { kind: 'not-tls' });
  assert.deepEqual(parseClientHello(Buffer.from([0x80])), { kind: 'not-tls' });
  assert.deepEqual(parseClientHello(Buffer.from([0x80, 0x2e, 0x01, 0x00, 0x02])), { kind: 'not-tls' });
  assert.deepEqual(parseClientHello(Buffer.from('SSH-2.0-OpenSSH_9.6\r\n')), { kind: 'not-tls' });
});

test('a handshake byte followed by a record major version other than 3 is not TLS', () => {
  assert.deepEqual(parseClientHello(Buffer.from([0x16, 0x02])), { kind: 'not-tls' });
  assert.deepEqual(parseClientHello(Buffer.from([0x16, 0x16])), { kind: 'not-tls' });
});

test('nothing at all, or only the start of a record header, needs more', () => {
  assert.deepEqual(parseClientHello(Buffer.alloc(0)), { kind: 'need-more' });
  assert.deepEqual(parseClientHello(Buffer.from([0x16])), { kind: 'need-more' });
  assert.deepEqual(parseClientHello(Buffer.from([0x16, 0x03, 0x01, 0x02])), { kind: 'need-more' });
});

// ---------------------------------------------------------------------------------------------
// Malformed

test('a handshake message other than client_hello is malformed on its first byte', () => {
  const serverHello = inRecords(handshakeMessage(clientHelloBody(), 2));
  assertMalformed(parseClientHello(serverHello.subarray(0, 6)), /handshake type 2/);
  assertMalformed(parseClientHello(serverHello), /handshake type 2/);
});

test('a session_id of 33 bytes is malformed', () => {
  const message = handshakeMessage(clientHelloBody({ sessionId: Buffer.alloc(33) }));
  assertMalformed(parseClientHello(inRecords(message)), /session_id of 33/);
});

test('an odd or empty cipher_suites list is malformed', () => {
  const odd = handshakeMessage(clientHelloBody({ cipherSuites: Buffer.from([0x13, 0x01, 0x13]) }));
  assertMalformed(parseClientHello(inRecords(odd)), /cipher_suites of 3/);
  const empty = handshakeMessage(clientHelloBody({ cipherSuites: Buffer.alloc(0) }));
  assertMalformed(parseClientHello(inRecords(empty)), /cipher_suites of 0/);
});

test('an empty compression_methods list is malformed', () => {
  const message = handshakeMessage(clientHelloBody({ compressionMethods: Buffer.alloc(0) }));
  assertMalformed(parseClientHello(inRecords(message)), /compression_methods/);
});

test('an extensions length that does not match the rest of the message is malformed', () => {
  const extensions = [serverNameExtension('a.example')];
  const tooLong = handshakeMessage(clientHelloBody({ extensions, extensionsLengthError: 1 }));
  assertMalformed(parseClientHello(inRecords(tooLong)), /extensions length/);
  const tooShort = handshakeMessage(clientHelloBody({ extensions, extensionsLengthError: -1 }));
  assertMalformed(parseClientHello(inRecords(tooShort)), /extensions length/);
});

test('a lone byte where the extensions length should be is malformed', () => {
  const body = Buffer.concat([clientHelloBody({ extensions: null }), u8(0)]);
  assertMalformed(parseClientHello(inRecords(handshakeMessage(body))), /extensions length/);
});

test('a server name with characters outside DNS is malformed', () => {
  for (const name of ['api example.com', 'api/example.com', 'api.example.com\0', 'caf\u00e9.example']) {
    const bytes = helloWith(serverNameExtension(Buffer.from(name)));
    assertMalformed(parseClientHello(bytes), /host_name contains byte/);
  }
});

test('an empty, dot-only, over-long or empty-label server name is malformed', () => {
  const cases: Array<[string, RegExp]> = [
    ['', /host_name of 0 bytes/],
    ['.', /host_name of 0 characters/],
    ['a..b', /empty label/],
    ['.a.b', /empty label/],
    [`${'a'.repeat(64)}.example`, /label of 64/],
    [Array.from({ length: 64 }, () => 'abc').join('.'), /host_name of 255 bytes/],
  ];
  for (const [name, why] of cases) {
    const message = handshakeMessage(clientHelloBody({ extensions: [serverNameExtension(name)] }));
    assertMalformed(parseClientHello(inRecords(message)), why);
  }
});

test('an empty server_name list or one whose length lies is malformed', () => {
  const empty = helloWith(extension(EXT_SERVER_NAME, vector16(Buffer.alloc(0))));
  assertMalformed(parseClientHello(empty), /empty server_name list/);
  const entry = Buffer.concat([u8(0), vector16(Buffer.from('a.b'))]);
  const lying = helloWith(extension(EXT_SERVER_NAME, Buffer.concat([u16(50), entry])));
  assertMalformed(parseClientHello(lying), /server_name list length/);
});

test('an empty ALPN list or an empty protocol name is malformed', () => {
  const emptyList = helloWith(extension(EXT_ALPN, vector16(Buffer.alloc(0))));
  assertMalformed(parseClientHello(emptyList), /empty ALPN list/);
  const emptyName = helloWith(alpnExtension('h2', ''));
  assertMalformed(parseClientHello(emptyName), /empty ALPN protocol name/);
});

test('the same extension type twice is malformed', () => {
  const twoPaddings = helloWith(paddingExtension(4), paddingExtension(8));
  assertMalformed(parseClientHello(twoPaddings), /extension 21 appears twice/);
  const twoNames = helloWith(serverNameExtension('a.example'), serverNameExtension('b.example'));
  assertMalformed(parseClientHello(twoNames), /extension 0 appears twice/);
});

test('an extension that overruns the extensions block is malformed', () => {
  const overrun = Buffer.concat([u16(EXT_PADDING), u16(10), Buffer.alloc(4)]);
  const message = handshakeMessage(clientHelloBody({ extensions: [overrun] }));
  assertMalformed(parseClientHello(inRecords(message)), /overruns the extensions block/);
});

test('a non-handshake record before the ClientHello is complete is malformed', () => {
  const message = typicalHello();
  const alert = record(Buffer.from([2, 40]), 0x15);
  const bytes = Buffer.concat([record(message.subarray(0, 20)), alert, record(message.subarray(20))]);
  assertMalformed(parseClientHello(bytes), /content type 21/);
  // Decided on the alert's first byte.
  assertMalformed(parseClientHello(bytes.subarray(0, 26)), /content type 21/);
});

test('a later record with a major version other than 3 is malformed, not "not TLS"', () => {
  const message = typicalHello();
  const second = record(message.subarray(20));
  second[1] = 2;
  const bytes = Buffer.concat([record(message.subarray(0, 20)), second]);
  assertMalformed(parseClientHello(bytes), /record version major 2/);
});

test('a zero-length record is malformed, first or later', () => {
  assertMalformed(parseClientHello(record(Buffer.alloc(0))), /zero-length/);
  const message = typicalHello();
  const bytes = Buffer.concat([
    record(message.subarray(0, 20)),
    record(Buffer.alloc(0)),
    record(message.subarray(20)),
  ]);
  assertMalformed(parseClientHello(bytes), /zero-length/);
});

test('a record longer than 2^14 + 256 bytes is malformed from its header alone', () => {
  assertMalformed(parseClientHello(Buffer.from([0x16, 0x03, 0x01, 0x41, 0x01])), /record of 16641 bytes/);
  assert.deepEqual(parseClientHello(Buffer.from([0x16, 0x03, 0x01, 0x41, 0x00])), { kind: 'need-more' });
});

test('a handshake length beyond the cap is malformed from its header alone', () => {
  const header = Buffer.from([0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x40, 0x01]);
  assertMalformed(parseClientHello(header), /cannot fit/);
  const huge = Buffer.from([0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff]);
  assertMalformed(parseClientHello(huge), /cannot fit/);
});

test('a ClientHello not complete within MAX_HELLO_BYTES of the stream is malformed', () => {
  const message = handshakeMessage(
    clientHelloBody({ extensions: [serverNameExtension('huge.example.com'), paddingExtension(15_900)] }),
  );
  // The same 16 KB message, in 100-byte records: the record headers push it past the cap.
  const bytes = inRecords(message, Array.from({ length: 159 }, () => 100));
  assert.ok(bytes.length > MAX_HELLO_BYTES);
  assert.deepEqual(parseClientHello(bytes.subarray(0, MAX_HELLO_BYTES - 1)), { kind: 'need-more' });
  assertMalformed(parseClientHello(bytes.subarray(0, MAX_HELLO_BYTES)), /no complete ClientHello/);
  assertMalformed(parseClientHello(bytes), /no complete ClientHello/);
});

test('a field that claims one byte more than its enclosing structure holds is malformed', () => {
  const fixed = Buffer.concat([u16(0x0303), Buffer.alloc(32)]);
  const noSession = u8(0);
  const suites = vector16(Buffer.from([0x13, 0x01]));
  const compression = vector8(Buffer.from([0]));
  const withExtensions = (...extensions: Buffer[]): Buffer => {
    const block = Buffer.concat(extensions);
    return Buffer.concat([fixed, noSession, suites, compression, u16(block.length), block]);
  };
  const cases: Array<[Buffer, RegExp]> = [
    [Buffer.concat([fixed, u8(5), Buffer.alloc(4)]), /session_id overruns/],
    [Buffer.concat([fixed, noSession, u16(4), Buffer.alloc(2)]), /cipher_suites overrun/],
    [Buffer.concat([fixed, noSession, suites, u8(2), u8(0)]), /compression_methods overrun/],
    [
      withExtensions(extension(EXT_SERVER_NAME, vector16(Buffer.concat([u8(0), u16(4), Buffer.from('a.b')])))),
      /server_name entry overruns/,
    ],
    [
      withExtensions(extension(EXT_ALPN, vector16(Buffer.concat([u8(3), Buffer.from('h2')])))),
      /ALPN protocol name overruns/,
    ],
    [withExtensions(extension(EXT_ALPN, Buffer.concat([u16(3), u8(1), Buffer.from('h')]))), /ALPN list length/],
  ];
  for (const [body, why] of cases) {
    const bytes = inRecords(handshakeMessage(body));
    assertMalformed(parseClientHello(bytes), why);
    // Followed by more bytes in the same stream, the verdict holds: the message boundary bounds every field.
    assertMalformed(parseClientHello(Buffer.concat([bytes, Buffer.alloc(64, 0xff)])), why);
  }
});

test('a ClientHello message too short for its fixed fields is malformed', () => {
  assertMalformed(parseClientHello(record(handshakeMessage(Buffer.alloc(0)))), /legacy_version or random/);
  assertMalformed(parseClientHello(record(handshakeMessage(Buffer.alloc(34)))), /before session_id/);
});

// ---------------------------------------------------------------------------------------------
// Seeded random mutation

/** mulberry32: a tiny deterministic PRNG, so a failure can be replayed from its case number. */
function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const VERDICT_KINDS = new Set(['need-more', 'tls', 'not-tls', 'malformed']);

function validSeeds(): Buffer[] {
  const message = typicalHello();
  return [
    inRecords(message),
    inRecords(message, [2, 40]),
    inRecords(bigHello(), [1000]),
    inRecords(handshakeMessage(clientHelloBody({ extensions: null }))),
    inRecords(
      handshakeMessage(clientHelloBody({ sessionId: Buffer.alloc(0), extensions: [alpnExtension('h2')] })),
    ),
    inRecords(
      handshakeMessage(
        clientHelloBody({ extensions: [serverNameExtension('a.example', 'b.example'), paddingExtension(300)] }),
      ),
      [1, 1, 1, 1, 50],
    ),
  ];
}

/** Offsets of length fields in a single-record hello: record length, handshake length, session_id. */
const STRUCTURAL_OFFSETS = [3, 4, 6, 7, 8, 43, 76, 77];
const EXTREME_VALUES = [0x00, 0x01, 0x02, 0x1f, 0x20, 0x21, 0x3f, 0x40, 0x41, 0x7f, 0x80, 0xfe, 0xff];

function mutate(random: () => number, seeds: Buffer[]): Buffer {
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)] as T;
  const int = (below: number): number => Math.floor(random() * below);
  let bytes = Buffer.from(pick(seeds));
  const steps = 1 + int(3);
  for (let step = 0; step < steps; step++) {
    const at = int(bytes.length + 1);
    switch (int(8)) {
      case 0: // overwrite a byte
        if (at < bytes.length) bytes[at] = int(256);
        break;
      case 1: // flip a bit
        if (at < bytes.length) bytes[at] = (bytes[at] ?? 0) ^ (1 << int(8));
        break;
      case 2: // truncate
        bytes = bytes.subarray(0, at);
        break;
      case 3: {
        // splice the head of this with the tail of another hello
        const other = pick(seeds);
        bytes = Buffer.concat([bytes.subarray(0, at), other.subarray(int(other.length + 1))]);
        break;
      }
      case 4: {
        // set a length field (structural or anywhere) to an extreme
        const offset = random() < 0.5 ? pick(STRUCTURAL_OFFSETS) : at;
        if (offset < bytes.length) bytes[offset] = pick(EXTREME_VALUES);
        if (offset + 1 < bytes.length && random() < 0.5) bytes[offset + 1] = pick(EXTREME_VALUES);
        break;
      }
      case 5: {
        // insert random bytes
        const inserted = Buffer.from(Array.from({ length: 1 + int(8) }, () => int(256)));
        bytes = Buffer.concat([bytes.subarray(0, at), inserted, bytes.subarray(at)]);
        break;
      }
      case 6: // delete a range
        bytes = Buffer.concat([bytes.subarray(0, at), bytes.subarray(at + 1 + int(16))]);
        break;
      default: {
        // repeat a range, as a buggy client might
        const end = Math.min(bytes.length, at + 1 + int(64));
        bytes = Buffer.concat([bytes.subarray(0, end), bytes.subarray(at, end), bytes.subarray(end)]);
        break;
      }
    }
  }
  return Buffer.from(bytes);
}

const MUTATION_TEST_NAME =
  '20,000 mutated ClientHellos never throw, never read past the view, and keep their verdict as bytes arrive';

test(MUTATION_TEST_NAME, { timeout: 30_000 }, () => {
  const random = mulberry32(0x5eed_c0de);
  const seeds = validSeeds();
  const counts: Record<string, number> = {};
  for (let caseNumber = 0; caseNumber < 20_000; caseNumber++) {
    const bytes = mutate(random, seeds);
    const context = `case ${caseNumber}: ${bytes.toString('hex')}`;

    const verdict = parseClientHello(bytes);
    assert.ok(VERDICT_KINDS.has(verdict.kind), context);
    if (verdict.kind === 'malformed') assert.doesNotMatch(verdict.why, /parser bug/, context);
    counts[verdict.kind] = (counts[verdict.kind] ?? 0) + 1;

    // The same bytes as a view into a larger buffer of 0xFF: anything read past the view would show.
    const backing = Buffer.alloc(bytes.length + 64, 0xff);
    bytes.copy(backing);
    assert.deepEqual(parseClientHello(backing.subarray(0, bytes.length)), verdict, context);

    // Segmentation cannot change a decision: a decided prefix already has the final verdict.
    const prefix = parseClientHello(bytes.subarray(0, Math.floor(random() * (bytes.length + 1))));
    if (prefix.kind !== 'need-more') assert.deepEqual(prefix, verdict, context);
  }
  // The mutations reach every outcome, so the properties above were tested on each.
  for (const kind of VERDICT_KINDS) assert.ok((counts[kind] ?? 0) > 100, `${kind}: ${JSON.stringify(counts)}`);
});

test('re-framing a valid ClientHello into random records never changes its verdict', { timeout: 10_000 }, () => {
  const random = mulberry32(42);
  const messages = [typicalHello(), bigHello(), handshakeMessage(clientHelloBody({ extensions: null }))];
  for (let caseNumber = 0; caseNumber < 2_000; caseNumber++) {
    const message = messages[caseNumber % messages.length] as Buffer;
    const expected = parseClientHello(inRecords(message));
    assert.equal(expected.kind, 'tls');
    const sizes: number[] = [];
    for (let total = 0; total < message.length; ) {
      const size = 1 + Math.floor(random() * 300);
      sizes.push(size);
      total += size;
    }
    const bytes = inRecords(message, sizes);
    assert.deepEqual(parseClientHello(bytes), expected, `case ${caseNumber}: sizes ${sizes.join(',')}`);
  }
});
