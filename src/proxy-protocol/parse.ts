// Pure PROXY protocol v1/v2 parser, following haproxy doc/proxy-protocol.txt. No I/O, never throws:
// the caller owns the socket and the deadline, and calls again with more bytes on 'need-more'.
// Every read stays inside `buf` (and inside the declared header), so a pooled or sliced buffer
// is safe to pass.

import { isUtf8 } from 'node:buffer';
import { formatIPv4, formatIPv6, parseIPv4, parseIPv6 } from './address.ts';
import { crc32c } from './crc32c.ts';
import {
  PP2_TYPE,
  V1_MAX_LENGTH,
  V1_PREFIX,
  V2_ADDRESS_LENGTH,
  V2_FIXED_LENGTH,
  V2_SIGNATURE,
  V2_UNIQUE_ID_MAX_LENGTH,
  type ProxyAddress,
  type ProxyHeader,
  type ProxyParseResult,
  type ProxyTlv,
  type ProxyVersionAccept,
} from './types.ts';

export { PP2_TYPE, PP2_SUBTYPE_SSL } from './types.ts';
export type { ProxyAddress, ProxyHeader, ProxyParseResult, ProxyTlv, ProxyVersionAccept } from './types.ts';

/**
 * Largest v2 length field we accept (the field itself allows 65535). A load balancer sends a few
 * hundred bytes at most (addresses, authority, unique id, SSL details); holding up to 64 KiB per
 * pending connection before any check would only help a client that wants to exhaust memory.
 */
export const V2_MAX_DECLARED_LENGTH = 4096;

const CR = 0x0d;
const LF = 0x0a;
const PORT = /^(?:0|[1-9][0-9]{0,4})$/;
const CRC_PLACEHOLDER = Buffer.alloc(4);

const NEED_MORE: ProxyParseResult = Object.freeze({ kind: 'need-more' });
const NOT_PROXY: ProxyParseResult = Object.freeze({ kind: 'not-proxy' });

function malformed(why: string): ProxyParseResult {
  return { kind: 'malformed', why };
}

/**
 * Parses a PROXY header at the start of `buf`. Pure, never throws. `consumed` is exactly the
 * header's length; bytes after it belong to the payload. A header of a version the listener does
 * not accept is 'malformed', not payload.
 */
export function parseProxyHeader(buf: Buffer, accept: ProxyVersionAccept): ProxyParseResult {
  const v1 = matchSignature(buf, V1_PREFIX);
  if (v1 === 'complete') {
    return accept === 'v2' ? malformed('PROXY protocol v1 not accepted on this listener') : parseV1(buf);
  }
  const v2 = matchSignature(buf, V2_SIGNATURE);
  if (v2 === 'complete') {
    return accept === 'v1' ? malformed('PROXY protocol v2 not accepted on this listener') : parseV2(buf);
  }
  // Both signatures are watched whatever `accept` says, so that a wrong-version header is reported
  // as one instead of being mistaken for payload.
  return v1 === 'prefix' || v2 === 'prefix' ? NEED_MORE : NOT_PROXY;
}

function matchSignature(buf: Buffer, signature: Buffer): 'complete' | 'prefix' | 'no' {
  const n = Math.min(buf.length, signature.length);
  for (let i = 0; i < n; i++) if (buf[i] !== signature[i]) return 'no';
  return buf.length >= signature.length ? 'complete' : 'prefix';
}

// ---------------------------------------------------------------------------------------------
// v1: "PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n" or "PROXY UNKNOWN[ anything]\r\n"

