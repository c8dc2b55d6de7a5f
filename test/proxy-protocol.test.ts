import assert from 'node:assert/strict';
import { SocketAddress, isIPv6 } from 'node:net';
import { describe, test } from 'node:test';
import { formatIPv6, parseIPv6 } from '../src/proxy-protocol/address.ts';
import { crc32c } from '../src/proxy-protocol/crc32c.ts';
import {
  PP2_TYPE,
  V2_MAX_DECLARED_LENGTH,
  parseProxyHeader,
  type ProxyHeader,
  type ProxyParseResult,
  type ProxyVersionAccept,
} from '../src/proxy-protocol/parse.ts';
import { writeProxyHeaderV1, writeProxyHeaderV2, writeProxyHeaderV2Local } from '../src/proxy-protocol/write.ts';

// ---- helpers ---------------------------------------------------------------------------------

const SIGNATURE = Buffer.from('0d0a0d0a000d0a515549540a', 'hex');

function ascii(text: string): Buffer {
  return Buffer.from(text, 'latin1');
}

/** A v2 header from its parts; `length` defaults to the body's real length. */
function v2(versionCommand: number, familyTransport: number, body: Buffer, length = body.length): Buffer {
  const fixed = Buffer.alloc(4);
  fixed[0] = versionCommand;
  fixed[1] = familyTransport;
  fixed.writeUInt16BE(length, 2);
  return Buffer.concat([SIGNATURE, fixed, body]);
}

function tlv(type: number, value: Buffer | string): Buffer {
  const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : value;
  const head = Buffer.alloc(3);
  head[0] = type;
  head.writeUInt16BE(bytes.length, 1);
  return Buffer.concat([head, bytes]);
}

/** 127.0.0.1:56324 -> 127.0.0.2:443 */
const INET_BLOCK = Buffer.from('7f0000017f000002dc0401bb', 'hex');
/** 2001:db8::1:56324 -> ::1:443 */
const INET6_BLOCK = Buffer.from(
  '20010db8000000000000000000000001' + '00000000000000000000000000000001' + 'dc04' + '01bb',
  'hex',
);

function unixBlock(source: string, destination: string): Buffer {
  const block = Buffer.alloc(216);
  block.write(source, 0, 'utf8');
  block.write(destination, 108, 'utf8');
  return block;
}

/** Sets a CRC32C TLV's value (placed last, value zero) to the checksum of the whole header. */
function sealCrc(header: Buffer): Buffer {
  header.writeUInt32BE(crc32c(header), header.length - 4);
  return header;
}

function expectHeader(result: ProxyParseResult, consumed?: number): ProxyHeader {
  assert.equal(result.kind, 'header', `expected a header, got ${JSON.stringify(result)}`);
  assert.ok(result.kind === 'header');
  if (consumed !== undefined) assert.equal(result.consumed, consumed);
  return result.header;
}

function expectMalformed(result: ProxyParseResult, whyIncludes?: string): void {
  assert.equal(result.kind, 'malformed', `expected malformed, got ${JSON.stringify(result)}`);
  if (whyIncludes !== undefined && result.kind === 'malformed') assert.match(result.why, new RegExp(whyIncludes, 'i'));
}

// ---- CRC32C ----------------------------------------------------------------------------------

describe('crc32c', () => {
  test('crc32c of "123456789" is the Castagnoli check value 0xE3069283', () => {
    assert.equal(crc32c(ascii('123456789')), 0xe3069283);
  });

  test('crc32c of nothing is 0 and a running crc continues over a split buffer', () => {
    assert.equal(crc32c(Buffer.alloc(0)), 0);
    const data = ascii('The quick brown fox jumps over the lazy dog');
    assert.equal(crc32c(data.subarray(17), crc32c(data.subarray(0, 17))), crc32c(data));
  });

  test('crc32c of 32 zero bytes matches the RFC 3720 vector 0x8A9136AA', () => {
    assert.equal(crc32c(Buffer.alloc(32)), 0x8a9136aa);
  });
});

// ---- IPv6 text -------------------------------------------------------------------------------

