// IP text -> numbers for the per-accept checks (client keys, firewall). Written for the hot path:
// char-code scanning with no split, regex or per-call allocation; IPv6 is parsed into a caller's
// Uint16Array. Strict like src/proxy-protocol/address.ts (no leading zeros in IPv4 octets, which
// read as octal elsewhere), which is built for clarity and allocates; this one is built for speed.

const DOT = 0x2e;
const COLON = 0x3a;

/**
 * A dotted-quad IPv4 in `text[start, end)` as a uint32 (0 to 2^32-1), or -1 if it is not exactly
 * four decimal octets 0-255 without leading zeros.
 */
export function parseIPv4(text: string, start = 0, end = text.length): number {
  let value = 0;
  let octet = 0;
  let digits = 0;
  let dots = 0;
  for (let i = start; i < end; i++) {
    const c = text.charCodeAt(i);
    if (c === DOT) {
      if (digits === 0 || dots === 3) return -1;
      value = value * 256 + octet;
      dots++;
      octet = 0;
      digits = 0;
      continue;
    }
    const digit = c - 0x30;
    if (digit < 0 || digit > 9) return -1;
    if (digits > 0 && octet === 0) return -1; // leading zero
    octet = octet * 10 + digit;
    if (++digits > 3 || octet > 255) return -1;
  }
  if (digits === 0 || dots !== 3) return -1;
  return value * 256 + octet;
}

function hexValue(c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  const lower = c | 0x20;
  if (lower >= 0x61 && lower <= 0x66) return lower - 0x61 + 10;
  return -1;
}

/**
 * Parses IPv6 text in `text[start, end)` into eight 16-bit groups in `out`; false if malformed
 * (`out` is then garbage). Accepts "::", upper or lower case, a dotted IPv4 as the last 32 bits,
 * and ignores a zone id ("fe80::1%eth0"), which says which interface, not who the client is.
 */
export function parseIPv6(text: string, out: Uint16Array, start = 0, end = text.length): boolean {
  const zone = text.indexOf('%', start);
  if (zone !== -1 && zone < end) end = zone;
  if (end - start < 2) return false;
  let groups = 0;
  let gap = -1; // index of the first group after "::"
  let i = start;
  if (text.charCodeAt(i) === COLON) {
    if (text.charCodeAt(i + 1) !== COLON) return false;
    gap = 0;
    i += 2;
  }
  while (i < end) {
    if (groups === 8) return false;
    let value = 0;
    let digits = 0;
    let j = i;
    for (; j < end; j++) {
      const h = hexValue(text.charCodeAt(j));
      if (h < 0) break;
      if (++digits > 4) return false;
      value = value * 16 + h;
    }
    if (j < end && text.charCodeAt(j) === DOT) {
      if (groups > 6) return false;
      const v4 = parseIPv4(text, i, end);
      if (v4 < 0) return false;
      out[groups++] = Math.floor(v4 / 65536);
      out[groups++] = v4 % 65536;
      break;
    }
    if (digits === 0) return false;
    out[groups++] = value;
    if (j === end) break;
    if (text.charCodeAt(j) !== COLON) return false;
    j++;
    if (j < end && text.charCodeAt(j) === COLON) {
      if (gap !== -1) return false;
      gap = groups;
      j++;
    } else if (j === end) {
      return false; // a single trailing colon
    }
    i = j;
  }
  if (gap === -1) return groups === 8;
  // "::" stands for at least one zero group (RFC 4291 section 2.2).
  if (groups > 7) return false;
  const tail = groups - gap;
  for (let k = 0; k < tail; k++) out[7 - k] = out[groups - 1 - k]!;
  for (let k = gap; k < 8 - tail; k++) out[k] = 0;
  return true;
}

/** The IPv4 address inside ::ffff:a.b.c.d as a uint32, or -1 if the groups are not IPv4-mapped. */
export function mappedIPv4(groups: Uint16Array): number {
  if (groups[5] !== 0xffff) return -1;
  for (let i = 0; i < 5; i++) if (groups[i] !== 0) return -1;
  return groups[6]! * 65536 + groups[7]!;
}

export function formatIPv4(value: number): string {
  return `${value >>> 24}.${(value >>> 16) & 0xff}.${(value >>> 8) & 0xff}.${value & 0xff}`;
}

/**
 * RFC 5952 text of eight groups: lower-case hex, no leading zeros, the first longest run of two
 * or more zero groups written "::". (No dotted IPv4 tail: callers turn mapped addresses into IPv4.)
 */
export function formatIPv6(groups: Uint16Array): string {
  let bestStart = -1;
  let bestLength = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLength) {
      bestStart = i;
      bestLength = j - i;
    }
    i = j;
  }
  let text = '';
  for (let i = 0; i < 8; i++) {
    if (i === bestStart) {
      text += '::';
      i += bestLength - 1;
      continue;
    }
    if (i !== 0 && i !== bestStart + bestLength) text += ':';
    text += groups[i]!.toString(16);
  }
  return text;
}

/** Zeroes every bit of `groups` after the first `prefix` bits (0-128), in place. */
export function maskIPv6(groups: Uint16Array, prefix: number): void {
  for (let i = 0; i < 8; i++) {
    const bits = prefix - i * 16;
    if (bits >= 16) continue;
    groups[i] = bits <= 0 ? 0 : groups[i]! & ((0xffff << (16 - bits)) & 0xffff);
  }
}

/** One firewall rule as parsed: a network and its prefix length. */
export type Cidr =
  | { readonly family: 4; readonly address: number; readonly prefix: number }
  | { readonly family: 6; readonly groups: Uint16Array; readonly prefix: number };

/**
 * Parses `1.2.3.4`, `10.0.0.0/8`, `2001:db8::/32` or `::1`; null if malformed. A bare address is
 * a /32 or /128. Host bits after the prefix are cleared (`10.1.2.3/8` is `10.0.0.0/8`). An IPv4-mapped
 * rule of /96 or longer (`::ffff:10.0.0.0/104`) becomes the IPv4 rule it means (`10.0.0.0/8`),
 * because IPv4 clients are matched as IPv4 whichever way the socket reports them.
 */
export function parseCidr(text: string): Cidr | null {
  const slash = text.indexOf('/');
  const addressEnd = slash === -1 ? text.length : slash;
  let prefix = -1;
  if (slash !== -1) {
    prefix = 0;
    const digits = text.length - slash - 1;
    if (digits < 1 || digits > 3) return null;
    for (let i = slash + 1; i < text.length; i++) {
      const digit = text.charCodeAt(i) - 0x30;
      if (digit < 0 || digit > 9 || (i > slash + 1 && prefix === 0)) return null;
      prefix = prefix * 10 + digit;
    }
  }
  const colon = text.indexOf(':');
  if (colon === -1 || colon > addressEnd) {
    const address = parseIPv4(text, 0, addressEnd);
    if (address < 0) return null;
    if (prefix === -1) prefix = 32;
    if (prefix > 32) return null;
    const size = 2 ** (32 - prefix);
    return { family: 4, address: Math.floor(address / size) * size, prefix };
  }
  if (text.indexOf('%') !== -1) return null; // a zone id names an interface, not a network
  const groups = new Uint16Array(8);
  if (!parseIPv6(text, groups, 0, addressEnd)) return null;
  if (prefix === -1) prefix = 128;
  if (prefix > 128) return null;
  maskIPv6(groups, prefix);
  if (prefix >= 96) {
    const v4 = mappedIPv4(groups);
    if (v4 >= 0) return { family: 4, address: v4, prefix: prefix - 96 };
  }
  return { family: 6, groups, prefix };
}
