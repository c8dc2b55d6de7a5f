// Who a client is, for per-client limits: one IPv4 address, or one IPv6 network of
// `limits.ipv6_prefix` bits (a single IPv6 host usually holds a whole /64, so counting per
// address would let it take 2^64 identities).

import { formatIPv4, formatIPv6, mappedIPv4, maskIPv6, parseIPv6 } from './ip-address.ts';

const groups = new Uint16Array(8);

function isDottedMapped(address: string): boolean {
  return address.startsWith('::ffff:') && address.indexOf('.', 7) !== -1;
}

/**
 * An IPv4 client of a dual-stack `[::]` bind as Node reports it (`::ffff:a.b.c.d`) is that IPv4
 * client: the address as the firewall, the per-client table, logs and the admin API know it.
 */
export function unmappedIPv4(address: string): string {
  return isDottedMapped(address) ? address.slice(7) : address;
} // scratch; safe because the event loop runs one call at a time

/**
 * The per-client key of `address` as Node reports `socket.remoteAddress`:
 * - IPv4 `1.2.3.4` -> `1.2.3.4` (returned as is, no parsing: the common case)
 * - IPv4-mapped `::ffff:1.2.3.4` (dual-stack sockets) -> `1.2.3.4`, so one client has one key
 * - IPv6 -> its first `ipv6Prefix` bits, RFC 5952, with the length: `2001:db8:1:2::/64`.
 *   Loopback `::1` with prefix 64 is `::/64`, a network it shares with nothing routable.
 * Text that is not an IP address (never produced by Node) is returned unchanged.
 */
export function clientKey(address: string, ipv6Prefix: number): string {
  if (address.indexOf(':') === -1) return address;
  if (isDottedMapped(address)) return address.slice(7);
  if (!parseIPv6(address, groups)) return address;
  const v4 = mappedIPv4(groups);
  if (v4 >= 0) return formatIPv4(v4); // "::FFFF:..." or hex-written mapped forms
  maskIPv6(groups, ipv6Prefix);
  return `${formatIPv6(groups)}/${ipv6Prefix}`;
}