describe('IPv6 formatting', () => {
  test('IPv6 addresses are printed exactly as Node prints socket addresses', () => {
    const random = prng(7);
    for (let n = 0; n < 2000; n++) {
      const bytes = new Uint8Array(16);
      // Mostly-zero words so that every "::" placement and the dotted forms come up.
      for (let w = 0; w < 8; w++) {
        const pick = random() % 4;
        const word = pick < 2 ? 0 : pick === 2 ? random() & 0xffff : [1, 0xffff][random() % 2]!;
        bytes[w * 2] = word >> 8;
        bytes[w * 2 + 1] = word & 0xff;
      }
      const full = Buffer.from(bytes).toString('hex').replace(/(.{4})(?!$)/g, '$1:');
      const expected = new SocketAddress({ address: full, family: 'ipv6' }).address;
      assert.equal(formatIPv6(bytes), expected, full);
      assert.deepEqual(parseIPv6(expected), bytes, expected);
    }
  });

  test('the IPv6 parser agrees with net.isIPv6 on tricky texts', () => {
    const texts = [
      '::', '::1', '1::', '1:2:3:4:5:6:7:8', '1:2:3:4:5:6:7::', '::2:3:4:5:6:7:8', '1:2:3:4:5:6:7:8:9',
      '1::2::3', ':::', ':1::', '1:::2', '12345::', 'g::', '::ffff:1.2.3.4', '::1.2.3.4', '1::1.2.3.4',
      '1:2:3:4:5:6:1.2.3.4', '1:2:3:4:5:6:7:1.2.3.4', '::ffff:01.2.3.4', '::ffff:1.2.3', '::ffff:1.2.3.4:1',
      '1.2.3.4', '', ':', '1:2:3:4:5:6:7', 'ABCD::EF', '::1.2.3.4::', '0:0:0:0:0:0:0:0', ' ::1',
    ];
    for (const text of texts) assert.equal(parseIPv6(text) !== null, isIPv6(text), text);
  });
});

// ---- v1 --------------------------------------------------------------------------------------

const LONG_V6_39 = 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff';

