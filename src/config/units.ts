// Pure parsers for the small languages inside config values: durations, host:port, addresses
// and CIDRs, SNI patterns. Each returns the parsed value or `{ error }` (a reason without the
// value; the caller puts the value and the TOML path around it). None of them throws.
import ipaddr from 'ipaddr.js';
import type { HostPort } from './types.ts';

export interface UnitError {
  readonly error: string;
}

export function isUnitError(value: unknown): value is UnitError {
  return typeof value === 'object' && value !== null && 'error' in value;
}

/** setTimeout's largest delay: Node fires a longer one after 1 ms (TimeoutOverflowWarning). */
export const MAX_TIMER_MS = 2_147_483_647;

/**
 * The longest duration a config may hold: 576h (24 days). It stays below MAX_TIMER_MS with room
 * to spare, because deadlines are rounded up to whole seconds before they are armed; a bound
 * just under 2^31-1 ms let 2,147,483,001 ms pass and round up past it (issue 13, defect 3).
 */
export const MAX_DURATION_MS = 576 * 3_600_000;

const DURATION_UNITS = [
  { unit: 'h', ms: 3_600_000 },
  { unit: 'm', ms: 60_000 },
  { unit: 's', ms: 1_000 },
  { unit: 'ms', ms: 1 },
] as const;

/** "250ms", "5s", "10m", "2h", "0s", "1m30s" -> milliseconds. Whole numbers, units largest first. */
export function parseDuration(text: string): number | UnitError {
  if (text.length === 0) return { error: 'empty; write e.g. "5s" or "250ms"' };
  if (text.startsWith('-')) return { error: 'negative durations are not allowed' };
  if (/^\d+$/.test(text)) return { error: `missing unit; write "${text}s" or "${text}ms"` };
  const part = /(\d+)(ms|h|m|s)/y;
  let total = 0;
  let position = 0;
  let lastRank = -1;
  while (position < text.length) {
    part.lastIndex = position;
    const match = part.exec(text);
    if (match === null) {
      const rest = text.slice(position);
      if (/^\d+\.\d/.test(rest)) return { error: 'use whole numbers, e.g. "1500ms" instead of "1.5s"' };
      if (/^\d+$/.test(rest)) return { error: `missing unit after "${rest}"` };
      return { error: 'expected whole numbers followed by ms, s, m or h, e.g. "5s" or "1m30s"' };
    }
    const digits = match[1] ?? '';
    const unit = match[2] ?? '';
    const rank = DURATION_UNITS.findIndex((u) => u.unit === unit);
    if (rank <= lastRank) return { error: 'each unit at most once, largest first, e.g. "1m30s"' };
    lastRank = rank;
    total += Number(digits) * (DURATION_UNITS[rank]?.ms ?? 0);
    position = part.lastIndex;
  }
  if (total > MAX_DURATION_MS) return { error: 'longer than the maximum of 576h (24 days)' };
  return total;
}

const PORT_RULE = 'port must be 1-65535';

function parsePort(text: string, allowZero = false): number | UnitError {
  if (allowZero && text === '0') return 0;
  if (text.length === 0) return { error: 'missing port' };
  if (!/^\d+$/.test(text)) return { error: `${PORT_RULE}, written in decimal` };
  if (text.length > 1 && text.startsWith('0')) return { error: `${PORT_RULE} without leading zeros` };
  const port = Number(text);
  if (port < 1 || port > 65535) return { error: PORT_RULE };
  return port;
}

// Four-part decimal only: ipaddr.parse also accepts "10.1" and "0x0a.0.0.1", which surprise people.
function isIPv4Literal(text: string): boolean {
  return ipaddr.IPv4.isValidFourPartDecimal(text);
}

// No zone ids, and an embedded IPv4 ("::ffff:10.0.0.1") follows the same four-part decimal rule.
function isIPv6Literal(text: string): boolean {
  if (text.includes('%') || !ipaddr.IPv6.isValid(text)) return false;
  const embedded = text.lastIndexOf(':');
  return !text.includes('.') || isIPv4Literal(text.slice(embedded + 1));
}

const DNS_LABEL = /^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$/i;

/** A DNS host name (letters, digits, "-", "_"; labels 1-63 characters; at most 253 in all). */
export function checkDnsName(text: string): UnitError | null {
  const name = text.endsWith('.') ? text.slice(0, -1) : text;
  if (name.length === 0) return { error: 'empty host name' };
  if (name.length > 253) return { error: 'host name longer than 253 characters' };
  const labels = name.split('.');
  for (const label of labels) {
    if (label.length === 0) return { error: 'empty label in host name' };
    if (label.length > 63) return { error: `label "${label.slice(0, 20)}..." longer than 63 characters` };
    if (!DNS_LABEL.test(label)) return { error: `"${label}" is not a valid host name label` };
  }
  // "10.0.0" or "1.2.3.999" look like IPv4 but are not; no real top-level domain is numeric.
  if (/^\d+$/.test(labels[labels.length - 1] ?? '')) return { error: 'not a valid IPv4 address' };
  return null;
}

/**
 * `127.0.0.1:8443`, `[::1]:8443`, `backend.internal:443` -> HostPort. IPv6 must be bracketed.
 * `allowPortZero` is for bind addresses: port 0 asks the kernel for a free port (tests).
 */
