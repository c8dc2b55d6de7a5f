// Per-client state for admission: how many connections each client key holds now and when it
// opened its recent ones. One fixed-size table in a SharedArrayBuffer for the whole process,
// keyed by (listener, client key), so per-client limits and fair share are exact over every event
// loop thread. Lives outside the compiled config so it survives reloads; the limits are passed to
// each call, so a reload changes them without touching the data.
//
// Layout: open addressing with linear probing over a power-of-two number of slots (at least 1.5x
// max_tracked_ips), deletion by backward shift (no tombstones, so probes stay short). Every
// operation runs under one futex-style lock (Atomics.compareExchange, Atomics.wait when
// contended); each holds it for about a microsecond, against ~150 µs of work per connection.
//
// Lifecycle of an entry:
//
//   (absent) --acquire--> active --release to 0--> idle --window passes--> (absent)
//                            ^                      |
//                            +-------acquire--------+
//   An entry whose window is already empty when its last connection is released is deleted at
//   once. Idle entries are deleted by a sweep that walks the table a few slots per operation (and
//   a bounded stretch more when a new client finds the table full), so expiry costs no timer.
//
// The rate window costs the same memory whatever `count` is (issue 13, defect 3: a ring of
// `count` start times let `count = 1000000` pin 7.7 MB per client). It is RATE_BUCKETS + 1
// counters, each covering per / RATE_BUCKETS, summed over the buckets that overlap the window
// (t - per, t]. The sum can include starts up to one bucket older than `per`, never fewer than
// the window holds, so the approximation errs one way only: a client is never admitted more
// than `count` times in any window of length `per` (over all threads), and may wait up to
// per / RATE_BUCKETS longer than an exact sliding window would for its quota to come back.

import type { RateLimit } from '../config/types.ts';

/** The limits of one listener, as in ListenerLimits. 0 = unlimited / off. */
export interface ClientLimits {
  readonly maxConnectionsPerIp: number;
  readonly connectionRatePerIp: RateLimit;
}

export type ClientVerdict = 'ok' | 'ip_limit' | 'ip_rate' | 'ip_table_full';

/** Buckets per rate window: the window is exact to within per / RATE_BUCKETS (see above). */
export const RATE_BUCKETS = 10;
const RATE_SLOTS = RATE_BUCKETS + 1;
/** Longest client key in bytes: an IPv6 network with its prefix length is at most 43. */
const MAX_KEY_BYTES = 48;

// Int32 layout of one entry; the three float64 fields follow at F_BASE (8-byte aligned).
const E_STATE = 0; // 0 empty, 1 live
const E_LISTENER = 1;
const E_KEY_LENGTH = 2;
const E_KEY = 3; // MAX_KEY_BYTES / 4 ints
const E_ACTIVE = E_KEY + MAX_KEY_BYTES / 4;
const E_STARTS = E_ACTIVE + 1; // RATE_SLOTS ints; all 0 = no window
const E_HAS_WINDOW = E_STARTS + RATE_SLOTS;
/** 1 from insert until its first acquire: not counted as idle. */
const E_FRESH = E_HAS_WINDOW + 1;
const F_BASE_INTS = (E_FRESH + 2) & ~1; // after E_HAS_WINDOW, at an even int (8-byte aligned)
const F_NEWEST = 0; // bucket number of the newest bucket the ring holds
const F_LAST_START = 1; // bucket number of the latest start: expiry is RATE_SLOTS buckets later
const F_BUCKET_MS = 2; // per / RATE_BUCKETS of the window the ring was built for
const ENTRY_INTS = F_BASE_INTS + 3 * 2;
/** Bytes per table slot (README, "Memory"). */
export const CLIENT_ENTRY_BYTES = ENTRY_INTS * 4;

// Header, in ints: the lock, the sweep cursor, the live entry count, then per listener its
// entry count and its clients with at least one connection.
const H_LOCK = 0;
const H_SWEEP = 1;
const H_SIZE = 2;
/** Entries with no active connection, kept for their rate window: what the sweep looks for. */
const H_IDLE = 3;
const H_LISTENERS = 4;
const MAX_LISTENERS = 256;
const HEADER_INTS = H_LISTENERS + 2 * MAX_LISTENERS;
/** Slots the sweep examines per operation, and at most when a new key finds the table full. */
const SWEEP_PER_OPERATION = 2;
const SWEEP_WHEN_FULL = 4096;
/** The background sweep: slots per lock hold, and lock holds per call of sweepIdle(). */
const SWEEP_CHUNK = 4096;
const SWEEP_CHUNKS = 8;