function parseV1(buf: Buffer): ProxyParseResult {
  // The spec lets a receiver stop at 107 bytes: a line without CRLF by then is not a header.
  const searchEnd = Math.min(buf.length, V1_MAX_LENGTH);
  for (let i = V1_PREFIX.length; i < searchEnd; i++) {
    const byte = buf[i];
    if (byte === LF) return malformed('PROXY v1 line ends with LF without CR');
    if (byte !== CR) continue;
    if (i + 2 > V1_MAX_LENGTH) return malformed(`PROXY v1 line longer than ${V1_MAX_LENGTH} bytes`);
    if (i + 1 >= buf.length) return NEED_MORE;
    // Like haproxy, the first CR ends the line, even after UNKNOWN.
    if (buf[i + 1] !== LF) return malformed('PROXY v1 line has a CR not followed by LF');
    return parseV1Line(buf.toString('latin1', V1_PREFIX.length, i), i + 2);
  }
  if (buf.length >= V1_MAX_LENGTH) return malformed(`PROXY v1 line has no CRLF within ${V1_MAX_LENGTH} bytes`);
  return NEED_MORE;
}

function parseV1Line(line: string, consumed: number): ProxyParseResult {
  if (line === 'UNKNOWN' || line.startsWith('UNKNOWN ')) {
    // The receiver must ignore anything after UNKNOWN and keep the connection's own addresses.
    return header(1, 'unknown', null, null, null, [], consumed);
  }
  const fields = line.split(' ');
  if (fields.length !== 5) {
    return malformed('PROXY v1 line is not "TCP4|TCP6 <src> <dst> <sport> <dport>" with single spaces');
  }
  const [protocol, sourceText, destinationText, sourcePortText, destinationPortText] = fields as [
    string,
    string,
    string,
    string,
    string,
  ];
  if (protocol !== 'TCP4' && protocol !== 'TCP6') return malformed('PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN');
  const family = protocol === 'TCP4' ? 'tcp4' : 'tcp6';
  const sourceAddress = parseV1Address(sourceText, family);
  const destinationAddress = parseV1Address(destinationText, family);
  if (sourceAddress === null || destinationAddress === null) {
    return malformed(`PROXY v1 address is not a valid ${family === 'tcp4' ? 'IPv4' : 'IPv6'} address`);
  }
  const sourcePort = parseV1Port(sourcePortText);
  const destinationPort = parseV1Port(destinationPortText);
  if (sourcePort === null || destinationPort === null) {
    return malformed('PROXY v1 port is not a decimal 0-65535 without leading zeros');
  }
  return header(
    1,
    'proxy',
    family,
    { address: sourceAddress, port: sourcePort },
    { address: destinationAddress, port: destinationPort },
    [],
    consumed,
  );
}

/** The address in Node's notation, or null. TCP6 does not take a bare IPv4 (parseIPv6 refuses it). */
function parseV1Address(text: string, family: 'tcp4' | 'tcp6'): string | null {
  if (family === 'tcp4') {
    const bytes = parseIPv4(text);
    return bytes === null ? null : formatIPv4(bytes);
  }
  const bytes = parseIPv6(text);
  return bytes === null ? null : formatIPv6(bytes);
}

function parseV1Port(text: string): number | null {
  if (!PORT.test(text)) return null;
  const port = Number(text);
  return port <= 65535 ? port : null;
}

// ---------------------------------------------------------------------------------------------
// v2: signature(12) | version<<4 | command (1) | family<<4 | transport (1) | length BE (2) | rest