describe('PROXY v1', () => {
  test('a TCP4 line gives the addresses and ports and consumes exactly the line', () => {
    const line = ascii('PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n');
    const h = expectHeader(parseProxyHeader(line, 'any'), line.length);
    assert.deepEqual(h, {
      version: 1,
      command: 'proxy',
      family: 'tcp4',
      source: { address: '192.168.0.1', port: 56324 },
      destination: { address: '192.168.0.11', port: 443 },
      tlvs: [],
      authority: null,
      alpn: null,
      uniqueId: null,
    });
  });

  test('a TCP6 line gives the addresses in Node notation (compressed, lower-case)', () => {
    const line = ascii('PROXY TCP6 2001:DB8:0:0:0:0:0:1 0:0:0:0:0:ffff:7f00:1 0 65535\r\n');
    const h = expectHeader(parseProxyHeader(line, 'v1'), line.length);
    assert.equal(h.family, 'tcp6');
    assert.deepEqual(h.source, { address: '2001:db8::1', port: 0 });
    assert.deepEqual(h.destination, { address: '::ffff:127.0.0.1', port: 65535 });
  });

  test('UNKNOWN alone and UNKNOWN followed by anything are both "unknown" without addresses', () => {
    for (const text of ['PROXY UNKNOWN\r\n', `PROXY UNKNOWN ${LONG_V6_39} ${LONG_V6_39} 65535 65535\r\n`, 'PROXY UNKNOWN whatever \x01\r\n']) {
      const line = ascii(text);
      const h = expectHeader(parseProxyHeader(line, 'any'), line.length);
      assert.equal(h.command, 'unknown');
      assert.equal(h.family, null);
      assert.equal(h.source, null);
      assert.equal(h.destination, null);
    }
  });

  test('the spec worst case, UNKNOWN with two full IPv6 addresses, is exactly 107 bytes and accepted', () => {
    const line = ascii(`PROXY UNKNOWN ${LONG_V6_39} ${LONG_V6_39} 65535 65535\r\n`);
    assert.equal(line.length, 107);
    expectHeader(parseProxyHeader(line, 'v1'), 107);
  });

  test('a valid TCP6 line of exactly 107 bytes is accepted and one of 108 bytes is rejected', () => {
    // Mixed notation (dotted tail) is the only way a valid IPv6 text exceeds 39 characters.
    const at107 = ascii(`PROXY TCP6 ${LONG_V6_39} ffff:ffff:ffff:ffff:ffff:ffff:255.255.25.1 65535 65535\r\n`);
    assert.equal(at107.length, 107);
    const h = expectHeader(parseProxyHeader(at107, 'v1'), 107);
    assert.equal(h.destination?.address, 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:1901');

    const at108 = ascii(`PROXY TCP6 ${LONG_V6_39} ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.1 65535 65535\r\n`);
    assert.equal(at108.length, 108);
    expectMalformed(parseProxyHeader(at108, 'v1'), '107');
    // Also rejected when only the first 107 bytes have arrived (CR is byte 107).
    expectMalformed(parseProxyHeader(at108.subarray(0, 107), 'v1'), '107');
  });

  test('a line without CRLF waits until 107 bytes and is then rejected', () => {
    const noEnd = ascii(`PROXY UNKNOWN ${'x'.repeat(200)}`);
    assert.deepEqual(parseProxyHeader(noEnd.subarray(0, 106), 'any'), { kind: 'need-more' });
    expectMalformed(parseProxyHeader(noEnd.subarray(0, 107), 'any'), 'CRLF');
    expectMalformed(parseProxyHeader(noEnd, 'any'), 'CRLF');
  });

  const invalidV1: Array<[string, string]> = [
    ['a line ending in LF only', 'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n'],
    ['a CR not followed by LF', 'PROXY UNKNOWN\rX\r\n'],
    ['a double space between fields', 'PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n'],
    ['a double space after PROXY', 'PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n'],
    ['a trailing space before CRLF', 'PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n'],
    ['a missing port', 'PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n'],
    ['an unknown protocol', 'PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n'],
    ['a lower-case protocol', 'PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n'],
    ['UNKNOWN glued to more text', 'PROXY UNKNOWNX\r\n'],
    ['an octet above 255', 'PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n'],
    ['an octet with a leading zero', 'PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n'],
    ['three octets', 'PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n'],
    ['an IPv6 address in TCP4', 'PROXY TCP4 ::1 5.6.7.8 1 2\r\n'],
    ['an IPv4 address in TCP6', 'PROXY TCP6 1.2.3.4 ::1 1 2\r\n'],
    ['an IPv6 address with a zone id', 'PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n'],
    ['an IPv6 address with two "::"', 'PROXY TCP6 1::2::3 ::1 1 2\r\n'],
    ['port 65536', 'PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n'],
    ['a port with a leading zero', 'PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n'],
    ['a port with a sign', 'PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n'],
    ['a negative port', 'PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n'],
    ['a hexadecimal port', 'PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n'],
    ['an empty line after PROXY', 'PROXY \r\n'],
  ];
  for (const [what, text] of invalidV1) {
    test(`a v1 line with ${what} is malformed`, () => {
      expectMalformed(parseProxyHeader(ascii(text), 'any'));
    });
  }

  test('port 0 and port 65535 are accepted', () => {
    const h = expectHeader(parseProxyHeader(ascii('PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n'), 'any'));
    assert.deepEqual(h.source, { address: '0.0.0.0', port: 0 });
    assert.deepEqual(h.destination, { address: '255.255.255.255', port: 65535 });
  });
});

// ---- v2 --------------------------------------------------------------------------------------

describe('PROXY v2', () => {
  test('a PROXY over TCP/IPv4 header (hex vector) gives the addresses and ports', () => {
    const header = Buffer.from('0d0a0d0a000d0a515549540a' + '21' + '11' + '000c' + '7f000001' + '7f000002' + 'dc04' + '01bb', 'hex');
    const h = expectHeader(parseProxyHeader(header, 'v2'), 28);
    assert.deepEqual(h, {
      version: 2,
      command: 'proxy',
      family: 'tcp4',
      source: { address: '127.0.0.1', port: 56324 },
      destination: { address: '127.0.0.2', port: 443 },
      tlvs: [],
      authority: null,
      alpn: null,
      uniqueId: null,
    });
  });

  test('a PROXY over TCP/IPv6 header gives compressed IPv6 addresses', () => {
    const h = expectHeader(parseProxyHeader(v2(0x21, 0x21, INET6_BLOCK), 'any'), 16 + 36);
    assert.equal(h.family, 'tcp6');
    assert.deepEqual(h.source, { address: '2001:db8::1', port: 56324 });
    assert.deepEqual(h.destination, { address: '::1', port: 443 });
  });

  test('a PROXY over UNIX stream header gives the socket paths with port 0', () => {
    const h = expectHeader(parseProxyHeader(v2(0x21, 0x31, unixBlock('/run/client.sock', '/run/smartproxy.sock')), 'any'), 16 + 216);
    assert.equal(h.family, 'unix');
    assert.deepEqual(h.source, { address: '/run/client.sock', port: 0 });
    assert.deepEqual(h.destination, { address: '/run/smartproxy.sock', port: 0 });
  });

  test('a LOCAL header is accepted and its address block ignored, whatever the family says', () => {
    for (const [familyTransport, body] of [
      [0x00, Buffer.alloc(0)],
      [0x11, INET_BLOCK],
      [0xff, Buffer.from('anything at all')],
    ] as const) {
      const header = v2(0x20, familyTransport, body);
      const h = expectHeader(parseProxyHeader(header, 'any'), header.length);
      assert.equal(h.command, 'local');
      assert.equal(h.family, null);
      assert.equal(h.source, null);
      assert.equal(h.destination, null);
    }
  });

  test('the LOCAL header we write is the 16-byte form and parses as local', () => {
    const local = writeProxyHeaderV2Local();
    assert.equal(local.toString('hex'), '0d0a0d0a000d0a515549540a' + '20' + '00' + '0000');
    assert.equal(expectHeader(parseProxyHeader(local, 'v2'), 16).command, 'local');
  });

  test('a PROXY header with UNSPEC family is "unknown" and skips its block', () => {
    const header = v2(0x21, 0x00, Buffer.from('ignored'));
    const h = expectHeader(parseProxyHeader(header, 'any'), header.length);
    assert.equal(h.command, 'unknown');
    assert.equal(h.source, null);
  });

  test('a PROXY header with INET family and UNSPEC transport is "unknown" but its TLVs are read', () => {
    const header = v2(0x21, 0x10, Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.AUTHORITY, 'example.com')]));
    const h = expectHeader(parseProxyHeader(header, 'any'), header.length);
    assert.equal(h.command, 'unknown');
    assert.equal(h.family, null);
    assert.equal(h.authority, 'example.com');
  });

  const invalidV2: Array<[string, Buffer, string]> = [
    ['version 1 in a v2 header', v2(0x11, 0x11, INET_BLOCK), 'version'],
    ['version 3', v2(0x31, 0x11, INET_BLOCK), 'version'],
    ['command 2', v2(0x22, 0x11, INET_BLOCK), 'command'],
    ['command 15', v2(0x2f, 0x11, INET_BLOCK), 'command'],
    ['TCP over a DGRAM transport (UDP4)', v2(0x21, 0x12, INET_BLOCK), 'DGRAM'],
    ['a UNIX DGRAM transport', v2(0x21, 0x32, unixBlock('/a', '/b')), 'DGRAM'],
    ['transport 3', v2(0x21, 0x13, INET_BLOCK), 'transport'],
    ['family 4', v2(0x21, 0x41, INET_BLOCK), 'family'],
    ['a length shorter than the IPv4 address block', v2(0x21, 0x11, INET_BLOCK.subarray(0, 11)), 'shorter'],
    ['a length shorter than the IPv6 address block', v2(0x21, 0x21, INET_BLOCK), 'shorter'],
    ['a length shorter than the UNIX address block', v2(0x21, 0x31, Buffer.alloc(215)), 'shorter'],
    ['a TLV overrunning the declared length', v2(0x21, 0x11, Buffer.concat([INET_BLOCK, tlv(0xea, 'abcd').subarray(0, 5)])), 'past'],
    ['a TLV header cut by the declared length', v2(0x21, 0x11, Buffer.concat([INET_BLOCK, Buffer.from([0xea, 0x00])])), 'past'],
    ['a TLV whose length runs past the header into the payload', Buffer.concat([v2(0x21, 0x11, Buffer.concat([INET_BLOCK, tlv(0xea, 'ab').subarray(0, 4)])), ascii('b-payload')]), 'past'],
    ['a UNIQUE_ID of 129 bytes', v2(0x21, 0x11, Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.UNIQUE_ID, Buffer.alloc(129, 1))])), 'UNIQUE_ID'],
    ['a CRC32C TLV of 3 bytes', v2(0x21, 0x11, Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.CRC32C, Buffer.alloc(3))])), 'CRC32C'],
    ['an AUTHORITY that is not UTF-8', v2(0x21, 0x11, Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.AUTHORITY, Buffer.from([0xc3, 0x28]))])), 'AUTHORITY'],
    ['an SSL TLV shorter than 5 bytes', v2(0x21, 0x11, Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.SSL, Buffer.from([1, 0, 0, 0]))])), 'SSL'],
    ['an SSL sub-TLV overrunning the SSL TLV', v2(0x21, 0x11, Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.SSL, Buffer.concat([Buffer.from([1, 0, 0, 0, 0]), tlv(0x21, 'TLSv1.3').subarray(0, 6)]))])), 'SSL'],
    [`a declared length above ${V2_MAX_DECLARED_LENGTH}`, v2(0x21, 0x11, INET_BLOCK, V2_MAX_DECLARED_LENGTH + 1), 'longer'],
  ];
  for (const [what, header, why] of invalidV2) {
    test(`a v2 header with ${what} is malformed`, () => {
      expectMalformed(parseProxyHeader(header, 'any'), why);
    });
  }

  test(`a declared length of exactly ${V2_MAX_DECLARED_LENGTH} is accepted`, () => {
    const padding = tlv(PP2_TYPE.NOOP, Buffer.alloc(V2_MAX_DECLARED_LENGTH - INET_BLOCK.length - 3));
    const header = v2(0x21, 0x11, Buffer.concat([INET_BLOCK, padding]));
    expectHeader(parseProxyHeader(header, 'any'), 16 + V2_MAX_DECLARED_LENGTH);
  });

  test('an oversize length is rejected from the first 16 bytes, without waiting for the body', () => {
    expectMalformed(parseProxyHeader(v2(0x21, 0x11, Buffer.alloc(0), 0xffff), 'any'), 'longer');
  });

  test('a bad version is rejected from its 13th byte', () => {
    expectMalformed(parseProxyHeader(Buffer.concat([SIGNATURE, Buffer.from([0x11])]), 'any'), 'version');
  });

  test('TLVs are returned in order with NOOP, SSL and custom ones, and the convenience fields filled', () => {
    const ssl = Buffer.concat([Buffer.from([0x07, 0, 0, 0, 0]), tlv(0x21, 'TLSv1.3'), tlv(0x22, 'client.example')]);
    const tlvs = Buffer.concat([
      tlv(PP2_TYPE.ALPN, 'h2'),
      tlv(PP2_TYPE.AUTHORITY, 'bücher.example'),
      tlv(PP2_TYPE.NOOP, Buffer.alloc(0)),
      tlv(PP2_TYPE.UNIQUE_ID, Buffer.alloc(128, 9)),
      tlv(PP2_TYPE.SSL, ssl),
      tlv(PP2_TYPE.NETNS, 'blue'),
      tlv(0xea, Buffer.from([1, 2, 3])),
    ]);
    const header = v2(0x21, 0x11, Buffer.concat([INET_BLOCK, tlvs]));
    const h = expectHeader(parseProxyHeader(header, 'any'), header.length);
    assert.deepEqual(
      h.tlvs.map((t) => t.type),
      [0x01, 0x02, 0x04, 0x05, 0x20, 0x30, 0xea],
    );
    assert.equal(h.alpn, 'h2');
    assert.equal(h.authority, 'bücher.example');
    assert.deepEqual(h.uniqueId, Buffer.alloc(128, 9));
    assert.deepEqual(h.tlvs[4]?.value, ssl);
    assert.deepEqual(h.tlvs[6]?.value, Buffer.from([1, 2, 3]));
  });

  test('returned TLV values are copies that survive reuse of the input buffer', () => {
    const header = v2(0x21, 0x11, Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.UNIQUE_ID, 'id-1')]));
    const h = expectHeader(parseProxyHeader(header, 'any'));
    header.fill(0);
    assert.equal(h.uniqueId?.toString(), 'id-1');
  });

  test('a correct CRC32C is accepted and a wrong one is rejected', () => {
    const body = Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.AUTHORITY, 'a.example'), tlv(PP2_TYPE.CRC32C, Buffer.alloc(4))]);
    const good = sealCrc(v2(0x21, 0x11, body));
    const h = expectHeader(parseProxyHeader(good, 'any'), good.length);
    assert.equal(h.tlvs.at(-1)?.type, PP2_TYPE.CRC32C);

    const wrongValue = Buffer.from(good);
    wrongValue.writeUInt32BE((good.readUInt32BE(good.length - 4) ^ 1) >>> 0, good.length - 4);
    expectMalformed(parseProxyHeader(wrongValue, 'any'), 'CRC32C');

    const tampered = Buffer.from(good);
    tampered[17] = tampered[17]! ^ 0x01; // source address, covered by the checksum
    expectMalformed(parseProxyHeader(tampered, 'any'), 'CRC32C');
  });

  test('a CRC32C placed before other TLVs is verified over the whole header', () => {
    const body = Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.CRC32C, Buffer.alloc(4)), tlv(0xea, 'after')]);
    const header = v2(0x21, 0x11, body);
    const crcAt = 16 + INET_BLOCK.length + 3;
    header.writeUInt32BE(crc32c(header), crcAt);
    expectHeader(parseProxyHeader(header, 'any'), header.length);
    header[header.length - 1] = 0x00;
    expectMalformed(parseProxyHeader(header, 'any'), 'CRC32C');
  });

  test('two CRC32C TLVs are rejected', () => {
    const body = Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.CRC32C, Buffer.alloc(4)), tlv(PP2_TYPE.CRC32C, Buffer.alloc(4))]);
    expectMalformed(parseProxyHeader(v2(0x21, 0x11, body), 'any'), 'more than one');
  });
});