/** Milliseconds on a clock every thread of the process shares. */
function sharedNow(): number {
  return performance.timeOrigin + performance.now();
}

/** The table itself: allocate once per process and share its buffer with every thread. */
export class SharedClientTable {
  readonly buffer: SharedArrayBuffer;
  readonly maxTrackedIps: number;
  private readonly header: Int32Array;
  private readonly i32: Int32Array;
  private readonly f64: Float64Array;
  private readonly mask: number;
  readonly now: () => number;
  private readonly keyBytes = new Uint8Array(MAX_KEY_BYTES);

  /** The size in bytes of a table for `maxTrackedIps` keys. */
  static bytesFor(maxTrackedIps: number): number {
    return HEADER_INTS * 4 + slotsFor(maxTrackedIps) * CLIENT_ENTRY_BYTES;
  }

  constructor(opts: { maxTrackedIps: number; buffer?: SharedArrayBuffer; now?: () => number }) {
    this.maxTrackedIps = opts.maxTrackedIps;
    this.buffer = opts.buffer ?? new SharedArrayBuffer(SharedClientTable.bytesFor(opts.maxTrackedIps));
    const slots = slotsFor(opts.maxTrackedIps);
    this.mask = slots - 1;
    this.header = new Int32Array(this.buffer, 0, HEADER_INTS);
    this.i32 = new Int32Array(this.buffer, HEADER_INTS * 4, slots * ENTRY_INTS);
    this.f64 = new Float64Array(this.buffer, HEADER_INTS * 4, (slots * ENTRY_INTS) / 2);
    this.now = opts.now ?? sharedNow;
  }

  /** The per-listener view the admission code uses. */
  view(listener: number): ClientTable {
    return new ClientTable({ shared: this, listener });
  }

  get size(): number {
    return Atomics.load(this.header, H_SIZE);
  }

  /** Entries kept only for their rate window (no active connection). */
  get idle(): number {
    return Atomics.load(this.header, H_IDLE);
  }

  /**
   * The background sweep (one thread calls it every 100 ms): while idle entries exist, walks up
   * to SWEEP_CHUNK x SWEEP_CHUNKS slots, taking the lock once per chunk so no thread waits long.
   * At the default max_tracked_ips the whole table is walked in under a second.
   */
  sweepIdle(): void {
    for (let i = 0; i < SWEEP_CHUNKS && this.idle > 0; i++) this.locked(() => this.sweep(SWEEP_CHUNK, this.now()));
  }

  sizeOf(listener: number): number {
    return Atomics.load(this.header, H_LISTENERS + 2 * listener);
  }

  distinctActiveOf(listener: number): number {
    return Atomics.load(this.header, H_LISTENERS + 2 * listener + 1);
  }

  /** Runs `fn` holding the table's lock (Drepper's futex mutex over Atomics). */
  locked<T>(fn: () => T): T {
    const h = this.header;
    let c = Atomics.compareExchange(h, H_LOCK, 0, 1);
    if (c !== 0) {
      do {
        if (c === 2 || Atomics.compareExchange(h, H_LOCK, 1, 2) !== 0) Atomics.wait(h, H_LOCK, 2, 5);
      } while ((c = Atomics.compareExchange(h, H_LOCK, 0, 2)) !== 0);
    }
    try {
      return fn();
    } finally {
      if (Atomics.sub(h, H_LOCK, 1) !== 1) {
        Atomics.store(h, H_LOCK, 0);
        Atomics.notify(h, H_LOCK, 1);
      }
    }
  }

  // ---- under the lock ----

  /** The slot holding (listener, key), or -1. Leaves the key's bytes in keyBytes. */
  find(listener: number, key: string): number {
    const length = this.encode(key);
    for (let slot = this.home(listener, length); ; slot = (slot + 1) & this.mask) {
      const base = slot * ENTRY_INTS;
      if (this.i32[base + E_STATE] === 0) return -1;
      if (this.matches(base, listener, length)) return slot;
    }
  }

