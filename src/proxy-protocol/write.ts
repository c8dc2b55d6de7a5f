// PROXY protocol v1/v2 writers for the header we send to a backend. Inputs come from our own
// sockets, so a bad address or port is a programming error and throws (TypeError/RangeError).

import { formatIPv4, formatIPv6, isIPv4Mapped, parseIPv4, parseIPv6 } from './address.ts';
import { crc32c } from './crc32c.ts';
import {
  PP2_TYPE,
  V2_ADDRESS_LENGTH,
  V2_FIXED_LENGTH,
  V2_SIGNATURE,
  V2_UNIQUE_ID_MAX_LENGTH,
  type ProxyHeaderFields,
  type ProxyTlv,
} from './types.ts';

export { PP2_TYPE } from './types.ts';
export type { ProxyHeaderFields, ProxyTlv } from './types.ts';

const VERSION_2_LOCAL = 0x20;
const VERSION_2_PROXY = 0x21;
const TCP_OVER_IPV4 = 0x11;
const TCP_OVER_IPV6 = 0x21;
const CRC32C_TLV_LENGTH = 3 + 4;

/** `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n` (at most 104 bytes). */
export function writeProxyHeaderV1(fields: ProxyHeaderFields): Buffer {
  const pair = resolvePair(fields);
  const format = pair.family === 'tcp4' ? formatIPv4 : formatIPv6;
  const line =
    `PROXY ${pair.family === 'tcp4' ? 'TCP4' : 'TCP6'} ${format(pair.source)} ${format(pair.destination)} ` +
    `${pair.sourcePort} ${pair.destinationPort}\r\n`;
  return Buffer.from(line, 'latin1');
}

/**
 * A v2 PROXY/STREAM header with `fields.tlvs` in order. A CRC32C TLV among them is dropped, since
 * it checksummed some other header (e.g. the one we received); with `crc32c: true` a fresh one is
 * appended, computed over the header we write.
 */
export function writeProxyHeaderV2(fields: ProxyHeaderFields, opts: { crc32c?: boolean } = {}): Buffer {
  const pair = resolvePair(fields);
  const tlvs = (fields.tlvs ?? []).filter((tlv) => tlv.type !== PP2_TYPE.CRC32C);
  tlvs.forEach(checkTlv);
  const addressLength = pair.family === 'tcp4' ? V2_ADDRESS_LENGTH.inet : V2_ADDRESS_LENGTH.inet6;
  const tlvLength = tlvs.reduce((sum, tlv) => sum + 3 + tlv.value.length, 0);
  const length = addressLength + tlvLength + (opts.crc32c ? CRC32C_TLV_LENGTH : 0);
  if (length > 0xffff) throw new RangeError(`PROXY v2 header body of ${length} bytes exceeds 65535`);

  const out = Buffer.alloc(V2_FIXED_LENGTH + length);
  V2_SIGNATURE.copy(out, 0);
  out[12] = VERSION_2_PROXY;
  out[13] = pair.family === 'tcp4' ? TCP_OVER_IPV4 : TCP_OVER_IPV6;
  out.writeUInt16BE(length, 14);
  let offset = V2_FIXED_LENGTH;
  out.set(pair.source, offset);
  offset += pair.source.length;
  out.set(pair.destination, offset);
  offset += pair.destination.length;
  offset = out.writeUInt16BE(pair.sourcePort, offset);
  offset = out.writeUInt16BE(pair.destinationPort, offset);
  for (const tlv of tlvs) offset = writeTlv(out, offset, tlv.type, tlv.value);
  if (opts.crc32c) {
    // The value field is still zero here, which is how the checksum is defined.
    const crcOffset = writeTlv(out, offset, PP2_TYPE.CRC32C, Buffer.alloc(4)) - 4;
    out.writeUInt32BE(crc32c(out), crcOffset);
  }
  return out;
}

/** A v2 LOCAL header with no address (health checks): 16 bytes, family UNSPEC, length 0. */
export function writeProxyHeaderV2Local(): Buffer {
  const out = Buffer.alloc(V2_FIXED_LENGTH);
  V2_SIGNATURE.copy(out, 0);
  out[12] = VERSION_2_LOCAL;
  return out;
}

function writeTlv(out: Buffer, offset: number, type: number, value: Buffer): number {
  out[offset] = type;
  out.writeUInt16BE(value.length, offset + 1);
  value.copy(out, offset + 3);
  return offset + 3 + value.length;
}

/** Refuses what our own parser (or any receiver) would reject, so the mistake shows here. */
function checkTlv(tlv: ProxyTlv): void {
  if (!Number.isInteger(tlv.type) || tlv.type < 0 || tlv.type > 0xff) {
    throw new RangeError(`PROXY v2 TLV type ${tlv.type} is not a byte`);
  }
  if (tlv.value.length > 0xffff) throw new RangeError(`PROXY v2 TLV 0x${tlv.type.toString(16)} value exceeds 65535 bytes`);
  if (tlv.type === PP2_TYPE.UNIQUE_ID && tlv.value.length > V2_UNIQUE_ID_MAX_LENGTH) {
    throw new RangeError(`PROXY v2 UNIQUE_ID exceeds ${V2_UNIQUE_ID_MAX_LENGTH} bytes`);
  }
}

interface AddressPair {
  readonly family: 'tcp4' | 'tcp6';
  /** 4 bytes for tcp4, 16 for tcp6. */
  readonly source: Uint8Array;
  readonly destination: Uint8Array;
  readonly sourcePort: number;
  readonly destinationPort: number;
}

/**
 * Both endpoints IPv4 (plain or IPv4-mapped, as a dual-stack socket reports them) -> TCP4 with
 * plain IPv4; otherwise TCP6, with any IPv4 one written as ::ffff:a.b.c.d so both share a family.
 */
function resolvePair(fields: ProxyHeaderFields): AddressPair {
  const source = addressBytes(fields.source.address);
  const destination = addressBytes(fields.destination.address);
  const sourcePort = checkPort(fields.source.port);
  const destinationPort = checkPort(fields.destination.port);
  const source4 = asIPv4(source);
  const destination4 = asIPv4(destination);
  if (source4 !== null && destination4 !== null) {
    return { family: 'tcp4', source: source4, destination: destination4, sourcePort, destinationPort };
  }
  return { family: 'tcp6', source: asIPv6(source), destination: asIPv6(destination), sourcePort, destinationPort };
}

function addressBytes(address: string): Uint8Array {
  // A zone id ("fe80::1%eth0") names one of our interfaces; it means nothing to the receiver.
  const withoutZone = address.includes('%') ? address.slice(0, address.indexOf('%')) : address;
  const bytes = parseIPv4(withoutZone) ?? parseIPv6(withoutZone);
  if (bytes === null) throw new TypeError(`not an IP address: ${JSON.stringify(address)}`);
  return bytes;
}

function asIPv4(bytes: Uint8Array): Uint8Array | null {
  if (bytes.length === 4) return bytes;
  return isIPv4Mapped(bytes) ? bytes.subarray(12, 16) : null;
}

function asIPv6(bytes: Uint8Array): Uint8Array {
  if (bytes.length === 16) return bytes;
  const mapped = new Uint8Array(16);
  mapped[10] = 0xff;
  mapped[11] = 0xff;
  mapped.set(bytes, 12);
  return mapped;
}

function checkPort(port: number): number {
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new RangeError(`not a TCP port: ${port}`);
  return port;
}
