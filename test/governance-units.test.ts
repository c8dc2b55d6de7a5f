import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import ipaddr from 'ipaddr.js';

import { clientKey } from '../src/governance/client-key.ts';
import { Firewall, compileFirewall } from '../src/governance/firewall.ts';
import { parseCidr } from '../src/governance/ip-address.ts';
import { ClientTable, type ClientLimits } from '../src/governance/client-table.ts';
import { fairShareRefuses } from '../src/governance/fair-share.ts';
import { RejectionLog, withThousands } from '../src/governance/rejection-log.ts';
import type { RejectReason } from '../src/connection/reasons.ts';
import { MAX_THREADS, SharedCounts } from '../src/governance/shared-counts.ts';
import { SlotPool } from '../src/listener/slot-pool.ts';
import { EventLoops } from '../src/event-loops.ts';
import { configFrom } from './support/harness.ts';

// A small deterministic PRNG (mulberry32), so a failing random case can be replayed.
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function randomIPv4(next: () => number): string {
  return [0, 0, 0, 0].map(() => Math.floor(next() * 256)).join('.');
}

function randomIPv6(next: () => number): string {
  // Zero groups are common in real addresses and exercise "::" compression.
  return Array.from({ length: 8 }, () => (next() < 0.3 ? 0 : Math.floor(next() * 65536)).toString(16)).join(':');
}

describe('client keys', () => {
  test('an IPv4 address is its own key', () => {
    assert.equal(clientKey('203.0.113.7', 64), '203.0.113.7');
  });

  test('an IPv4-mapped IPv6 address keys as the IPv4 address', () => {
    assert.equal(clientKey('::ffff:203.0.113.7', 64), '203.0.113.7');
    assert.equal(clientKey('::FFFF:203.0.113.7', 64), '203.0.113.7');
    assert.equal(clientKey('::ffff:cb00:7107', 64), '203.0.113.7');
  });

  test('an IPv6 address keys as its /64 network', () => {
    assert.equal(clientKey('2001:db8:1:2:aaaa:bbbb:cccc:dddd', 64), '2001:db8:1:2::/64');
    assert.equal(clientKey('2001:0DB8:0001:0002::1', 64), '2001:db8:1:2::/64');
  });

  test('two addresses in one /64 share a key', () => {
    assert.equal(clientKey('2001:db8:1:2::1', 64), clientKey('2001:db8:1:2:ffff:ffff:ffff:ffff', 64));
  });

  test('addresses in different /64 networks have different keys', () => {
    assert.notEqual(clientKey('2001:db8:1:2::1', 64), clientKey('2001:db8:1:3::1', 64));
  });

  test('loopback ::1 keys as ::/64 and the prefix length is honoured', () => {
    assert.equal(clientKey('::1', 64), '::/64');
    assert.equal(clientKey('::1', 128), '::1/128');
    assert.equal(clientKey('2001:db8:abcd:1234::1', 48), '2001:db8:abcd::/48');
    assert.equal(clientKey('2001:db8:abcd:1234::1', 56), '2001:db8:abcd:1200::/56');
    assert.equal(clientKey('fe80::1%eth0', 64), 'fe80::/64');
  });

  test('IPv6 keys agree with ipaddr.js on 20,000 random addresses and prefixes', () => {
    const next = random(1);
    for (let i = 0; i < 20_000; i++) {
      const address = randomIPv6(next);
      const prefix = 1 + Math.floor(next() * 128);
      const reference = ipaddr.IPv6.networkAddressFromCIDR(`${address}/${prefix}`);
      if (reference.isIPv4MappedAddress()) continue;
      assert.equal(clientKey(address, prefix), `${reference.toRFC5952String()}/${prefix}`, address);
    }
  });
});