export function parseHostPort(text: string, opts: { allowPortZero?: boolean } = {}): HostPort | UnitError {
  if (text.length === 0) return { error: 'empty' };
  if (/\s/.test(text)) return { error: 'contains whitespace' };
  let host: string;
  let portText: string;
  if (text.startsWith('[')) {
    const close = text.indexOf(']');
    if (close < 0) return { error: 'missing "]" after the IPv6 address' };
    host = text.slice(1, close);
    const rest = text.slice(close + 1);
    if (rest.length === 0) return { error: 'missing port' };
    if (!rest.startsWith(':')) return { error: 'expected ":port" after "]"' };
    portText = rest.slice(1);
    if (!isIPv6Literal(host)) {
      return { error: isIPv4Literal(host) ? 'brackets are only for IPv6 addresses' : `"${host}" is not an IPv6 address` };
    }
  } else {
    const colon = text.lastIndexOf(':');
    if (colon < 0) return { error: 'missing port' };
    host = text.slice(0, colon);
    portText = text.slice(colon + 1);
    if (host.includes(':')) {
      return { error: isIPv6Literal(text) ? 'missing port; write IPv6 as "[::1]:8443"' : 'IPv6 addresses must be in brackets, e.g. "[::1]:8443"' };
    }
    if (host.length === 0) return { error: 'missing host' };
    if (!isIPv4Literal(host)) {
      const bad = checkDnsName(host);
      if (bad !== null) return bad;
    }
  }
  const port = parsePort(portText, opts.allowPortZero);
  if (typeof port !== 'number') return port;
  return { host, port, text };
}

/** 4 or 6 for an IP literal (IPv4 in four-part decimal), null for a host name. */
/** `host:port` as written in a config, an IPv6 literal in brackets: `[::1]:8443`. */
export function formatHostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

export function ipFamily(host: string): 4 | 6 | null {
  if (isIPv4Literal(host)) return 4;
  if (isIPv6Literal(host)) return 6;
  return null;
}

/** A host reduced to one spelling (`::0` and `::` compare equal; names lower-cased). */
export function normalizeHost(host: string): string {
  if (isIPv4Literal(host) || isIPv6Literal(host)) return ipaddr.parse(host).toString();
  return host.toLowerCase().replace(/\.$/, '');
}

/** True for 127.0.0.0/8, ::1, ::ffff:127.x and the name "localhost". */
export function isLoopbackHost(host: string): boolean {
  if (host.toLowerCase() === 'localhost') return true;
  if (!isIPv4Literal(host) && !isIPv6Literal(host)) return false;
  const address = ipaddr.parse(host);
  if (address.kind() === 'ipv6') {
    const v6 = address as ipaddr.IPv6;
    if (v6.isIPv4MappedAddress()) return v6.toIPv4Address().range() === 'loopback';
  }
  return address.range() === 'loopback';
}

export interface Cidr {
  readonly address: ipaddr.IPv4 | ipaddr.IPv6;
  readonly prefix: number;
}

/** `10.0.0.0/8`, `2001:db8::/32`, `::1`, `192.0.2.7` (a single address is a /32 or /128). */
export function parseCidr(text: string): Cidr | UnitError {
  if (text.length === 0) return { error: 'empty' };
  const slash = text.indexOf('/');
  const addressText = slash < 0 ? text : text.slice(0, slash);
  let address: ipaddr.IPv4 | ipaddr.IPv6;
  if (isIPv4Literal(addressText)) address = ipaddr.IPv4.parse(addressText);
  else if (isIPv6Literal(addressText)) address = ipaddr.IPv6.parse(addressText);
  else return { error: 'expected an IP address or CIDR such as "10.0.0.0/8", "2001:db8::/32" or "::1"' };
  const maxPrefix = address.kind() === 'ipv4' ? 32 : 128;
  if (slash < 0) return { address, prefix: maxPrefix };
  const prefixText = text.slice(slash + 1);
  if (!/^(0|[1-9]\d{0,2})$/.test(prefixText) || Number(prefixText) > maxPrefix) {
    return { error: `prefix length must be 0-${maxPrefix}` };
  }
  const prefix = Number(prefixText);
  const network = address.kind() === 'ipv4'
    ? ipaddr.IPv4.networkAddressFromCIDR(text)
    : ipaddr.IPv6.networkAddressFromCIDR(text);
  // "10.0.0.1/8" is almost always a typo for a host or for "10.0.0.0/8"; make the author choose.
  if (network.toString() !== address.toString()) {
    return { error: `host bits set; did you mean "${network.toString()}/${prefix}"?` };
  }
  return { address, prefix };
}

/**
 * An SNI route pattern: an exact host name or `*.` followed by one; returned lower-cased.
 * SNI never carries IP literals (RFC 6066 section 3), so they are refused.
 */
export function parseSniPattern(text: string): string | UnitError {
  if (text.length === 0) return { error: 'empty' };
  const lower = text.toLowerCase();
  const wildcard = lower.startsWith('*.');
  const name = wildcard ? lower.slice(2) : lower;
  if (name.includes('*')) {
    return { error: 'a wildcard is only allowed as the whole first label, e.g. "*.example.com"' };
  }
  if (name.endsWith('.')) return { error: 'no trailing dot; clients never send one' };
  if (isIPv4Literal(name) || isIPv6Literal(name)) return { error: 'an IP address never appears in SNI' };
  const bad = checkDnsName(name);
  if (bad !== null) return bad;
  return lower;
}