  /** Inserts (listener, key) after find() said it is absent; -1 when the table is full. */
  insert(listener: number, key: string, now: number): number {
    if (this.size >= this.maxTrackedIps) {
      this.sweep(SWEEP_WHEN_FULL, now);
      if (this.size >= this.maxTrackedIps) return -1;
    }
    const length = this.encode(key);
    let slot = this.home(listener, length);
    while (this.i32[slot * ENTRY_INTS + E_STATE] !== 0) slot = (slot + 1) & this.mask;
    const base = slot * ENTRY_INTS;
    this.i32.fill(0, base, base + ENTRY_INTS);
    this.i32[base + E_STATE] = 1;
    this.i32[base + E_FRESH] = 1;
    this.i32[base + E_LISTENER] = listener;
    this.i32[base + E_KEY_LENGTH] = length;
    new Uint8Array(this.buffer, HEADER_INTS * 4 + (base + E_KEY) * 4, length).set(this.keyBytes.subarray(0, length));
    Atomics.add(this.header, H_SIZE, 1);
    Atomics.add(this.header, H_LISTENERS + 2 * listener, 1);
    return slot;
  }

  active(slot: number): number {
    return this.i32[slot * ENTRY_INTS + E_ACTIVE]!;
  }

  /** Starts in the slot's rate window at `now` for a window of `perMs` (0 when it has none). */
  startsInWindow(slot: number, perMs: number, now: number): number {
    const base = slot * ENTRY_INTS;
    if (this.i32[base + E_HAS_WINDOW] === 0) return 0;
    const i32 = this.i32;
    const f = (base + F_BASE_INTS) / 2;
    const bucketMs = perMs / RATE_BUCKETS;
    const bucket = Math.floor(now / bucketMs);
    let total = 0;
    for (let i = 0; i < RATE_SLOTS; i++) total += i32[base + E_STARTS + i]!;
    if (this.f64[f + F_BUCKET_MS] !== bucketMs) {
      // A reload changed `per`: rebuild the ring for the new width with every remembered start
      // in the newest bucket, which can only over-count, never let a client past its limit.
      const kept = now >= this.expiresAt(slot) ? 0 : total;
      i32.fill(0, base + E_STARTS, base + E_STARTS + RATE_SLOTS);
      i32[base + E_STARTS + (bucket % RATE_SLOTS)] = kept;
      this.f64[f + F_BUCKET_MS] = bucketMs;
      this.f64[f + F_NEWEST] = bucket;
      this.f64[f + F_LAST_START] = bucket;
      return kept;
    }
    const newest = this.f64[f + F_NEWEST]!;
    if (bucket > newest) {
      const stale = Math.min(bucket - newest, RATE_SLOTS);
      for (let i = 1; i <= stale; i++) {
        const at = base + E_STARTS + ((newest + i) % RATE_SLOTS);
        total -= i32[at]!;
        i32[at] = 0;
      }
      this.f64[f + F_NEWEST] = bucket;
    }
    return total;
  }

  /** One more connection of the slot's client; one start in its window when `perMs` > 0. */
  acquire(slot: number, perMs: number, now: number): void {
    const base = slot * ENTRY_INTS;
    const i32 = this.i32;
    i32[base + E_ACTIVE] = i32[base + E_ACTIVE]! + 1;
    if (i32[base + E_ACTIVE] === 1) {
      Atomics.add(this.header, H_LISTENERS + 2 * i32[base + E_LISTENER]! + 1, 1);
      if (i32[base + E_FRESH] === 0) Atomics.sub(this.header, H_IDLE, 1); // was idle
      i32[base + E_FRESH] = 0;
    }
    if (perMs <= 0) {
      i32[base + E_HAS_WINDOW] = 0; // rate limiting off (perhaps by a reload): forget the window
      return;
    }
    const f = (base + F_BASE_INTS) / 2;
    if (i32[base + E_HAS_WINDOW] === 0) {
      i32.fill(0, base + E_STARTS, base + E_STARTS + RATE_SLOTS);
      i32[base + E_HAS_WINDOW] = 1;
      this.f64[f + F_BUCKET_MS] = perMs / RATE_BUCKETS;
      this.f64[f + F_NEWEST] = Math.floor(now / (perMs / RATE_BUCKETS));
    }
    this.startsInWindow(slot, perMs, now);
    const newest = this.f64[f + F_NEWEST]!;
    const at = base + E_STARTS + (newest % RATE_SLOTS);
    i32[at] = i32[at]! + 1;
    this.f64[f + F_LAST_START] = newest;
  }