describe('firewall', () => {
  const fw = (allow: string[], block: string[] = []): Firewall => compileFirewall({ allow, block });

  test('a firewall with no rules is open and allows everything', () => {
    const open = fw([]);
    assert.equal(open, Firewall.empty);
    assert.equal(open.isOpen, true);
    assert.equal(open.allows('198.51.100.1'), true);
    assert.equal(open.allows('2001:db8::1'), true);
  });

  test('a non-empty allow list denies everything it does not match', () => {
    const f = fw(['10.0.0.0/8', '192.0.2.1']);
    assert.equal(f.isOpen, false);
    assert.equal(f.allows('10.200.3.4'), true);
    assert.equal(f.allows('192.0.2.1'), true);
    assert.equal(f.allows('192.0.2.2'), false);
    assert.equal(f.allows('11.0.0.0'), false);
    assert.equal(f.allows('2001:db8::1'), false);
  });

  test('a block list alone blocks only what it matches', () => {
    const f = fw([], ['198.51.100.0/24', '2001:db8:bad::/48']);
    assert.equal(f.allows('198.51.100.77'), false);
    assert.equal(f.allows('198.51.101.1'), true);
    assert.equal(f.allows('2001:db8:bad:1::1'), false);
    assert.equal(f.allows('2001:db8:bae::1'), true);
  });

  test('block wins over allow', () => {
    const f = fw(['10.0.0.0/8', '2001:db8::/32'], ['10.1.0.0/16', '2001:db8:1::/48']);
    assert.equal(f.allows('10.2.0.1'), true);
    assert.equal(f.allows('10.1.0.1'), false);
    assert.equal(f.allows('2001:db8:2::1'), true);
    assert.equal(f.allows('2001:db8:1::1'), false);
  });

  test('CIDR boundaries are exact', () => {
    const f = fw(['10.0.0.0/25', '10.0.0.128/25', '172.16.0.0/12', '0.0.0.0/32']);
    assert.equal(f.allows('10.0.0.0'), true);
    assert.equal(f.allows('10.0.0.255'), true);
    assert.equal(f.allows('10.0.1.0'), false);
    assert.equal(f.allows('172.15.255.255'), false);
    assert.equal(f.allows('172.16.0.0'), true);
    assert.equal(f.allows('172.31.255.255'), true);
    assert.equal(f.allows('172.32.0.0'), false);
    assert.equal(f.allows('0.0.0.0'), true);
    const gap = fw(['10.0.0.0/32', '10.0.0.2/31']);
    assert.equal(gap.allows('10.0.0.1'), false, 'ranges one address apart are not merged');
    assert.equal(gap.allows('10.0.0.3'), true);
    assert.equal(fw(['0.0.0.0/0']).allows('255.255.255.255'), true);
    assert.equal(fw(['::/0']).allows('ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff'), true);
  });

  test('IPv6 rules match IPv6 clients whatever the spelling', () => {
    const f = fw(['2001:db8::/32', '::1']);
    assert.equal(f.allows('2001:DB8:0:0:0:0:0:1'), true);
    assert.equal(f.allows('2001:db9::1'), false);
    assert.equal(f.allows('::1'), true);
    assert.equal(f.allows('::2'), false);
    assert.equal(f.allows('fe80::1%eth0'), false);
  });

  test('IPv4-mapped clients match IPv4 rules and IPv4-mapped rules match IPv4 clients', () => {
    const f = fw(['203.0.113.0/24', '::ffff:198.51.100.0/120'], ['::ffff:203.0.113.9']);
    assert.equal(f.allows('::ffff:203.0.113.1'), true);
    assert.equal(f.allows('::ffff:cb00:7101'), true);
    assert.equal(f.allows('203.0.113.9'), false);
    assert.equal(f.allows('::ffff:203.0.113.9'), false);
    assert.equal(f.allows('198.51.100.200'), true);
    assert.equal(f.allows('::ffff:198.51.101.1'), false);
  });

  test('IPv6 rules shorter than /96 do not match IPv4 clients', () => {
    assert.equal(fw([], ['::/0']).allows('203.0.113.1'), true);
    assert.equal(fw([], ['::/0']).allows('::ffff:203.0.113.1'), true);
  });

  test('an address that does not parse is refused by a firewall with rules', () => {
    const f = fw([], ['10.0.0.0/8']);
    assert.equal(f.allows('not-an-ip'), false);
    assert.equal(f.allows('1.2.3'), false);
    assert.equal(f.allows('1::2::3'), false);
  });

  test('a rule that does not parse fails the compile', () => {
    assert.throws(() => fw(['10.0.0.0/33']));
    assert.throws(() => fw(['010.0.0.1']));
    assert.throws(() => fw(['2001:db8::/129']));
  });

  test('parseCidr clears host bits and turns mapped rules into IPv4', () => {
    assert.deepEqual(parseCidr('10.1.2.3/8'), { family: 4, address: 0x0a000000, prefix: 8 });
    assert.deepEqual(parseCidr('::ffff:10.0.0.0/104'), { family: 4, address: 0x0a000000, prefix: 8 });
    assert.equal(parseCidr('10.0.0.0/08'), null);
    assert.equal(parseCidr('10.0.0.0/'), null);
    assert.equal(parseCidr('fe80::1%eth0'), null);
  });

  // --- random rules against a naive reference (ipaddr.js, one rule at a time) ---

  interface Rules {
    allow: string[];
    block: string[];
  }

  function randomRule(next: () => number): string {
    const r = next();
    if (r < 0.6) return `${randomIPv4(next)}/${8 + Math.floor(next() * 25)}`;
    if (r < 0.7) return `::ffff:${randomIPv4(next)}/${104 + Math.floor(next() * 25)}`;
    return `${randomIPv6(next)}/${16 + Math.floor(next() * 113)}`;
  }

  /** A random address inside `rule` (its host bits randomised), in any of the spellings Node uses. */
  function addressIn(rule: string, next: () => number): string {
    const [net, prefix] = ipaddr.parseCIDR(rule);
    const bytes = net.toByteArray();
    const hostBitsFrom = prefix;
    for (let bit = hostBitsFrom; bit < bytes.length * 8; bit++) {
      if (next() < 0.5) bytes[bit >> 3]! ^= 0x80 >> (bit & 7);
    }
    const address = ipaddr.fromByteArray(bytes);
    if (address.kind() === 'ipv6' && (address as ipaddr.IPv6).isIPv4MappedAddress()) {
      return next() < 0.5 ? (address as ipaddr.IPv6).toIPv4Address().toString() : `::ffff:${(address as ipaddr.IPv6).toIPv4Address()}`;
    }
    if (address.kind() === 'ipv4' && next() < 0.3) return `::ffff:${address.toString()}`;
    return address.kind() === 'ipv6' ? (address as ipaddr.IPv6).toRFC5952String() : address.toString();
  }

  function randomRules(next: () => number, allowCount: number, blockCount: number): Rules {
    const allow = Array.from({ length: allowCount }, () => randomRule(next));
    // Blocks are often carved out of allowed networks, so block-wins is exercised.
    const block = Array.from({ length: blockCount }, () => {
      if (next() < 0.5) return randomRule(next);
      const inside = addressIn(allow[Math.floor(next() * allow.length)]!, next);
      return inside.includes(':') && !inside.startsWith('::ffff:') ? `${inside}/${64 + Math.floor(next() * 65)}` : `${inside}/${24 + Math.floor(next() * 9)}`;
    });
    return { allow, block };
  }

  /** The reference: every rule checked in turn with ipaddr.js, as BigInt ranges. */
  function naiveFirewall(rules: Rules): (address: string) => boolean {
    const compile = (list: string[]) =>
      list.map((rule) => {
        let [net, prefix] = ipaddr.parseCIDR(rule.includes('/') ? rule : `${rule}/${rule.includes(':') ? 128 : 32}`);
        if (net.kind() === 'ipv6' && (net as ipaddr.IPv6).isIPv4MappedAddress() && prefix >= 96) {
          net = (net as ipaddr.IPv6).toIPv4Address();
          prefix -= 96;
        }
        const bits = net.kind() === 'ipv4' ? 32 : 128;
        const value = toBigInt(net.toByteArray());
        const size = 1n << BigInt(bits - prefix);
        const start = (value / size) * size;
        return { kind: net.kind(), start, end: start + size - 1n };
      });
    const allow = compile(rules.allow);
    const block = compile(rules.block);
    return (address) => {
      let parsed = ipaddr.parse(address.split('%')[0]!);
      if (parsed.kind() === 'ipv6' && (parsed as ipaddr.IPv6).isIPv4MappedAddress()) parsed = (parsed as ipaddr.IPv6).toIPv4Address();
      const kind = parsed.kind();
      const value = toBigInt(parsed.toByteArray());
      const matches = (list: typeof allow) => list.some((r) => r.kind === kind && value >= r.start && value <= r.end);
      if (matches(block)) return false;
      return allow.length === 0 || matches(allow);
    };
  }

  function toBigInt(bytes: number[]): bigint {
    let value = 0n;
    for (const byte of bytes) value = (value << 8n) | BigInt(byte);
    return value;
  }

  function probeAddresses(rules: Rules, count: number, next: () => number): string[] {
    const all = [...rules.allow, ...rules.block];
    return Array.from({ length: count }, () => {
      const r = next();
      if (r < 0.7) return addressIn(all[Math.floor(next() * all.length)]!, next);
      if (r < 0.85) return randomIPv4(next);
      return ipaddr.parse(randomIPv6(next)).toString();
    });
  }

  test('100,000 lookups agree with a naive rule-by-rule reference on 400 random rules', () => {
    const next = random(7);
    for (let round = 0; round < 4; round++) {
      const rules = round === 3 ? { allow: [], block: randomRules(next, 200, 0).allow } : randomRules(next, 200, 200);
      const fast = compileFirewall(rules);
      const naive = naiveFirewall(rules);
      for (const address of probeAddresses(rules, 25_000, next)) {
        assert.equal(fast.allows(address), naive(address), `${address} with round ${round}`);
      }
    }
  });

  test('50,000 random rules compile and answer lookups fast and correctly', (t) => {
    const next = random(42);
    const rules = randomRules(next, 40_000, 10_000);
    let started = performance.now();
    const fast = compileFirewall(rules);
    const compileMs = performance.now() - started;
    const probes = probeAddresses(rules, 100_000, next);
    // Warm up, then time.
    let allowed = 0;
    for (const address of probes) if (fast.allows(address)) allowed++;
    started = performance.now();
    allowed = 0;
    for (let repeat = 0; repeat < 5; repeat++) for (const address of probes) if (fast.allows(address)) allowed++;
    const lookupMs = performance.now() - started;
    const v4Probes = probes.filter((a) => !a.includes(':'));
    started = performance.now();
    for (let repeat = 0; repeat < 5; repeat++) for (const address of v4Probes) fast.allows(address);
    const v4Ms = performance.now() - started;
    t.diagnostic(
      `50,000 rules: compile ${compileMs.toFixed(0)} ms; ` +
        `${withThousands(Math.round((probes.length * 5) / (lookupMs / 1000)))} lookups/s mixed (${((lookupMs * 1e6) / (probes.length * 5)).toFixed(0)} ns each), ` +
        `${withThousands(Math.round((v4Probes.length * 5) / (v4Ms / 1000)))} lookups/s IPv4 only; ${allowed / 5} of ${probes.length} allowed`,
    );
    // Spot-check the big set against the reference too (the reference is slow: 50,000 rules each).
    const naive = naiveFirewall(rules);
    for (const address of probes.slice(0, 300)) assert.equal(fast.allows(address), naive(address), address);
  });
});

