// The backend choice and the shared backend state as pure units: tiers, balance, caps, passive
// ejection. End-to-end behaviour (real backends, checks, admin API, threads) is in backends.test.ts.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BackendPool, hashString, type Member } from '../src/backends/backend-pool.ts';
import { SharedBackendStates } from '../src/backends/backend-states.ts';
import type { Balance } from '../src/config/types.ts';

function members(specs: ReadonlyArray<{ weight?: number; backup?: boolean; max?: number }>): Member[] {
  return specs.map((spec, i) => {
    const text = `10.0.0.${i + 1}:443`;
    return {
      index: i,
      address: { host: `10.0.0.${i + 1}`, port: 443, text },
      configured: text,
      weight: spec.weight ?? 1,
      backup: spec.backup ?? false,
      maxConnections: spec.max ?? 0,
      seed: hashString(text),
    };
  });
}

function pool(balance: Balance, specs: Parameters<typeof members>[0], onAllDown: 'panic' | 'refuse' = 'panic') {
  const states = new SharedBackendStates();
  return { states, pool: new BackendPool(states, members(specs), { balance, onAllDown, probeWindowMs: PROBE_WINDOW_MS, slowStartMs: 0 }) };
}

/** Chooses `n` times, giving each lease back at once; returns picks per member index. */
function spread(p: BackendPool, states: SharedBackendStates, n: number, client = (i: number) => `192.0.2.${i % 250}`): number[] {
  const counts = new Array<number>(p.all.length).fill(0);
  for (let i = 0; i < n; i++) {
    const m = p.choose([], client(i), 0);
    assert.equal(typeof m, 'object');
    counts[(m as Member).index]!++;
    states.release((m as Member).index);
  }
  return counts;
}

const NO_EJECTION = { consecutiveFailures: 3, baseTimeMs: 1000, maxTimeMs: 5000 };
/** How long a probe holds a backend on probation (the connect timeout and a second, in the daemon). */
const PROBE_WINDOW_MS = 6000;

test('round_robin splits by weight exactly over a whole cycle, interleaved rather than in runs', () => {
  const { states, pool: p } = pool('round_robin', [{ weight: 1 }, { weight: 3 }]);
  assert.deepEqual(spread(p, states, 4000), [1000, 3000]);
  const order = Array.from({ length: 4 }, () => {
    const m = p.choose([], 'c', 0) as Member;
    states.release(m.index);
    return m.index;
  });
  assert.deepEqual([...order].sort(), [0, 1, 1, 1]);
  assert.notDeepEqual(order, [1, 1, 1, 0], 'smooth: the light backend is not left for the end of the cycle');
});

test('random_two spreads by weight within a few percent', () => {
  const { states, pool: p } = pool('random_two', [{ weight: 1 }, { weight: 3 }]);
  const [a, b] = spread(p, states, 8000);
  assert.ok(Math.abs(b! / (a! + b!) - 0.75) < 0.05, `${a}:${b}`);
});

test('least_conn picks the backend with the fewest active connections per unit of weight', () => {
  const { states, pool: p } = pool('least_conn', [{}, {}, { weight: 2 }]);
  const held: Member[] = [];
  for (let i = 0; i < 8; i++) held.push(p.choose([], 'c', 0) as Member);
  // 8 held connections over weights 1:1:2 -> 2, 2, 4.
  assert.deepEqual([0, 1, 2].map((i) => states.active(i)), [2, 2, 4]);
  states.release(0);
  states.release(0);
  assert.equal((p.choose([], 'c', 0) as Member).index, 0);
  for (const m of held) states.release(m.index);
});