// ---- detection, framing, versions ------------------------------------------------------------

describe('detection and framing', () => {
  const v1Line = ascii('PROXY TCP4 10.0.0.1 10.0.0.2 1000 443\r\n');
  const v2Header = sealCrc(v2(0x21, 0x11, Buffer.concat([INET_BLOCK, tlv(PP2_TYPE.UNIQUE_ID, 'abc'), tlv(PP2_TYPE.CRC32C, Buffer.alloc(4))])));

  test('an empty buffer needs more bytes', () => {
    assert.deepEqual(parseProxyHeader(Buffer.alloc(0), 'any'), { kind: 'need-more' });
  });

  test('bytes that cannot start any signature are not-proxy at once', () => {
    for (const start of ['\x16\x03\x01', 'GET / HTTP/1.1\r\n', 'P', 'PROXY\r\n', 'PROXZ', '\r\n\r\n\x01']) {
      const expected = start === 'P' ? 'need-more' : 'not-proxy';
      assert.equal(parseProxyHeader(ascii(start), 'any').kind, expected, JSON.stringify(start));
    }
  });

  test('a v2 header whose signature has one wrong byte is not-proxy', () => {
    const wrong = Buffer.from(v2Header);
    wrong[10] = 0x5a; // "QUIT" -> "QUZT"
    assert.deepEqual(parseProxyHeader(wrong, 'any'), { kind: 'not-proxy' });
    assert.deepEqual(parseProxyHeader(wrong.subarray(0, 11), 'any'), { kind: 'not-proxy' });
  });

  test('a TLS ClientHello is not-proxy for every accept setting', () => {
    for (const accept of ['v1', 'v2', 'any'] as const) {
      assert.deepEqual(parseProxyHeader(Buffer.from([0x16, 0x03, 0x01, 0x00, 0xa5]), accept), { kind: 'not-proxy' });
    }
  });

  test('a header followed by payload in one buffer consumes exactly the header and leaves the rest untouched', () => {
    const payload = Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]);
    for (const header of [v1Line, v2Header]) {
      const buf = Buffer.concat([header, payload]);
      const before = Buffer.from(buf);
      const result = parseProxyHeader(buf, 'any');
      assert.ok(result.kind === 'header');
      assert.equal(result.consumed, header.length);
      assert.deepEqual(buf.subarray(result.consumed), payload);
      assert.deepEqual(buf, before);
    }
  });

  test('a header split byte by byte needs more at every prefix and parses once complete', () => {
    for (const header of [v1Line, v2Header, ascii('PROXY UNKNOWN\r\n'), writeProxyHeaderV2Local()]) {
      for (let n = 0; n < header.length; n++) {
        assert.deepEqual(parseProxyHeader(header.subarray(0, n), 'any'), { kind: 'need-more' }, `prefix ${n}`);
      }
      expectHeader(parseProxyHeader(header, 'any'), header.length);
    }
  });

  test('a v2 header on a v1-only listener is malformed, and a v1 header on a v2-only listener too', () => {
    expectMalformed(parseProxyHeader(v2Header, 'v1'), 'v2 not accepted');
    expectMalformed(parseProxyHeader(v1Line, 'v2'), 'v1 not accepted');
    // While the bytes could still become the other version's signature, the verdict waits.
    assert.deepEqual(parseProxyHeader(v2Header.subarray(0, 11), 'v1'), { kind: 'need-more' });
    assert.deepEqual(parseProxyHeader(v1Line.subarray(0, 5), 'v2'), { kind: 'need-more' });
  });

  test('each version parses on its own listener and on "any"', () => {
    for (const [header, accepts] of [
      [v1Line, ['v1', 'any']],
      [v2Header, ['v2', 'any']],
    ] as const) {
      for (const accept of accepts) expectHeader(parseProxyHeader(header, accept), header.length);
    }
  });
});