function parseV2(buf: Buffer): ProxyParseResult {
  // Each fixed field is checked as soon as it arrives, so garbage fails before the deadline does.
  const versionCommand = buf[12];
  if (versionCommand === undefined) return NEED_MORE;
  if (versionCommand >> 4 !== 2) return malformed(`PROXY v2 version must be 2 (got ${versionCommand >> 4})`);
  const command = versionCommand & 0x0f;
  if (command > 1) return malformed(`PROXY v2 command must be LOCAL or PROXY (got ${command})`);
  const isLocal = command === 0;

  const familyTransport = buf[13];
  if (familyTransport === undefined) return NEED_MORE;
  // LOCAL: the spec says to discard the protocol block "including the family which is ignored".
  const layout = isLocal ? LOCAL_LAYOUT : addressLayout(familyTransport);
  if (typeof layout === 'string') return malformed(layout);

  if (buf.length < V2_FIXED_LENGTH) return NEED_MORE;
  const declaredLength = buf.readUInt16BE(14);
  if (declaredLength > V2_MAX_DECLARED_LENGTH) {
    return malformed(`PROXY v2 header longer than ${V2_MAX_DECLARED_LENGTH} bytes after the fixed part (got ${declaredLength})`);
  }
  if (declaredLength < layout.addressLength) {
    return malformed(`PROXY v2 length ${declaredLength} is shorter than the ${layout.addressLength}-byte address block`);
  }
  const consumed = V2_FIXED_LENGTH + declaredLength;
  if (buf.length < consumed) return NEED_MORE;

  if (isLocal) return header(2, 'local', null, null, null, [], consumed);
  // UNSPEC family: "the receiver should ignore address information"; a sender may put anything
  // there, so the block is skipped unread, like LOCAL.
  if (layout.family === null) return header(2, 'unknown', null, null, null, [], consumed);

  const view = buf.subarray(0, consumed);
  const tlvs = parseTlvs(view, V2_FIXED_LENGTH + layout.addressLength);
  if (typeof tlvs === 'string') return malformed(tlvs);
  // STREAM is the only transport we can stand in for; UNSPEC transport says nothing usable about
  // the addresses, so it is treated like UNKNOWN: keep the connection's own.
  if (!layout.stream) return header(2, 'unknown', null, null, null, tlvs, consumed);
  const [source, destination] = readAddresses(view, layout.family);
  return header(2, 'proxy', layout.family, source, destination, tlvs, consumed);
}

interface AddressLayout {
  readonly family: 'tcp4' | 'tcp6' | 'unix' | null;
  readonly addressLength: number;
  /** Transport is STREAM (as opposed to UNSPEC). */
  readonly stream: boolean;
}

const LOCAL_LAYOUT: AddressLayout = { family: null, addressLength: 0, stream: false };

/** The family/transport byte of a PROXY command, or why it is refused. */
function addressLayout(familyTransport: number): AddressLayout | string {
  const familyNibble = familyTransport >> 4;
  const transport = familyTransport & 0x0f;
  if (transport === 2) return 'PROXY v2 transport DGRAM cannot be proxied over TCP';
  if (transport > 2) return `PROXY v2 transport ${transport} is not UNSPEC, STREAM or DGRAM`;
  const stream = transport === 1;
  switch (familyNibble) {
    case 0:
      return { family: null, addressLength: 0, stream };
    case 1:
      return { family: 'tcp4', addressLength: V2_ADDRESS_LENGTH.inet, stream };
    case 2:
      return { family: 'tcp6', addressLength: V2_ADDRESS_LENGTH.inet6, stream };
    case 3:
      return { family: 'unix', addressLength: V2_ADDRESS_LENGTH.unix, stream };
    default:
      return `PROXY v2 address family ${familyNibble} is not UNSPEC, INET, INET6 or UNIX`;
  }
}

function readAddresses(view: Buffer, family: 'tcp4' | 'tcp6' | 'unix'): [ProxyAddress, ProxyAddress] {
  const at = V2_FIXED_LENGTH;
  switch (family) {
    case 'tcp4':
      return [
        { address: formatIPv4(view.subarray(at, at + 4)), port: view.readUInt16BE(at + 8) },
        { address: formatIPv4(view.subarray(at + 4, at + 8)), port: view.readUInt16BE(at + 10) },
      ];
    case 'tcp6':
      return [
        { address: formatIPv6(view.subarray(at, at + 16)), port: view.readUInt16BE(at + 32) },
        { address: formatIPv6(view.subarray(at + 16, at + 32)), port: view.readUInt16BE(at + 34) },
      ];
    case 'unix':
      return [
        { address: unixPath(view.subarray(at, at + 108)), port: 0 },
        { address: unixPath(view.subarray(at + 108, at + 216)), port: 0 },
      ];
  }
}

/** sun_path is NUL-padded; the path ends at the first NUL (an abstract-namespace name reads as ''). */
function unixPath(field: Buffer): string {
  const end = field.indexOf(0);
  return field.toString('utf8', 0, end === -1 ? field.length : end);
}