describe('client table', () => {
  const unlimited: ClientLimits = { maxConnectionsPerIp: 0, connectionRatePerIp: { count: 0, perMs: 0 } };
  const concurrency = (max: number): ClientLimits => ({ maxConnectionsPerIp: max, connectionRatePerIp: { count: 0, perMs: 0 } });
  const rate = (count: number, perMs: number): ClientLimits => ({ maxConnectionsPerIp: 0, connectionRatePerIp: { count, perMs } });

  function clockedTable(maxTrackedIps = 1000): { table: ClientTable; clock: { now: number } } {
    const clock = { now: 0 };
    const table = new ClientTable({ maxTrackedIps, now: () => clock.now });
    return { table, clock };
  }

  /** check then acquire, the way admission does; returns the verdict. */
  function admit(table: ClientTable, key: string, limits: ClientLimits): string {
    const verdict = table.check(key, limits);
    if (verdict === 'ok') table.acquire(key, limits);
    return verdict;
  }

  test('exactly N concurrent connections are admitted and the N+1-th is refused', (t) => {
    const { table } = clockedTable();
    t.after(() => table.close());
    const limits = concurrency(3);
    for (let i = 0; i < 3; i++) assert.equal(admit(table, 'a', limits), 'ok');
    assert.equal(admit(table, 'a', limits), 'ip_limit');
    assert.equal(table.activeOf('a'), 3);
    assert.equal(admit(table, 'b', limits), 'ok', 'other clients are unaffected');
  });

  test('releasing a connection makes room for the next one', (t) => {
    const { table } = clockedTable();
    t.after(() => table.close());
    const limits = concurrency(2);
    admit(table, 'a', limits);
    admit(table, 'a', limits);
    assert.equal(table.check('a', limits), 'ip_limit');
    table.release('a');
    assert.equal(table.check('a', limits), 'ok');
  });

  test('check changes nothing, so a refused connection consumes no quota', (t) => {
    const { table, clock } = clockedTable();
    t.after(() => table.close());
    const limits = rate(2, 1000);
    admit(table, 'a', limits);
    admit(table, 'a', limits);
    for (let i = 0; i < 1000; i++) assert.equal(table.check('a', limits), 'ip_rate');
    for (let i = 0; i < 1000; i++) assert.equal(table.check('new', limits), 'ok');
    assert.equal(table.size, 1);
    assert.equal(table.activeOf('a'), 2);
    clock.now = 1100;
    assert.equal(table.check('a', limits), 'ok', 'the refused attempts did not extend the window');
  });

  test('exactly N connection starts per window are admitted and the N+1-th is refused', (t) => {
    const { table, clock } = clockedTable();
    t.after(() => table.close());
    const limits = rate(5, 1000);
    for (let i = 0; i < 5; i++) {
      clock.now = i * 100;
      assert.equal(admit(table, 'a', limits), 'ok');
      table.release('a');
    }
    clock.now = 500;
    assert.equal(admit(table, 'a', limits), 'ip_rate');
    clock.now = 999;
    assert.equal(admit(table, 'a', limits), 'ip_rate', 'the first start (t=0) is still inside the window');
  });

  test('the window slides one bucket (per / 10) at a time: quota comes back at most per / 10 late', (t) => {
    const { table, clock } = clockedTable();
    t.after(() => table.close());
    const limits = rate(5, 1000);
    for (let i = 0; i < 5; i++) {
      clock.now = i * 100; // starts at 0, 100, 200, 300, 400: one per 100 ms bucket
      admit(table, 'a', limits);
    }
    clock.now = 1000; // an exact window would have let t=0 go; its bucket still overlaps (0, 1000]
    assert.equal(admit(table, 'a', limits), 'ip_rate');
    clock.now = 1099;
    assert.equal(admit(table, 'a', limits), 'ip_rate');
    clock.now = 1100; // bucket [0, 100) has left
    assert.equal(admit(table, 'a', limits), 'ok');
    assert.equal(admit(table, 'a', limits), 'ip_rate', 'only one start left the window');
    clock.now = 1200; // the start at 100 has left
    assert.equal(admit(table, 'a', limits), 'ok');
    clock.now = 1500; // 200, 300, 400 have left
    for (let i = 0; i < 3; i++) assert.equal(admit(table, 'a', limits), 'ok');
    assert.equal(admit(table, 'a', limits), 'ip_rate');
  });

  test('random arrivals: never more than count starts in any window of per, and a refusal only when per + per / 10 holds count', (t) => {
    const { table, clock } = clockedTable();
    t.after(() => table.close());
    let seed = 12345;
    const random = (): number => {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return seed / 2147483648;
    };
    for (const [count, perMs] of [[1, 1000], [5, 1000], [7, 333], [50, 10_000]] as const) {
      const limits = rate(count, perMs);
      const key = `k${count}-${perMs}`;
      const admitted: number[] = [];
      for (let i = 0; i < 3000; i++) {
        clock.now += random() < 0.1 ? random() * perMs : random() * (perMs / count) * 0.5;
        const now = clock.now;
        const verdict = admit(table, key, limits);
        table.release(key);
        if (verdict === 'ok') {
          admitted.push(now);
          const inWindow = admitted.filter((s) => s > now - perMs).length;
          assert.ok(inWindow <= count, `${inWindow} starts in (${now - perMs}, ${now}] with count ${count}`);
        } else {
          assert.equal(verdict, 'ip_rate');
          const inWider = admitted.filter((s) => s > now - perMs - perMs / 10).length;
          assert.ok(inWider >= count, `refused at ${now} with only ${inWider} starts in per + per / 10`);
        }
      }
      assert.ok(admitted.length > count, 'the sequence exercised the window');
    }
  });

  test('the window costs the same whatever count is: count = 10,000,000 admits and refuses at once', (t) => {
    const { table, clock } = clockedTable();
    t.after(() => table.close());
    const limits = rate(10_000_000, 1000);
    for (let i = 0; i < 100; i++) assert.equal(admit(table, `c${i}`, limits), 'ok');
    const one = rate(1, 1000);
    assert.equal(admit(table, 'c0', one), 'ip_rate', 'the starts are counted, not a ring of count slots');
    clock.now = 1100;
    assert.equal(admit(table, 'c0', one), 'ok');
  });

  test('concurrency and rate limits apply together', (t) => {
    const { table, clock } = clockedTable();
    t.after(() => table.close());
    const limits: ClientLimits = { maxConnectionsPerIp: 2, connectionRatePerIp: { count: 3, perMs: 1000 } };
    assert.equal(admit(table, 'a', limits), 'ok');
    assert.equal(admit(table, 'a', limits), 'ok');
    assert.equal(admit(table, 'a', limits), 'ip_limit');
    table.release('a');
    assert.equal(admit(table, 'a', limits), 'ok');
    table.release('a');
    assert.equal(admit(table, 'a', limits), 'ip_rate');
    clock.now = 1100;
    assert.equal(admit(table, 'a', limits), 'ok');
  });

  test('an entry without a window is deleted when its last connection ends', (t) => {
    const { table } = clockedTable();
    t.after(() => table.close());
    admit(table, 'a', unlimited);
    admit(table, 'a', unlimited);
    table.release('a');
    assert.equal(table.size, 1);
    table.release('a');
    assert.equal(table.size, 0);
    table.release('a'); // an extra release is ignored
    assert.equal(table.activeOf('a'), 0);
  });

  test('an idle entry vanishes once its window has passed, by the sweep or when a new key needs its room', (t) => {
    const { table, clock } = clockedTable(1);
    t.after(() => table.close());
    const limits = rate(3, 1000);
    clock.now = 10;
    admit(table, 'a', limits);
    table.release('a');
    assert.equal(table.size, 1, 'its start still counts while its bucket overlaps the window');
    clock.now = 1099;
    table.sweepIdle();
    assert.equal(table.size, 1);
    assert.equal(table.check('b', limits), 'ip_table_full', 'the table (1 key) is full while a is in its window');
    clock.now = 1100;
    assert.equal(table.check('b', limits), 'ok', 'a new key finds the expired entry and takes its room');
    assert.equal(table.size, 0);

    admit(table, 'c', limits);
    table.release('c');
    assert.equal(table.size, 1);
    clock.now = 2200;
    table.sweepIdle();
    assert.equal(table.size, 0, 'removed by the sweep with no traffic');
  });

  test('thousands of keys come and go: probe chains survive deletion by backward shift', (t) => {
    const { table, clock } = clockedTable(5000);
    t.after(() => table.close());
    const limits: ClientLimits = { maxConnectionsPerIp: 2, connectionRatePerIp: { count: 0, perMs: 0 } };
    const held = new Map<string, number>();
    let seed = 7;
    const random = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return seed % n;
    };
    for (let i = 0; i < 50_000; i++) {
      clock.now += 1;
      const key = `10.0.${random(40)}.${random(200)}`;
      const n = held.get(key) ?? 0;
      if (n > 0 && random(2) === 0) {
        table.release(key);
        if (n === 1) held.delete(key);
        else held.set(key, n - 1);
      } else {
        const verdict = admit(table, key, limits);
        assert.equal(verdict, n >= 2 ? 'ip_limit' : 'ok', `${key} holding ${n}`);
        if (verdict === 'ok') held.set(key, n + 1);
      }
    }
    assert.equal(table.size, held.size, 'an entry per key holding connections, no more');
    for (const [key, n] of held) assert.equal(table.activeOf(key), n, key);
    for (const [key, n] of held) for (let i = 0; i < n; i++) table.release(key);
    assert.equal(table.size, 0);
    assert.equal(table.distinctActive, 0);
  });

  test('an entry released after its window has passed is deleted at once', (t) => {
    const { table, clock } = clockedTable();
    t.after(() => table.close());
    const limits = rate(3, 1000);
    admit(table, 'a', limits);
    clock.now = 5000;
    table.release('a');
    assert.equal(table.size, 0);
  });

  test('a new key is refused when the table is full and existing keys keep working', (t) => {
    const { table } = clockedTable(2);
    t.after(() => table.close());
    const limits = concurrency(5);
    admit(table, 'a', limits);
    admit(table, 'b', limits);
    assert.equal(table.check('c', limits), 'ip_table_full');
    assert.equal(admit(table, 'a', limits), 'ok');
    table.release('b');
    assert.equal(admit(table, 'c', limits), 'ok', 'b left, so c fits');
  });

  test('a full table first evicts idle entries whose window has passed', (t) => {
    const { table, clock } = clockedTable(2);
    t.after(() => table.close());
    const limits = rate(3, 1000);
    admit(table, 'a', limits);
    admit(table, 'b', limits);
    table.release('a');
    clock.now = 500;
    assert.equal(table.check('c', limits), 'ip_table_full', "a's window still runs");
    clock.now = 1000;
    assert.equal(table.check('c', limits), 'ip_table_full', "a's bucket still overlaps the window");
    clock.now = 1100;
    assert.equal(table.check('c', limits), 'ok');
    assert.equal(table.size, 1);
  });

  test('the window survives a reload that changes count, and a changed per keeps every start counted', (t) => {
    const { table, clock } = clockedTable();
    t.after(() => table.close());
    for (let i = 0; i < 5; i++) {
      clock.now = i * 10; // starts at 0, 10, 20, 30, 40
      admit(table, 'a', rate(5, 1000));
    }
    clock.now = 100;
    assert.equal(table.check('a', rate(5, 1000)), 'ip_rate', 'a new but equal limits object');
    assert.equal(table.check('a', rate(3, 1000)), 'ip_rate', 'a lower count');
    assert.equal(table.check('a', rate(6, 1000)), 'ok', 'a higher count');
    // per doubles: the five starts are kept (moved to the newest bucket), so nothing is forgotten.
    assert.equal(table.check('a', rate(5, 2000)), 'ip_rate');
    assert.equal(admit(table, 'a', rate(6, 2000)), 'ok');
    assert.equal(table.check('a', rate(6, 2000)), 'ip_rate', 'six starts counted under the new per');
    clock.now = 2199;
    assert.equal(table.check('a', rate(6, 2000)), 'ip_rate');
    clock.now = 2200;
    assert.equal(table.check('a', rate(6, 2000)), 'ok', 'they leave together, one new window later');
  });

  test('top lists the busiest keys and distinctActive counts clients holding connections', (t) => {
    const { table } = clockedTable();
    t.after(() => table.close());
    const counts: Record<string, number> = { a: 3, b: 7, c: 1, d: 5, e: 2 };
    for (const [key, n] of Object.entries(counts)) for (let i = 0; i < n; i++) table.acquire(key, unlimited);
    assert.equal(table.distinctActive, 5);
    assert.deepEqual(table.top(3), [
      { key: 'b', active: 7 },
      { key: 'd', active: 5 },
      { key: 'a', active: 3 },
    ]);
    assert.equal(table.top(10).length, 5);
    assert.deepEqual(table.top(0), []);
    table.release('c');
    assert.equal(table.distinctActive, 4);
    table.clear();
    assert.equal(table.size, 0);
    assert.equal(table.distinctActive, 0);
  });
});