test('source_hash keeps a client on one backend, and removing one of five moves only its own clients', () => {
  const five = members([{}, {}, {}, {}, {}]);
  const states = new SharedBackendStates();
  const before = new BackendPool(states, five, { balance: 'source_hash', onAllDown: 'panic', probeWindowMs: PROBE_WINDOW_MS, slowStartMs: 0 });
  const clients = Array.from({ length: 1000 }, (_, i) => `198.51.${i >> 8}.${i & 255}`);
  const home = new Map<string, number>();
  for (const c of clients) {
    const m = before.choose([], c, 0) as Member;
    states.release(m.index);
    assert.equal((before.choose([], c, 0) as Member).index, m.index, 'the same client, the same backend');
    states.release(m.index);
    home.set(c, m.index);
  }
  const perBackend = [0, 1, 2, 3, 4].map((i) => [...home.values()].filter((h) => h === i).length);
  for (const n of perBackend) assert.ok(n > 140 && n < 260, `uneven: ${perBackend}`);
  const after = new BackendPool(states, five.filter((m) => m.index !== 2), { balance: 'source_hash', onAllDown: 'panic', probeWindowMs: PROBE_WINDOW_MS, slowStartMs: 0 });
  let moved = 0;
  for (const c of clients) {
    const m = after.choose([], c, 0) as Member;
    states.release(m.index);
    if (m.index !== home.get(c)) {
      moved++;
      assert.equal(home.get(c), 2, 'only clients of the removed backend move');
    }
  }
  assert.equal(moved, perBackend[2]);
});

test('source_hash: a backend that is down sends its clients to their second choice, and they return', () => {
  const { states, pool: p } = pool('source_hash', [{}, {}, {}]);
  const first = p.choose([], '203.0.113.9', 0) as Member;
  states.release(first.index);
  states.setCheckDown(first.index, true);
  const second = p.choose([], '203.0.113.9', 0) as Member;
  states.release(second.index);
  assert.notEqual(second.index, first.index);
  states.setCheckDown(first.index, false);
  const back = p.choose([], '203.0.113.9', 0) as Member;
  assert.equal(back.index, first.index);
});

test('backups get nothing while a primary is up and everything once none is', () => {
  const { states, pool: p } = pool('round_robin', [{}, {}, { backup: true }]);
  assert.deepEqual(spread(p, states, 100), [50, 50, 0]);
  states.setCheckDown(0, true);
  assert.deepEqual(spread(p, states, 100), [0, 100, 0]);
  states.setCheckDown(1, true);
  assert.deepEqual(spread(p, states, 100), [0, 0, 100]);
});

test('a dial that failed on the only up primary fails over to a backup, never to the same backend', () => {
  const { states, pool: p } = pool('round_robin', [{}, { backup: true }]);
  const m = p.choose([], 'c', 0) as Member;
  assert.equal(m.index, 0);
  states.release(0);
  assert.equal((p.choose([0], 'c', 0) as Member).index, 1);
  states.release(1);
  assert.equal(p.choose([0, 1], 'c', 0), 'backend_unavailable');
});

test('every backend down: panic tries them anyway, refuse says no_healthy_backend', () => {
  const panic = pool('round_robin', [{}, {}]);
  panic.states.setCheckDown(0, true);
  panic.states.setCheckDown(1, true);
  assert.deepEqual(spread(panic.pool, panic.states, 10), [5, 5]);
  const refuse = pool('round_robin', [{}, {}], 'refuse');
  refuse.states.setCheckDown(0, true);
  refuse.states.setCheckDown(1, true);
  assert.equal(refuse.pool.choose([], 'c', 0), 'no_healthy_backend');
});

test('drain and maintenance take a backend out of every tier, panic included', () => {
  const { states, pool: p } = pool('round_robin', [{}, {}]);
  states.setAdmin(0, 'drain');
  assert.deepEqual(spread(p, states, 10), [0, 10]);
  states.setCheckDown(1, true); // nothing up: panic, but only among the ready
  assert.deepEqual(spread(p, states, 10), [0, 10]);
  states.setAdmin(1, 'maintenance');
  assert.equal(p.choose([], 'c', 0), 'backend_unavailable');
  states.setAdmin(0, 'ready');
  states.setAdmin(1, 'ready');
  states.setCheckDown(1, false);
  assert.deepEqual(spread(p, states, 10), [5, 5]);
});