  /** One connection of the slot's client ended; deletes the entry if nothing keeps it. */
  release(slot: number, now: number): void {
    const base = slot * ENTRY_INTS;
    const i32 = this.i32;
    if (i32[base + E_ACTIVE] === 0) return;
    i32[base + E_ACTIVE] = i32[base + E_ACTIVE]! - 1;
    if (i32[base + E_ACTIVE]! > 0) return;
    Atomics.sub(this.header, H_LISTENERS + 2 * i32[base + E_LISTENER]! + 1, 1);
    Atomics.add(this.header, H_IDLE, 1);
    if (this.expiresAt(slot) <= now) this.delete(slot);
  }

  /** When the slot's window holds no start any more (-Infinity without a window). */
  expiresAt(slot: number): number {
    const base = slot * ENTRY_INTS;
    if (this.i32[base + E_HAS_WINDOW] === 0) return -Infinity;
    const f = (base + F_BASE_INTS) / 2;
    return (this.f64[f + F_LAST_START]! + RATE_SLOTS) * this.f64[f + F_BUCKET_MS]!;
  }

  /** Deletes idle entries whose window has passed among the next `count` slots of the sweep. */
  sweep(count: number, now: number): void {
    let cursor = this.header[H_SWEEP]! & this.mask;
    for (let examined = 0; examined < count && this.size > 0; examined++) {
      const base = cursor * ENTRY_INTS;
      // A deletion shifts a later entry into this slot: look at the same slot again.
      if (this.i32[base + E_STATE] === 1 && this.i32[base + E_ACTIVE] === 0 && this.expiresAt(cursor) <= now) this.delete(cursor);
      else cursor = (cursor + 1) & this.mask;
    }
    this.header[H_SWEEP] = cursor;
  }

  /** A little expiry work on every operation, so idle entries never pile up. */
  tidy(now: number): void {
    if (this.size > 0) this.sweep(SWEEP_PER_OPERATION, now);
  }

  /** Linear-probing deletion by backward shift: the probe chains stay whole without tombstones. */
  private delete(slot: number): void {
    const i32 = this.i32;
    const listener = i32[slot * ENTRY_INTS + E_LISTENER]!;
    if (i32[slot * ENTRY_INTS + E_ACTIVE] === 0 && i32[slot * ENTRY_INTS + E_FRESH] === 0) Atomics.sub(this.header, H_IDLE, 1);
    let hole = slot;
    for (let next = (hole + 1) & this.mask; i32[next * ENTRY_INTS + E_STATE] === 1; next = (next + 1) & this.mask) {
      const home = this.homeOf(next);
      // The entry at `next` may move into the hole when its home is not cyclically in (hole, next].
      const inRange = hole <= next ? home > hole && home <= next : home > hole || home <= next;
      if (inRange) continue;
      i32.copyWithin(hole * ENTRY_INTS, next * ENTRY_INTS, (next + 1) * ENTRY_INTS);
      hole = next;
    }
    i32.fill(0, hole * ENTRY_INTS, (hole + 1) * ENTRY_INTS);
    Atomics.sub(this.header, H_SIZE, 1);
    Atomics.sub(this.header, H_LISTENERS + 2 * listener, 1);
  }

  /** Forgets every key (tests, shutdown). */
  clear(): void {
    this.locked(() => {
      this.i32.fill(0);
      this.header.fill(0, H_SWEEP);
    });
  }