// ---- writing ---------------------------------------------------------------------------------

describe('writing', () => {
  const ipv4 = { source: { address: '192.0.2.10', port: 51000 }, destination: { address: '198.51.100.7', port: 443 } };
  const ipv6 = { source: { address: '2001:db8::10', port: 51000 }, destination: { address: '2001:db8::7', port: 8443 } };

  test('v1 over IPv4 is the exact TCP4 line', () => {
    assert.equal(writeProxyHeaderV1(ipv4).toString('latin1'), 'PROXY TCP4 192.0.2.10 198.51.100.7 51000 443\r\n');
  });

  test('v1 and v2 round trip: what we write parses back to the same endpoints', () => {
    for (const fields of [ipv4, ipv6]) {
      for (const written of [writeProxyHeaderV1(fields), writeProxyHeaderV2(fields), writeProxyHeaderV2(fields, { crc32c: true })]) {
        const h = expectHeader(parseProxyHeader(written, 'any'), written.length);
        assert.equal(h.command, 'proxy');
        assert.deepEqual(h.source, fields.source);
        assert.deepEqual(h.destination, fields.destination);
      }
    }
  });

  test('v2 round trip keeps AUTHORITY, UNIQUE_ID and a custom 0xEA TLV in order, with a CRC32C appended', () => {
    const tlvs = [
      { type: PP2_TYPE.AUTHORITY, value: Buffer.from('api.example.com') },
      { type: PP2_TYPE.UNIQUE_ID, value: Buffer.alloc(128, 0x5a) },
      { type: 0xea, value: Buffer.from([0xde, 0xad, 0xbe, 0xef]) },
    ];
    const written = writeProxyHeaderV2({ ...ipv6, tlvs }, { crc32c: true });
    const h = expectHeader(parseProxyHeader(written, 'v2'), written.length);
    assert.deepEqual(h.tlvs.slice(0, 3), tlvs);
    assert.equal(h.tlvs[3]?.type, PP2_TYPE.CRC32C);
    assert.equal(h.tlvs.length, 4);
    assert.equal(h.authority, 'api.example.com');
    assert.deepEqual(h.uniqueId, Buffer.alloc(128, 0x5a));
  });

  test('a received CRC32C TLV passed through is dropped instead of written stale', () => {
    const stale = { type: PP2_TYPE.CRC32C, value: Buffer.from([1, 2, 3, 4]) };
    for (const opts of [{}, { crc32c: true }]) {
      const written = writeProxyHeaderV2({ ...ipv4, tlvs: [stale] }, opts);
      const h = expectHeader(parseProxyHeader(written, 'any'), written.length);
      assert.equal(h.tlvs.filter((t) => t.type === PP2_TYPE.CRC32C).length, 'crc32c' in opts ? 1 : 0);
    }
  });

  test('IPv4-mapped addresses on both sides are written as TCP4 with plain IPv4', () => {
    const mapped = { source: { address: '::ffff:192.0.2.10', port: 1 }, destination: { address: '::ffff:127.0.0.1', port: 2 } };
    assert.equal(writeProxyHeaderV1(mapped).toString('latin1'), 'PROXY TCP4 192.0.2.10 127.0.0.1 1 2\r\n');
    const written = writeProxyHeaderV2(mapped);
    assert.equal(written[13], 0x11);
    assert.equal(written.length, 16 + 12);
    const h = expectHeader(parseProxyHeader(written, 'any'));
    assert.deepEqual(h.source, { address: '192.0.2.10', port: 1 });
    assert.deepEqual(h.destination, { address: '127.0.0.1', port: 2 });
  });

  test('an IPv4 and an IPv6 endpoint are written as TCP6 with the IPv4 one mapped', () => {
    const mixed = { source: { address: '192.0.2.10', port: 1 }, destination: { address: '2001:db8::7', port: 2 } };
    assert.equal(writeProxyHeaderV1(mixed).toString('latin1'), 'PROXY TCP6 ::ffff:192.0.2.10 2001:db8::7 1 2\r\n');
    const h = expectHeader(parseProxyHeader(writeProxyHeaderV2(mixed), 'any'));
    assert.equal(h.family, 'tcp6');
    assert.equal(h.source?.address, '::ffff:192.0.2.10');
  });

  test('the worst-case v1 line we write fits in 107 bytes', () => {
    const longest = { source: { address: 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff', port: 65535 }, destination: { address: 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe', port: 65535 } };
    assert.ok(writeProxyHeaderV1(longest).length <= 107);
  });

  test('a non-IP address, a bad port or an oversize UNIQUE_ID throws when writing', () => {
    assert.throws(() => writeProxyHeaderV1({ ...ipv4, source: { address: 'localhost', port: 1 } }), TypeError);
    assert.throws(() => writeProxyHeaderV2({ ...ipv4, source: { address: '1.2.3.4', port: 65536 } }), RangeError);
    assert.throws(() => writeProxyHeaderV2({ ...ipv4, tlvs: [{ type: PP2_TYPE.UNIQUE_ID, value: Buffer.alloc(129) }] }), RangeError);
    assert.throws(() => writeProxyHeaderV2({ ...ipv4, tlvs: [{ type: 256, value: Buffer.alloc(1) }] }), RangeError);
  });
});