test('max_connections: a backend at its cap is skipped; all at their cap is backend_full', () => {
  const { states, pool: p } = pool('round_robin', [{ max: 1 }, { max: 2 }]);
  const held = [p.choose([], 'c', 0), p.choose([], 'c', 0), p.choose([], 'c', 0)] as Member[];
  assert.deepEqual(held.map((m) => m.index).sort(), [0, 1, 1]);
  assert.equal(p.choose([], 'c', 0), 'backend_full');
  states.release(1);
  assert.equal((p.choose([], 'c', 0) as Member).index, 1);
});

test('passive ejection: the Nth failure in a row ejects for base x times ejected, capped; a success forgets', () => {
  const states = new SharedBackendStates();
  const may = (): boolean => true;
  let now = 1_000_000;
  assert.equal(states.connectFailed(0, now, NO_EJECTION, may), 0);
  assert.equal(states.connectFailed(0, now, NO_EJECTION, may), 0);
  assert.equal(states.connectFailed(0, now, NO_EJECTION, may), 1000, 'third failure ejects for base_time');
  assert.ok(states.isEjected(0, now + 999));
  assert.ok(!states.isUp(0, now + 999));
  now += 1000;
  assert.ok(states.isUp(0, now), 'back after the cooldown');
  assert.equal(states.connectFailed(0, now, NO_EJECTION, may), 2000, 'its first failure since ejects it again, for longer');
  now += 2000;
  assert.equal(states.connectFailed(0, now, NO_EJECTION, may), 3000);
  now += 3000;
  for (const expected of [4000, 5000, 5000]) {
    assert.equal(states.connectFailed(0, now, NO_EJECTION, may), expected, 'capped at max_time');
    now += expected;
  }
  states.connected(0, now);
  assert.equal(states.connectFailed(0, now, NO_EJECTION, may), 0, 'a success starts the count again');
  assert.equal(states.snapshot(0, now).ejections, 0);
});

test('passive ejection honours max_share and can be off', () => {
  const states = new SharedBackendStates();
  for (let i = 0; i < 3; i++) states.connectFailed(0, 0, NO_EJECTION, () => false);
  assert.ok(!states.isEjected(0, 0), 'max_share refused it');
  for (let i = 0; i < 5; i++) assert.equal(states.connectFailed(1, 0, { ...NO_EJECTION, consecutiveFailures: 0 }, () => true), 0);
  assert.ok(!states.isEjected(1, 0));
});

test('backend indexes given back are used again before new ones, and a process never runs out by churn', async () => {
  const { CountIndexes } = await import('../src/governance/shared-counts.ts');
  const indexes = new CountIndexes();
  assert.equal(indexes.assignBackends(['a', 'b', 'c'], 4), null);
  assert.deepEqual([indexes.backend('a'), indexes.backend('b'), indexes.backend('c')], [0, 1, 2]);
  indexes.releaseBackend('b');
  assert.equal(indexes.assignBackends(['d'], 4), null);
  assert.equal(indexes.backend('d'), 1, 'the freed index');
  assert.equal(indexes.assignBackends(['e'], 4), null);
  assert.equal(indexes.backend('e'), 3);
  assert.match(indexes.assignBackends(['f'], 4) ?? '', /more than 4 backends at once/);
  // 10,000 rotations of one address through a table of 4.
  for (let i = 0; i < 10_000; i++) {
    indexes.releaseBackend(i === 0 ? 'e' : `r${i - 1}`);
    assert.equal(indexes.assignBackends([`r${i}`], 4), null);
  }
  assert.equal(indexes.backends.size, 4);
  // A copy made from the owner's JSON continues after the highest index it saw.
  const copy = new CountIndexes(indexes.toJSON());
  assert.equal(copy.assignBackends(['x'], 5), null);
  assert.equal(copy.backend('x'), 4);
});

test('panic is for a route with nothing up, not for a connection that tried every up backend', () => {
  const { states, pool: p } = pool('round_robin', [{}, {}]);
  states.setCheckDown(1, true);
  const first = p.choose([], 'c', 0) as Member;
  assert.equal(first.index, 0);
  states.release(0);
  assert.equal(p.choose([0], 'c', 0), 'backend_unavailable', 'the down backend is not dialled after the up one failed');
});

