// Per-client state for admission: how many connections each client key holds now and when it
// opened its recent ones. Lives outside the compiled config so it survives reloads; the limits
// are passed to each call, so a reload changes them without touching the data.
//
// Lifecycle of an entry:
//
//   (absent) --acquire--> active --release to 0--> idle --window passes--> (absent)
//                            ^                      |
//                            +-------acquire--------+
//   An entry whose window is already empty when its last connection is released is deleted at
//   once (release to 0 -> absent). With rate limiting off there is no window, so that is always.
//
// Idle entries wait in one intrusive list in the order they became idle, and are deleted from its
// front when their window has passed: lazily on every check/acquire (one comparison when nothing
// is due) and by one unref()'d coarse timer that runs only while the list is non-empty. No timer
// per entry. The front is not always the first to expire (an entry's window ends at its last start
// + per, not when it went idle), so an entry may outlive its window, but by at most `per` (the
// front itself expires no later than its idle time + per).
//
// The rate window costs the same memory whatever `count` is (issue 13, defect 3: a ring of
// `count` start times let `count = 1000000` pin 7.7 MB per client). It is RATE_BUCKETS + 1
// counters, each covering per / RATE_BUCKETS, summed over the buckets that overlap the window
// (t - per, t]. The sum can include starts up to one bucket older than `per`, never fewer than
// the window holds, so the approximation errs one way only: a client is never admitted more
// than `count` times in any window of length `per`, and may wait up to per / RATE_BUCKETS
// longer than an exact sliding window would for its quota to come back.

import type { RateLimit } from '../config/types.ts';
import { MAX_TIMER_MS } from '../config/units.ts';

/** The limits of one listener, as in ListenerLimits. 0 = unlimited / off. */
export interface ClientLimits {
  readonly maxConnectionsPerIp: number;
  readonly connectionRatePerIp: RateLimit;
}

export type ClientVerdict = 'ok' | 'ip_limit' | 'ip_rate' | 'ip_table_full';

export interface ClientTableOptions {
  /** The most keys held at once; a new key beyond it is refused (see `check`). */
  readonly maxTrackedIps: number;
  /** Monotonic milliseconds; defaults to performance.now. */
  readonly now?: () => number;
}

/** The smallest period of the expiry timer, so a tiny `per` cannot make it spin. */
const MIN_SWEEP_MS = 250;
/** Buckets per rate window: the window is exact to within per / RATE_BUCKETS (see above). */
export const RATE_BUCKETS = 10;
const RATE_SLOTS = RATE_BUCKETS + 1;

class ClientEntry {
  active = 0;
  /**
   * Starts per bucket, a ring indexed by bucket number (floor(time / bucketMs)) modulo its length.
   * Null while rate limiting is off, so clients of unlimited listeners cost no window.
   */
  starts: number[] | null = null;
  /** Bucket number of the newest bucket the ring holds. */
  newestBucket = 0;
  /** Bucket number of the latest start: the entry expires RATE_SLOTS buckets after it. */
  lastStartBucket = 0;
  /** per / RATE_BUCKETS of the window the ring was built for. */
  bucketMs = 0;
  /** Idle-list links; `idle` says whether the entry is on the list. */
  idle = false;
  newer: ClientEntry | null = null;
  older: ClientEntry | null = null;

  constructor(readonly key: string) {}

  /** When the window holds no start any more (-Infinity without a window). */
  get expiresAt(): number {
    return this.starts === null ? -Infinity : (this.lastStartBucket + RATE_SLOTS) * this.bucketMs;
  }
}

/** Per-client connection counts and sliding-window start times, keyed by clientKey(). */
export class ClientTable {
  readonly #entries = new Map<string, ClientEntry>();
  readonly #maxTrackedIps: number;
  readonly #now: () => number;
  /** Oldest and newest idle entries. */
  #idleOldest: ClientEntry | null = null;
  #idleNewest: ClientEntry | null = null;
  #sweepTimer: ReturnType<typeof setInterval> | null = null;
  #distinctActive = 0;

  constructor(options: ClientTableOptions) {
    this.#maxTrackedIps = options.maxTrackedIps;
    this.#now = options.now ?? (() => performance.now());
  }

  /** Keys held, active or idle. */
  get size(): number {
    return this.#entries.size;
  }

  /** Keys with at least one active connection: the number of clients for fair share. */
  get distinctActive(): number {
    return this.#distinctActive;
  }

  activeOf(key: string): number {
    return this.#entries.get(key)?.active ?? 0;
  }

  /**
   * Whether `key` may open one more connection under `limits`. A query: it changes nothing but
   * may delete idle entries whose window has passed. Call `acquire` only when it said 'ok', so a
   * refused connection never consumes quota.
   *
   * A new key when the table is full (after expiring what can be expired) gets 'ip_table_full':
   * fail closed. Evicting a live entry instead would let a client reset its own counts by
   * cycling through keys, and growing would let a spoofed-source flood exhaust memory. Keys
   * already in the table keep working.
   */
  check(key: string, limits: ClientLimits): ClientVerdict {
    const now = this.#now();
    this.#expireIdle(now);
    const entry = this.#entries.get(key);
    if (entry === undefined) {
      return this.#entries.size >= this.#maxTrackedIps ? 'ip_table_full' : 'ok';
    }
    const max = limits.maxConnectionsPerIp;
    if (max > 0 && entry.active >= max) return 'ip_limit';
    const { count, perMs } = limits.connectionRatePerIp;
    if (count > 0 && entry.starts !== null && startsInWindow(entry, perMs, now) >= count) return 'ip_rate';
    return 'ok';
  }