// ---- fuzz ------------------------------------------------------------------------------------

/** mulberry32: a tiny deterministic PRNG, so a failing case is reproducible from its index. */
function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

describe('fuzz', () => {
  test('20,000+ mutated headers never throw, give a sane verdict, and never read past the buffer view', () => {
    const random = prng(0x5eed);
    const seeds: Buffer[] = [
      ascii('PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n'),
      ascii('PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 1 65535\r\nGET /'),
      ascii('PROXY UNKNOWN\r\n'),
      ascii(`PROXY UNKNOWN ${LONG_V6_39} ${LONG_V6_39} 65535 65535\r\n`),
      writeProxyHeaderV2({ source: { address: '10.0.0.1', port: 1 }, destination: { address: '10.0.0.2', port: 2 } }),
      writeProxyHeaderV2(
        {
          source: { address: '2001:db8::1', port: 1 },
          destination: { address: '2001:db8::2', port: 2 },
          tlvs: [
            { type: PP2_TYPE.AUTHORITY, value: Buffer.from('example.com') },
            { type: PP2_TYPE.UNIQUE_ID, value: Buffer.alloc(16, 3) },
            { type: PP2_TYPE.SSL, value: Buffer.concat([Buffer.from([1, 0, 0, 0, 0]), tlv(0x21, 'TLSv1.3')]) },
          ],
        },
        { crc32c: true },
      ),
      writeProxyHeaderV2Local(),
      v2(0x21, 0x31, unixBlock('/a', '/b')),
      Buffer.concat([writeProxyHeaderV2({ source: { address: '1.2.3.4', port: 5 }, destination: { address: '6.7.8.9', port: 10 } }), Buffer.from([0x16, 0x03, 0x01])]),
    ];
    const accepts: ProxyVersionAccept[] = ['v1', 'v2', 'any'];
    const cases = 24_000;
    const verdicts = new Map<string, number>();

    for (let n = 0; n < cases; n++) {
      const input = mutate(seeds[random() % seeds.length]!, random);
      const accept = accepts[random() % accepts.length]!;
      let result: ProxyParseResult;
      try {
        result = parseProxyHeader(input, accept);
      } catch (error) {
        assert.fail(`case ${n} threw ${String(error)} on ${input.toString('hex')}`);
      }
      verdicts.set(result.kind, (verdicts.get(result.kind) ?? 0) + 1);
      if (result.kind === 'header') {
        assert.ok(result.consumed > 0 && result.consumed <= input.length, `case ${n}: consumed ${result.consumed}`);
      } else {
        assert.ok(['need-more', 'not-proxy', 'malformed'].includes(result.kind), `case ${n}: ${result.kind}`);
      }
      // The same bytes as a view inside a larger 0xFF-filled buffer: any read past the view
      // would see 0xFF and change the verdict.
      const padded = Buffer.alloc(input.length + 64, 0xff);
      input.copy(padded, 32);
      const view = padded.subarray(32, 32 + input.length);
      assert.deepEqual(parseProxyHeader(view, accept), result, `case ${n} differs inside a larger buffer`);
    }
    // The mutator must exercise every verdict, or the fuzz proves little.
    for (const kind of ['header', 'need-more', 'not-proxy', 'malformed']) {
      assert.ok((verdicts.get(kind) ?? 0) > 100, `verdict ${kind} seen ${verdicts.get(kind) ?? 0} times`);
    }
  });
});