test('after its cooldown an ejected backend is on probation: one connection at a time until one connects', () => {
  const { states, pool: p } = pool('round_robin', [{}, {}]);
  const may = (): boolean => true;
  let now = 1_000_000;
  for (let i = 0; i < 3; i++) states.connectFailed(1, now, NO_EJECTION, may);
  now += 1000;
  assert.ok(states.onProbation(1, now) && states.snapshot(1, now).probation);
  assert.ok(!states.isEjected(1, now), 'max_share counts cooldowns only: a backend nobody dials may stay on probation for good');
  assert.ok(states.isHealthy(1, now), 'smartproxy_backend_up: in rotation, one connection at a time');
  const picks = (n: number, at: number): number[] => {
    const out = [0, 0];
    for (let i = 0; i < n; i++) {
      const m = p.choose([], 'c', at) as Member;
      out[m.index]!++;
      states.release(m.index); // its dial is still pending: the probe stays claimed
    }
    return out;
  };
  assert.deepEqual(picks(20, now), [19, 1], 'one probe, the others go to the healthy backend');
  assert.deepEqual(picks(20, now + PROBE_WINDOW_MS - 1), [20, 0], 'no second probe while the first may still be dialling');
  assert.deepEqual(picks(20, now + PROBE_WINDOW_MS), [19, 1], 'a probe whose outcome never came frees its place at the end of its window');
  // The probe fails: ejected again at once, for longer; the next probe may start when that cooldown ends.
  now += PROBE_WINDOW_MS;
  assert.equal(states.connectFailed(1, now, NO_EJECTION, may), 2000);
  assert.deepEqual(picks(20, now + 1999), [20, 0]);
  now += 2000;
  assert.deepEqual(picks(20, now), [19, 1]);
  // The probe connects: the history ends and the backend takes its full share at once.
  assert.equal(states.connected(1, now), true);
  assert.ok(states.isHealthy(1, now) && !states.onProbation(1, now) && !states.isEjected(1, now));
  assert.deepEqual(picks(20, now), [10, 10]);
});

test('a probe claimed for a backend at its cap is given back; with nothing else up a backend whose probe is out takes the connections, not panic', () => {
  const { states, pool: p } = pool('round_robin', [{ max: 1 }, { max: 1 }], 'panic');
  const may = (): boolean => true;
  for (let i = 0; i < 3; i++) states.connectFailed(1, 0, NO_EJECTION, may);
  const now = 1000;
  assert.ok(states.take(1, 1), 'an older connection holds backend 1 at its cap');
  const held = p.choose([], 'c', now) as Member;
  assert.equal(held.index, 0);
  assert.equal(p.choose([], 'c', now), 'backend_full');
  states.release(1);
  assert.equal((p.choose([], 'c', now) as Member).index, 1, 'the probe given back at the cap is free again');
  states.release(1);
  states.release(0);
  // Backend 0 checked down, 1 on probation with its probe out: 1 takes every connection (as it
  // did after a cooldown before probation existed); panic would dial 0, known down.
  states.setCheckDown(0, true);
  assert.ok(!states.isUp(1, now) && states.probeOut(1, now));
  const picks = Array.from({ length: 10 }, () => {
    const m = p.choose([], 'c', now) as Member;
    states.release(m.index);
    return m.index;
  });
  assert.deepEqual(picks, new Array(10).fill(1));
  assert.equal(p.choose([1], 'c', now), 'backend_unavailable', 'failover from it does not panic onto the backend the checks find down');
});

test('a backup that is up comes before a primary whose probe is out', () => {
  const { states, pool: p } = pool('round_robin', [{}, { backup: true }]);
  for (let i = 0; i < 3; i++) states.connectFailed(0, 0, NO_EJECTION, () => true);
  const now = 1000;
  assert.equal((p.choose([], 'c', now) as Member).index, 0, 'the probe');
  states.release(0);
  for (let i = 0; i < 5; i++) {
    const m = p.choose([], 'c', now) as Member;
    assert.equal(m.index, 1);
    states.release(1);
  }
});

