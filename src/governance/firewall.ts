// Allow/block lists compiled once per config into sorted, merged address ranges; a lookup is one
// binary search per list, O(log n), so tens of thousands of CIDRs cost ~16 comparisons per accept.
//
// Semantics (the same for the global, listener and route lists):
// - block wins: an address matching any block rule is refused even if an allow rule matches;
// - a non-empty allow list means default deny: only addresses matching it pass (an allow list
//   with only IPv4 rules therefore refuses every IPv6 client, and the reverse);
// - IPv4 clients are IPv4 whether the socket reports `1.2.3.4` or `::ffff:1.2.3.4`, and they
//   match IPv4 rules (and IPv4-mapped rules, which parseCidr turns into IPv4). IPv6 rules
//   shorter than /96, such as `::/0`, do not match IPv4 clients: write `0.0.0.0/0` for those;
// - an address that does not parse is refused (fail closed; Node never reports one).

import type { FirewallRules } from '../config/types.ts';
import { mappedIPv4, parseCidr, parseIPv4, parseIPv6 } from './ip-address.ts';

/** Sorted, non-overlapping IPv4 ranges [starts[i], ends[i]]. */
class IPv4Ranges {
  readonly starts: Uint32Array;
  readonly ends: Uint32Array;

  constructor(ranges: Array<[start: number, end: number]>) {
    ranges.sort((a, b) => a[0] - b[0] || b[1] - a[1]);
    const starts: number[] = [];
    const ends: number[] = [];
    for (const [start, end] of ranges) {
      const last = ends.length - 1;
      // Merge overlapping and adjacent ranges: 10.0.0.0/25 + 10.0.0.128/25 is one range.
      if (last >= 0 && start <= ends[last]! + 1) {
        if (end > ends[last]!) ends[last] = end;
      } else {
        starts.push(start);
        ends.push(end);
      }
    }
    this.starts = Uint32Array.from(starts);
    this.ends = Uint32Array.from(ends);
  }

  get size(): number {
    return this.starts.length;
  }

  has(address: number): boolean {
    const starts = this.starts;
    let lo = 0;
    let hi = starts.length - 1;
    // Find the last range starting at or before `address`.
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (starts[mid]! <= address) lo = mid + 1;
      else hi = mid - 1;
    }
    return hi >= 0 && address <= this.ends[hi]!;
  }
}

/** An IPv6 address or range bound as four 32-bit words, most significant first. */
type Words = [number, number, number, number];

function compareWords(a: ArrayLike<number>, aOffset: number, b: ArrayLike<number>, bOffset: number): number {
  for (let i = 0; i < 4; i++) {
    const d = a[aOffset + i]! - b[bOffset + i]!;
    if (d !== 0) return d;
  }
  return 0;
}

/** Sorted, non-overlapping IPv6 ranges; range i is words [4i, 4i+4) of `starts` and `ends`. */
class IPv6Ranges {
  readonly starts: Uint32Array;
  readonly ends: Uint32Array;

  constructor(ranges: Array<[start: Words, end: Words]>) {
    ranges.sort((a, b) => compareWords(a[0], 0, b[0], 0) || compareWords(b[1], 0, a[1], 0));
    const merged: Array<[Words, Words]> = [];
    for (const [start, end] of ranges) {
      const last = merged[merged.length - 1];
      // CIDRs are nested or disjoint, so merging overlaps suffices; adjacent ranges stay two.
      if (last !== undefined && compareWords(start, 0, last[1], 0) <= 0) {
        if (compareWords(end, 0, last[1], 0) > 0) last[1] = end;
      } else {
        merged.push([start, end]);
      }
    }
    this.starts = new Uint32Array(merged.length * 4);
    this.ends = new Uint32Array(merged.length * 4);
    merged.forEach(([start, end], i) => {
      this.starts.set(start, i * 4);
      this.ends.set(end, i * 4);
    });
  }