  /** The `n` keys of a listener holding the most connections, most first. Reads without the lock (a display). */
  top(listener: number, n: number): Array<{ key: string; active: number }> {
    const best: Array<{ key: string; active: number }> = [];
    if (n <= 0) return best;
    const slots = this.mask + 1;
    for (let slot = 0; slot < slots; slot++) {
      const base = slot * ENTRY_INTS;
      const active = this.i32[base + E_ACTIVE]!;
      if (this.i32[base + E_STATE] !== 1 || active === 0 || this.i32[base + E_LISTENER] !== listener) continue;
      if (best.length === n && active <= best[n - 1]!.active) continue;
      const length = Math.min(this.i32[base + E_KEY_LENGTH]!, MAX_KEY_BYTES);
      const key = Buffer.from(this.buffer, HEADER_INTS * 4 + (base + E_KEY) * 4, length).toString('latin1');
      let i = best.length === n ? n - 1 : best.length;
      while (i > 0 && best[i - 1]!.active < active) {
        best[i] = best[i - 1]!;
        i--;
      }
      best[i] = { key, active };
    }
    return best;
  }

  private encode(key: string): number {
    const length = key.length;
    if (length > MAX_KEY_BYTES) throw new Error(`bug: client key longer than ${MAX_KEY_BYTES} bytes: ${key.slice(0, 60)}`);
    for (let i = 0; i < length; i++) this.keyBytes[i] = key.charCodeAt(i) & 0xff;
    return length;
  }

  /** FNV-1a over the listener and the key bytes in keyBytes. */
  private home(listener: number, length: number): number {
    let hash = (0x811c9dc5 ^ listener) >>> 0;
    hash = Math.imul(hash, 0x01000193);
    for (let i = 0; i < length; i++) hash = Math.imul(hash ^ this.keyBytes[i]!, 0x01000193);
    return (hash >>> 0) & this.mask;
  }

  private homeOf(slot: number): number {
    const base = slot * ENTRY_INTS;
    const length = this.i32[base + E_KEY_LENGTH]!;
    const bytes = new Uint8Array(this.buffer, HEADER_INTS * 4 + (base + E_KEY) * 4, length);
    let hash = (0x811c9dc5 ^ this.i32[base + E_LISTENER]!) >>> 0;
    hash = Math.imul(hash, 0x01000193);
    for (let i = 0; i < length; i++) hash = Math.imul(hash ^ bytes[i]!, 0x01000193);
    return (hash >>> 0) & this.mask;
  }

  private matches(base: number, listener: number, length: number): boolean {
    if (this.i32[base + E_LISTENER] !== listener || this.i32[base + E_KEY_LENGTH] !== length) return false;
    const bytes = new Uint8Array(this.buffer, HEADER_INTS * 4 + (base + E_KEY) * 4, length);
    for (let i = 0; i < length; i++) if (bytes[i] !== this.keyBytes[i]) return false;
    return true;
  }
}

/** Slots for `maxTrackedIps` keys: a power of two at least 1.5 times as many (probes stay short). */
function slotsFor(maxTrackedIps: number): number {
  let slots = 16;
  while (slots < maxTrackedIps * 1.5) slots *= 2;
  return slots;
}

export interface ClientTableOptions {
  /** The most keys held at once; a new key beyond it is refused (see `check`). */
  readonly maxTrackedIps: number;
  /** Milliseconds; defaults to a clock shared by every thread. */
  readonly now?: () => number;
}

/** Fair share, asked under the table's lock with the client's and the listener's current counts. */
export type FairShareCheck = (clientActive: number, distinctClients: number) => boolean;

/** One listener's view of the shared table: what admission asks. */
export class ClientTable {
  readonly #shared: SharedClientTable;
  readonly #listener: number;

  constructor(options: ClientTableOptions | { shared: SharedClientTable; listener: number }) {
    if ('shared' in options) {
      this.#shared = options.shared;
      this.#listener = options.listener;
    } else {
      this.#shared = new SharedClientTable({ maxTrackedIps: options.maxTrackedIps, now: options.now });
      this.#listener = 0;
    }
  }

  /** Keys held by this listener, active or idle. */
  get size(): number {
    return this.#shared.sizeOf(this.#listener);
  }

  /** Keys with at least one active connection: the number of clients for fair share. */
  get distinctActive(): number {
    return this.#shared.distinctActiveOf(this.#listener);
  }