describe('fair share', () => {
  const base = { capacity: 100, fairShareAbove: 80, distinctClients: 4 };

  test('below the threshold no client is refused', () => {
    assert.equal(fairShareRefuses({ ...base, occupancy: 80, clientActive: 70 }), false);
  });

  test('above the threshold a client holding its share is refused and one under it is not', () => {
    // 4 clients plus one share kept for a newcomer: 100 / 5 = 20 each.
    assert.equal(fairShareRefuses({ ...base, occupancy: 81, clientActive: 20 }), true);
    assert.equal(fairShareRefuses({ ...base, occupancy: 81, clientActive: 60 }), true);
    assert.equal(fairShareRefuses({ ...base, occupancy: 81, clientActive: 19 }), false);
  });

  test('a lone hog stops at the threshold, leaving room for a newcomer', () => {
    const lone = { capacity: 10, fairShareAbove: 50, distinctClients: 1 };
    assert.equal(fairShareRefuses({ ...lone, occupancy: 5, clientActive: 5 }), false);
    assert.equal(fairShareRefuses({ ...lone, occupancy: 6, clientActive: 6 }), true);
  });

  test('a newcomer is admitted even when the listener is full of other clients', () => {
    assert.equal(fairShareRefuses({ ...base, occupancy: 100, clientActive: 0, distinctClients: 1000 }), false);
  });

  test('with more clients than capacity everyone keeps a share of one', () => {
    assert.equal(fairShareRefuses({ ...base, occupancy: 100, clientActive: 1, distinctClients: 1000 }), true);
    assert.equal(fairShareRefuses({ ...base, occupancy: 100, clientActive: 1, distinctClients: 0 }), false);
  });

  test('fair share set to 0 is off', () => {
    assert.equal(fairShareRefuses({ ...base, fairShareAbove: 0, occupancy: 100, clientActive: 100 }), false);
  });
});