  get size(): number {
    return this.starts.length / 4;
  }

  has(address: Uint32Array): boolean {
    let lo = 0;
    let hi = this.starts.length / 4 - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (compareWords(this.starts, mid * 4, address, 0) <= 0) lo = mid + 1;
      else hi = mid - 1;
    }
    return hi >= 0 && compareWords(address, 0, this.ends, hi * 4) <= 0;
  }
}

class RuleSet {
  readonly v4: IPv4Ranges;
  readonly v6: IPv6Ranges;

  constructor(rules: readonly string[]) {
    const v4: Array<[number, number]> = [];
    const v6: Array<[Words, Words]> = [];
    for (const rule of rules) {
      const cidr = parseCidr(rule);
      // Config validation accepts only what parseCidr accepts; reaching this is a bug upstream.
      if (cidr === null) throw new Error(`firewall rule is not an address or CIDR: ${JSON.stringify(rule)}`);
      if (cidr.family === 4) {
        v4.push([cidr.address, cidr.address + 2 ** (32 - cidr.prefix) - 1]);
        continue;
      }
      const start: Words = [0, 0, 0, 0];
      const end: Words = [0, 0, 0, 0];
      for (let i = 0; i < 4; i++) {
        const bits = Math.min(32, Math.max(0, cidr.prefix - i * 32));
        const hostMask = bits === 32 ? 0 : 0xffffffff >>> bits;
        start[i] = cidr.groups[i * 2]! * 65536 + cidr.groups[i * 2 + 1]!;
        end[i] = (start[i]! | hostMask) >>> 0;
      }
      v6.push([start, end]);
    }
    this.v4 = new IPv4Ranges(v4);
    this.v6 = new IPv6Ranges(v6);
  }

  get isEmpty(): boolean {
    return this.v4.size === 0 && this.v6.size === 0;
  }
}

// Scratch for the lookup; safe because the event loop runs one call at a time.
const groups = new Uint16Array(8);
const words = new Uint32Array(4);

/** A compiled allow/block list. Immutable; build a new one on reload. */
export class Firewall {
  /** A firewall with no rules; `isOpen` lets the accept path skip it. */
  static readonly empty = new Firewall({ allow: [], block: [] });

  /** True when there are no rules at all: every address is allowed. */
  readonly isOpen: boolean;
  readonly #allow: RuleSet;
  readonly #block: RuleSet;
  readonly #defaultDeny: boolean;

  constructor(rules: FirewallRules) {
    this.#allow = new RuleSet(rules.allow);
    this.#block = new RuleSet(rules.block);
    this.#defaultDeny = !this.#allow.isEmpty;
    this.isOpen = this.#allow.isEmpty && this.#block.isEmpty;
  }

  /** Whether a client at `address` (socket.remoteAddress form) may connect. */
  allows(address: string): boolean {
    if (this.isOpen) return true;
    let v4: number;
    if (address.indexOf(':') === -1) {
      v4 = parseIPv4(address);
    } else if (address.startsWith('::ffff:') && address.indexOf('.', 7) !== -1) {
      v4 = parseIPv4(address, 7);
    } else {
      if (!parseIPv6(address, groups)) return false;
      v4 = mappedIPv4(groups);
      if (v4 < 0) {
        for (let i = 0; i < 4; i++) words[i] = groups[i * 2]! * 65536 + groups[i * 2 + 1]!;
        if (this.#block.v6.has(words)) return false;
        return !this.#defaultDeny || this.#allow.v6.has(words);
      }
    }
    if (v4 < 0) return false;
    if (this.#block.v4.has(v4)) return false;
    return !this.#defaultDeny || this.#allow.v4.has(v4);
  }
}

/** Compiles validated rules; throws only if a rule does not parse (validation should have caught it). */
export function compileFirewall(rules: FirewallRules): Firewall {
  if (rules.allow.length === 0 && rules.block.length === 0) return Firewall.empty;
  return new Firewall(rules);
}