  activeOf(key: string): number {
    const t = this.#shared;
    return t.locked(() => {
      const slot = t.find(this.#listener, key);
      return slot < 0 ? 0 : t.active(slot);
    });
  }

  /**
   * Whether `key` may open one more connection under `limits`. A query: it changes no count (it
   * may delete idle entries whose window has passed). A new key when the table is full (after
   * expiring what can be expired) gets 'ip_table_full': fail closed. Evicting a live entry
   * instead would let a client reset its own counts by cycling through keys, and growing would
   * let a spoofed-source flood exhaust memory. Keys already in the table keep working.
   */
  check(key: string, limits: ClientLimits): ClientVerdict {
    const t = this.#shared;
    return t.locked(() => {
      const now = t.now();
      t.tidy(now);
      return this.#verdict(t.find(this.#listener, key), limits, now);
    });
  }

  /**
   * Counts one connection of `key` (active + 1, and one start in its window if rate limiting is
   * on) without asking; tests and callers that asked `check` first in the same thread.
   */
  acquire(key: string, limits: ClientLimits): void {
    this.admit(key, limits, null);
  }

  /**
   * check + fair share + acquire as one step under the lock, so no other thread can take the
   * client's last place in between: the verdict, and the count taken only when it is 'ok'.
   */
  admit(key: string, limits: ClientLimits, fairShare: FairShareCheck | null): ClientVerdict | 'fair_share' {
    return this.#admit(key, limits, fairShare, true);
  }

  /** The same verdict as admit, taking nothing: the accept path asks it before any count is taken. */
  verdict(key: string, limits: ClientLimits, fairShare: FairShareCheck): ClientVerdict | 'fair_share' {
    return this.#admit(key, limits, fairShare, false);
  }

  #admit(key: string, limits: ClientLimits, fairShare: FairShareCheck | null, take: boolean): ClientVerdict | 'fair_share' {
    const t = this.#shared;
    return t.locked(() => {
      const now = t.now();
      t.tidy(now);
      let slot = t.find(this.#listener, key);
      if (fairShare !== null) {
        const verdict = this.#verdict(slot, limits, now);
        if (verdict !== 'ok') return verdict;
        if (fairShare(slot < 0 ? 0 : t.active(slot), t.distinctActiveOf(this.#listener))) return 'fair_share';
      }
      if (!take) return 'ok';
      if (slot < 0) slot = t.insert(this.#listener, key, now);
      if (slot < 0) return 'ip_table_full';
      const { count, perMs } = limits.connectionRatePerIp;
      t.acquire(slot, count > 0 ? perMs : 0, now);
      return 'ok';
    });
  }

  /** Ends one connection of `key`; exactly once per acquire. An unknown key is ignored. */
  release(key: string): void {
    const t = this.#shared;
    t.locked(() => {
      const slot = t.find(this.#listener, key);
      if (slot >= 0) t.release(slot, t.now());
    });
  }

  /** The `n` keys holding the most connections, most first (for the admin API). */
  top(n: number): Array<{ key: string; active: number }> {
    return this.#shared.top(this.#listener, n);
  }

  /** Runs the background sweep once now (the daemon runs it every 100 ms; tests call it). */
  sweepIdle(): void {
    this.#shared.sweepIdle();
  }

  /** Forgets every key of the whole table (tests). */
  clear(): void {
    this.#shared.clear();
  }

  /** Nothing to stop: expiry needs no timer. Kept so owners can dispose views uniformly. */
  close(): void {}

  #verdict(slot: number, limits: ClientLimits, now: number): ClientVerdict {
    const t = this.#shared;
    if (slot < 0) return t.size >= t.maxTrackedIps ? (t.sweep(SWEEP_WHEN_FULL, now), t.size >= t.maxTrackedIps ? 'ip_table_full' : 'ok') : 'ok';
    const max = limits.maxConnectionsPerIp;
    if (max > 0 && t.active(slot) >= max) return 'ip_limit';
    const { count, perMs } = limits.connectionRatePerIp;
    if (count > 0 && t.startsInWindow(slot, perMs, now) >= count) return 'ip_rate';
    return 'ok';
  }
}