describe('rejection log', () => {
  interface Line {
    level: string;
    obj: Record<string, unknown>;
    msg: string;
  }

  function clockedLog(t: { after: (fn: () => void) => void }, intervalMs = 10_000) {
    const clock = { now: 0 };
    const lines: Line[] = [];
    const log = new RejectionLog({
      listener: 'web',
      intervalMs,
      now: () => clock.now,
      log: (level, obj, msg) => lines.push({ level, obj: obj as Record<string, unknown>, msg }),
    });
    t.after(() => log.close());
    return { log, lines, clock };
  }

  test('100,000 rejections make a handful of lines per interval with exact numbers', (t) => {
    t.mock.timers.enable({ apis: ['setInterval'] });
    const { log, lines, clock } = clockedLog(t);
    for (let i = 0; i < 48_000; i++) log.record('ip_limit', '127.0.0.2');
    for (let i = 0; i < 213; i++) log.record('queue_full', `10.0.${i >> 8}.${i & 255}`);
    for (let i = 0; i < 1_787; i++) log.record('ip_rate', i % 2 === 0 ? '192.0.2.1' : i % 3 === 0 ? '192.0.2.2' : '192.0.2.3');
    assert.equal(lines.length, 10, 'first sightings are capped at 10 lines');
    assert.equal(lines[0]!.msg, 'rejected connection: ip_limit');
    assert.deepEqual(lines[0]!.obj, { listener: 'web', reason: 'ip_limit', client: '127.0.0.2' });
    clock.now = 10_000;
    t.mock.timers.tick(10_000);
    assert.equal(lines.length, 11);
    const summary = lines[10]!;
    assert.equal(summary.level, 'warn');
    assert.equal(
      summary.msg,
      'rejected 50,000 connections in 10s: ip_limit 48,000 (top 127.0.0.2 x48,000), ' +
        'ip_rate 1,787 (top 192.0.2.1 x894, 192.0.2.3 x595, 192.0.2.2 x298), queue_full 213',
    );
    assert.deepEqual(summary.obj.reasons, { ip_limit: 48_000, ip_rate: 1_787, queue_full: 213 });
    assert.equal(summary.obj.rejected, 50_000);

    // The next interval: 50,000 more from 20,000 clients, beyond the tracked-address cap.
    for (let i = 0; i < 50_000; i++) {
      const client = i % 20_000;
      log.record('firewall', `10.0.${client >> 8}.${client & 255}`);
    }
    assert.equal(lines.length, 21);
    clock.now = 20_000;
    t.mock.timers.tick(10_000);
    assert.equal(lines.length, 22);
    assert.match(lines[21]!.msg, /^rejected 50,000 connections in 10s: firewall 50,000( \(top .*\))?$/);
    assert.deepEqual(log.totals().ip_limit, 48_000);
    assert.deepEqual(log.totals().firewall, 50_000);
    assert.deepEqual(log.totals().no_route, 0);

    // A quiet interval logs nothing and stops the timer; the next record starts a new one.
    clock.now = 30_000;
    t.mock.timers.tick(10_000);
    t.mock.timers.tick(50_000);
    assert.equal(lines.length, 22);
    clock.now = 95_000;
    log.record('draining', '192.0.2.9');
    log.record('draining', '192.0.2.9');
    clock.now = 105_000;
    t.mock.timers.tick(10_000);
    assert.equal(lines.at(-1)!.msg, 'rejected 2 connections in 10s: draining 2 (top 192.0.2.9 x2)');
  });

  test('an interval whose rejections were all logged one by one adds no summary', (t) => {
    t.mock.timers.enable({ apis: ['setInterval'] });
    const { log, lines } = clockedLog(t);
    log.record('firewall', '198.51.100.1');
    log.record('firewall', '198.51.100.2');
    t.mock.timers.tick(10_000);
    assert.deepEqual(
      lines.map((l) => l.msg),
      ['rejected connection: firewall', 'rejected connection: firewall'],
    );
  });

  test('close logs what is pending', (t) => {
    t.mock.timers.enable({ apis: ['setInterval'] });
    const { log, lines, clock } = clockedLog(t);
    const reasons: RejectReason[] = ['queue_full', 'queue_timeout'];
    for (let i = 0; i < 30; i++) log.record(reasons[i % 2]!, `192.0.2.${i}`);
    clock.now = 2_500;
    log.close();
    assert.equal(lines.at(-1)!.msg, 'rejected 30 connections in 2.5s: queue_full 15, queue_timeout 15');
    log.close();
    assert.equal(lines.length, 11);
  });

  test('numbers are written with thousands separators', () => {
    assert.equal(withThousands(0), '0');
    assert.equal(withThousands(999), '999');
    assert.equal(withThousands(1000), '1,000');
    assert.equal(withThousands(48213), '48,213');
    assert.equal(withThousands(1234567), '1,234,567');
  });
});