test('slow_start: a backend back in rotation takes 10 % of its weight at first and its full weight at the end of the window, linearly', () => {
  const states = new SharedBackendStates();
  const settings = { onAllDown: 'panic' as const, probeWindowMs: PROBE_WINDOW_MS, slowStartMs: 10_000 };
  const p = new BackendPool(states, members([{}, {}]), { ...settings, balance: 'round_robin' });
  const at = 1_000_000;
  states.startWarming(1, at); // backend 0 has been in rotation since 0
  const split = (now: number, n: number): number[] => {
    const out = [0, 0];
    for (let i = 0; i < n; i++) {
      const m = p.choose([], 'c', now) as Member;
      out[m.index]!++;
      states.release(m.index);
    }
    return out;
  };
  assert.deepEqual(split(at, 1100), [1000, 100], 'weights 1 : 0.1');
  assert.deepEqual(split(at + 5_000, 1500), [1000, 500], 'half way: 1 : 0.5');
  assert.deepEqual(split(at + 10_000, 1000), [500, 500], 'over');
  assert.equal(states.warmUntil(1, at + 5_000, 10_000), at + 10_000);
  assert.equal(states.warmUntil(1, at + 10_000, 10_000), 0);

  // least_conn divides by the ramped weight: half way, the warming backend holds a third.
  const lc = new BackendPool(states, members([{}, {}]), { ...settings, balance: 'least_conn' });
  const held = Array.from({ length: 30 }, () => lc.choose([], 'c', at + 5_000) as Member);
  assert.deepEqual([states.active(0), states.active(1)], [20, 10]);
  for (const m of held) states.release(m.index);

  // source_hash keeps its clients where they are: slow_start does not apply to it.
  const sh = new BackendPool(states, members([{}, {}]), { ...settings, balance: 'source_hash' });
  const before = Array.from({ length: 50 }, (_x, i) => {
    const m = sh.choose([], `192.0.2.${i}`, at + 20_000) as Member;
    states.release(m.index);
    return m.index;
  });
  states.startWarming(1, at + 20_000);
  const during = Array.from({ length: 50 }, (_x, i) => {
    const m = sh.choose([], `192.0.2.${i}`, at + 20_000) as Member;
    states.release(m.index);
    return m.index;
  });
  assert.deepEqual(during, before);
});

test('a failed probe ejects again whatever max_share says, and a connect during a cooldown ends it', () => {
  const states = new SharedBackendStates();
  let now = 1_000_000;
  for (let i = 0; i < 3; i++) states.connectFailed(0, now, NO_EJECTION, () => true);
  now += 1000;
  assert.ok(states.onProbation(0, now));
  // Another backend's ejection has used the route's share meanwhile: a first ejection would be refused...
  for (let i = 0; i < 3; i++) assert.equal(states.connectFailed(1, now, NO_EJECTION, () => false), 0);
  // ...but the failed probe is ejected again, else it would stay the route's probing tier.
  assert.equal(states.connectFailed(0, now, NO_EJECTION, () => false), 2000);
  assert.ok(states.isEjected(0, now + 10));
  // A connect that succeeds during the cooldown (panic, or a dial from before) ends it.
  assert.equal(states.connected(0, now + 10), true);
  assert.ok(!states.isEjected(0, now + 10) && !states.onProbation(0, now + 10) && states.isUp(0, now + 10));
  assert.equal(states.warmShare(0, now + 10, 10_000), 0.1, 'back in rotation: its slow start begins');
  // A passing check ends an ejection the same way, slow start included.
  for (let i = 0; i < 3; i++) states.connectFailed(1, now + 20, NO_EJECTION, () => true);
  assert.ok(states.isEjected(1, now + 20));
  assert.equal(states.uneject(1, now + 20), true);
  assert.ok(states.isUp(1, now + 20) && !states.onProbation(1, now + 20));
  assert.equal(states.warmShare(1, now + 5_020, 10_000), 0.5);
});