function mutate(seed: Buffer, random: () => number): Buffer {
  let buf = Buffer.from(seed);
  const rounds = 1 + (random() % 3);
  for (let r = 0; r < rounds; r++) {
    const at = buf.length === 0 ? 0 : random() % buf.length;
    switch (random() % 8) {
      case 0: // flip a bit
        if (buf.length > 0) buf[at] = buf[at]! ^ (1 << (random() % 8));
        break;
      case 1: // replace a byte
        if (buf.length > 0) buf[at] = random() & 0xff;
        break;
      case 2: // truncate
        buf = buf.subarray(0, at);
        break;
      case 3: // insert random bytes
        buf = Buffer.concat([buf.subarray(0, at), randomBytes(1 + (random() % 8), random), buf.subarray(at)]);
        break;
      case 4: // delete bytes
        buf = Buffer.concat([buf.subarray(0, at), buf.subarray(at + 1 + (random() % 4))]);
        break;
      case 5: // v2 length field extremes
        if (buf.length >= 16 && buf[0] === 0x0d) {
          const choices = [0, 1, 11, 12, 35, 36, 215, 216, buf.length - 16, buf.length - 15, 4096, 4097, 0xffff, random() & 0xffff];
          buf.writeUInt16BE(Math.max(0, Math.min(0xffff, choices[random() % choices.length]!)), 14);
        }
        break;
      case 6: // v2 version/command and family/transport bytes
        if (buf.length >= 14 && buf[0] === 0x0d) buf[12 + (random() % 2)] = random() & 0xff;
        break;
      case 7: // replace a byte with one of the characters the grammars care about
        if (buf.length > 0) buf[at] = [0x0d, 0x0a, 0x20, 0x3a, 0x2e, 0x30, 0x00, 0xff][random() % 8]!;
        break;
    }
  }
  return buf;
}

function randomBytes(count: number, random: () => number): Buffer {
  const out = Buffer.alloc(count);
  for (let i = 0; i < count; i++) out[i] = random() & 0xff;
  return out;
}