describe('slot hand-over across threads', () => {
  test('the wake loop yields to the event loop even when another thread always seems to be waiting', { timeout: 5000 }, async (t) => {
    const counts = new SharedCounts();
    const pool = new SlotPool(counts, 2);
    // A listener whose oldest queued connection is always in the other thread, with a slot free:
    // the loop must not wake the others from its own hand-over (it would be woken by its own bump
    // and go round without ever yielding).
    pool.register({ promoteOne: () => false, othersWaiting: () => true });
    pool.startWaking();
    t.after(() => pool.stop());
    counts.wakeOthers(); // another thread frees a slot
    const started = performance.now();
    await new Promise((resolve) => setTimeout(resolve, 10));
    assert.ok(performance.now() - started < 1000, `a 10 ms timer fired after ${Math.round(performance.now() - started)} ms`);
  });

  test('SharedCounts refuses a thread number beyond MAX_THREADS instead of writing over other counts', () => {
    const counts = new SharedCounts();
    assert.throws(() => counts.setHead(0, MAX_THREADS, 1), /out of range/);
    assert.equal(EventLoops.threadsFor(configFrom('[process]\nthreads = "auto"\n[[listeners]]\nname = "a"\nbind = "127.0.0.1:0"\n  [[listeners.routes]]\n  name = "r"\n  default = true\n  backends = "127.0.0.1:1"')) <= MAX_THREADS, true);
  });
});