/** The TLVs from `start` to the end of `view` (exactly one header), or why they are invalid. */
function parseTlvs(view: Buffer, start: number): ProxyTlv[] | string {
  const tlvs: ProxyTlv[] = [];
  let crcOffset = -1;
  let offset = start;
  while (offset < view.length) {
    if (view.length - offset < 3) return 'PROXY v2 TLV header runs past the declared length';
    const type = view[offset]!;
    const valueStart = offset + 3;
    const valueEnd = valueStart + view.readUInt16BE(offset + 1);
    if (valueEnd > view.length) return `PROXY v2 TLV 0x${hex(type)} runs past the declared length`;
    const value = view.subarray(valueStart, valueEnd);
    switch (type) {
      case PP2_TYPE.CRC32C:
        if (value.length !== 4) return 'PROXY v2 CRC32C TLV is not 4 bytes';
        // Two checksums would each cover the other's bytes: no sender does that.
        if (crcOffset !== -1) return 'PROXY v2 header has more than one CRC32C TLV';
        crcOffset = valueStart;
        break;
      case PP2_TYPE.UNIQUE_ID:
        if (value.length > V2_UNIQUE_ID_MAX_LENGTH) {
          return `PROXY v2 UNIQUE_ID is longer than ${V2_UNIQUE_ID_MAX_LENGTH} bytes`;
        }
        break;
      case PP2_TYPE.AUTHORITY:
        // It may be routed on, so a broken encoding is refused rather than replaced with U+FFFD.
        if (!isUtf8(value)) return 'PROXY v2 AUTHORITY is not UTF-8';
        break;
      case PP2_TYPE.SSL: {
        const why = checkSslValue(value);
        if (why !== null) return why;
        break;
      }
    }
    // Copied: the caller's buffer may be a pooled socket chunk that is reused.
    tlvs.push({ type, value: Buffer.from(value) });
    offset = valueEnd;
  }
  if (crcOffset !== -1) {
    // The checksum covers the whole header with its own value field read as zero.
    let computed = crc32c(view.subarray(0, crcOffset));
    computed = crc32c(CRC_PLACEHOLDER, computed);
    computed = crc32c(view.subarray(crcOffset + 4), computed);
    if (computed !== view.readUInt32BE(crcOffset)) return 'PROXY v2 CRC32C does not match the header';
  }
  return tlvs;
}

/** PP2_TYPE_SSL: client (1 byte), verify (4 bytes), then sub-TLVs that must fill the value exactly. */
function checkSslValue(value: Buffer): string | null {
  if (value.length < 5) return 'PROXY v2 SSL TLV is shorter than its 5-byte client/verify fields';
  let offset = 5;
  while (offset < value.length) {
    if (value.length - offset < 3) return 'PROXY v2 SSL sub-TLV header runs past the SSL TLV';
    const end = offset + 3 + value.readUInt16BE(offset + 1);
    if (end > value.length) return `PROXY v2 SSL sub-TLV 0x${hex(value[offset]!)} runs past the SSL TLV`;
    offset = end;
  }
  return null;
}

function header(
  version: 1 | 2,
  command: ProxyHeader['command'],
  family: ProxyHeader['family'],
  source: ProxyAddress | null,
  destination: ProxyAddress | null,
  tlvs: readonly ProxyTlv[],
  consumed: number,
): ProxyParseResult {
  return {
    kind: 'header',
    consumed,
    header: {
      version,
      command,
      family,
      source,
      destination,
      tlvs,
      authority: firstTlv(tlvs, PP2_TYPE.AUTHORITY)?.toString('utf8') ?? null,
      alpn: firstTlv(tlvs, PP2_TYPE.ALPN)?.toString('utf8') ?? null,
      uniqueId: firstTlv(tlvs, PP2_TYPE.UNIQUE_ID) ?? null,
    },
  };
}

function firstTlv(tlvs: readonly ProxyTlv[], type: number): Buffer | undefined {
  return tlvs.find((tlv) => tlv.type === type)?.value;
}

function hex(byte: number): string {
  return byte.toString(16).padStart(2, '0');
}