  /**
   * Counts one connection of `key` (active + 1, and one start in its window if rate limiting is
   * on). Always succeeds: the caller asked `check` first. Pass the same limits as to `check`.
   */
  acquire(key: string, limits: ClientLimits): void {
    const now = this.#now();
    this.#expireIdle(now);
    let entry = this.#entries.get(key);
    if (entry === undefined) {
      entry = new ClientEntry(key);
      this.#entries.set(key, entry);
    } else if (entry.idle) {
      this.#unlinkIdle(entry);
    }
    if (entry.active++ === 0) this.#distinctActive++;
    const { count, perMs } = limits.connectionRatePerIp;
    if (count > 0) {
      recordStart(entry, perMs, now);
    } else if (entry.starts !== null) {
      entry.starts = null; // rate limiting turned off by a reload: forget the window
    }
  }

  /** Ends one connection of `key`; exactly once per acquire. An unknown key is ignored. */
  release(key: string): void {
    const entry = this.#entries.get(key);
    if (entry === undefined || entry.active === 0) return;
    if (--entry.active > 0) return;
    this.#distinctActive--;
    if (entry.expiresAt <= this.#now()) {
      this.#entries.delete(key);
      return;
    }
    this.#linkIdle(entry);
  }

  /** The `n` keys holding the most connections, most first (for the admin API). */
  top(n: number): Array<{ key: string; active: number }> {
    const best: ClientEntry[] = [];
    if (n <= 0) return [];
    for (const entry of this.#entries.values()) {
      if (entry.active === 0) continue;
      if (best.length === n && entry.active <= best[n - 1]!.active) continue;
      let i = best.length === n ? n - 1 : best.length;
      while (i > 0 && best[i - 1]!.active < entry.active) {
        best[i] = best[i - 1]!;
        i--;
      }
      best[i] = entry;
    }
    return best.map((entry) => ({ key: entry.key, active: entry.active }));
  }

  /** Forgets every key and stops the timer (tests, shutdown). */
  clear(): void {
    this.#entries.clear();
    this.#idleOldest = null;
    this.#idleNewest = null;
    this.#distinctActive = 0;
    this.close();
  }

  /** Stops the expiry timer; entries stay. Idempotent; a later release starts it again. */
  close(): void {
    if (this.#sweepTimer !== null) clearInterval(this.#sweepTimer);
    this.#sweepTimer = null;
  }

  #linkIdle(entry: ClientEntry): void {
    entry.idle = true;
    entry.older = this.#idleNewest;
    entry.newer = null;
    if (this.#idleNewest !== null) this.#idleNewest.newer = entry;
    else this.#idleOldest = entry;
    this.#idleNewest = entry;
    if (this.#sweepTimer === null) {
      this.#sweepTimer = setInterval(() => this.#sweep(), Math.min(MAX_TIMER_MS, Math.max(MIN_SWEEP_MS, entry.bucketMs * RATE_SLOTS)));
      this.#sweepTimer.unref();
    }
  }

  #unlinkIdle(entry: ClientEntry): void {
    if (entry.older !== null) entry.older.newer = entry.newer;
    else this.#idleOldest = entry.newer;
    if (entry.newer !== null) entry.newer.older = entry.older;
    else this.#idleNewest = entry.older;
    entry.idle = false;
    entry.newer = null;
    entry.older = null;
  }

  #expireIdle(now: number): void {
    let entry = this.#idleOldest;
    while (entry !== null && entry.expiresAt <= now) {
      const newer = entry.newer;
      this.#unlinkIdle(entry);
      this.#entries.delete(entry.key);
      entry = newer;
    }
  }

  #sweep(): void {
    this.#expireIdle(this.#now());
    if (this.#idleOldest === null) this.close();
  }
}

/**
 * Starts counted in the buckets that overlap (now - per, now]. First moves the ring to `now`
 * (emptying buckets that fell out) and, if a reload changed `per`, rebuilds it for the new
 * width with every remembered start in the newest bucket: that can only over-count, never let
 * a client past its limit.
 */
function startsInWindow(entry: ClientEntry, perMs: number, now: number): number {
  const starts = entry.starts!;
  const bucketMs = perMs / RATE_BUCKETS;
  const bucket = Math.floor(now / bucketMs);
  let total = 0;
  for (let i = 0; i < RATE_SLOTS; i++) total += starts[i]!;
  if (entry.bucketMs !== bucketMs) {
    const kept = now >= entry.expiresAt ? 0 : total;
    starts.fill(0);
    starts[bucket % RATE_SLOTS] = kept;
    entry.bucketMs = bucketMs;
    entry.newestBucket = bucket;
    entry.lastStartBucket = bucket;
    return kept;
  }
  if (bucket > entry.newestBucket) {
    const stale = Math.min(bucket - entry.newestBucket, RATE_SLOTS);
    for (let i = 1; i <= stale; i++) {
      const slot = (entry.newestBucket + i) % RATE_SLOTS;
      total -= starts[slot]!;
      starts[slot] = 0;
    }
    entry.newestBucket = bucket;
  }
  return total;
}

/** Counts one start at `now` in the entry's window of length `perMs`, creating it if needed. */
function recordStart(entry: ClientEntry, perMs: number, now: number): void {
  if (entry.starts === null) {
    entry.starts = new Array<number>(RATE_SLOTS).fill(0);
    entry.bucketMs = perMs / RATE_BUCKETS;
    entry.newestBucket = Math.floor(now / entry.bucketMs);
    entry.lastStartBucket = entry.newestBucket;
  }
  startsInWindow(entry, perMs, now);
  const slot = entry.newestBucket % RATE_SLOTS;
  entry.starts[slot] = entry.starts[slot]! + 1;
  entry.lastStartBucket = entry.newestBucket;
}
