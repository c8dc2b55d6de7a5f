// The state of every backend, shared by every event-loop thread: connections open to it, whether
// active checks find it up, the operator's runtime state, and passive ejection (consecutive connect
// failures, ejections in a row, until when it is out). One SharedArrayBuffer changed only with
// Atomics, like the connection counts (governance/shared-counts.ts), so least_conn, a backend's
// max_connections and an ejection are the same numbers in every thread.
//
// A backend here is one address of one route (`listener/route/ip:port`): the same server in two
// routes has two entries, so one route's failures never eject it from another. Its index is
// assigned by whoever owns the config (CountIndexes.backends) and kept for the life of the process;
// a backend that leaves the config and comes back starts afresh (reset()).
//
// After an ejection's cooldown a backend is on probation until a connect to it succeeds: one
// connection at a time is dialled to it (the probe), so a backend still black-holing SYNs costs
// one client the connect timeout, not every client routed to it meanwhile. The probe is a lease
// that expires by itself (a probe whose client left before the outcome frees it at expiry).

/** Most backend entries over the life of the process (each costs 56 bytes). */
export const MAX_BACKENDS = 16_384;

// Int32 fields per backend.
const FIELDS = 8;
const ACTIVE = 0;
/** 1 while active checks find it down. */
const CHECK_DOWN = 1;
/** AdminState as a number. */
const ADMIN = 2;
/** Connect failures since its last successful connect. */
const FAILS = 3;
/** Passive ejections since its last successful connect: the cooldown grows with it (> 0 after the cooldown: on probation). */
const EJECTIONS = 4;
/**
 * 1 once it has been passively ejected (since it entered the config): only then is EJECTED_UNTIL
 * worth reading. Set before EJECTED_UNTIL and never cleared by a reader, so no thread can miss an
 * ejection another thread is making.
 */
const EJECTED = 5;

export type AdminState = 'ready' | 'drain' | 'maintenance';
const ADMIN_STATES: readonly AdminState[] = ['ready', 'drain', 'maintenance'];

/** What a thread needs to know to pick, and the numbers /stats shows. */
export interface BackendSnapshot {
  readonly active: number;
  readonly checkDown: boolean;
  readonly admin: AdminState;
  readonly failures: number;
  readonly ejections: number;
  /** Date.now() until which it is ejected; 0 = not ejected. */
  readonly ejectedUntil: number;
  /** Its cooldown is over and no connect has succeeded since: one connection at a time. */
  readonly probation: boolean;
}

/** The least share of its weight a backend in slow start takes. */
const MIN_WARM_SHARE = 0.1;

export class SharedBackendStates {
  readonly buffer: SharedArrayBuffer;
  private readonly i32: Int32Array;
  /** EJECTED_UNTIL per backend, in ms since the epoch (BigInt64, so Atomics apply and it never wraps). */
  private readonly until: BigInt64Array;
  /** PROBE_UNTIL per backend: while on probation, the probe in flight holds it until then. */
  private readonly probeUntil: BigInt64Array;
  /** WARM_SINCE per backend: when it last came (back) into rotation, for slow_start. */
  private readonly warmSince: BigInt64Array;

  constructor(buffer: SharedArrayBuffer = new SharedArrayBuffer(MAX_BACKENDS * (FIELDS * 4 + 24))) {
    this.buffer = buffer;
    this.i32 = new Int32Array(buffer, 0, MAX_BACKENDS * FIELDS);
    this.until = new BigInt64Array(buffer, MAX_BACKENDS * FIELDS * 4, MAX_BACKENDS);
    this.probeUntil = new BigInt64Array(buffer, MAX_BACKENDS * (FIELDS * 4 + 8), MAX_BACKENDS);
    this.warmSince = new BigInt64Array(buffer, MAX_BACKENDS * (FIELDS * 4 + 16), MAX_BACKENDS);
  }

  // ---- slow start ----

  /** It came (back) into rotation now: checks up again, an ejection over, ready again. */
  startWarming(index: number, now: number): void {
    Atomics.store(this.warmSince, index, BigInt(now));
  }

  /**
   * The share of its weight it takes `now` with a slow start of `windowMs`: from 10 % (as Envoy's
   * min_weight_percent, so it still gets a first connection) to 100 % linearly over the window.
   */
  warmShare(index: number, now: number, windowMs: number): number {
    const elapsed = now - Number(Atomics.load(this.warmSince, index));
    return elapsed >= windowMs ? 1 : Math.max(MIN_WARM_SHARE, elapsed / windowMs);
  }

  /** Date.now() at which its slow start of `windowMs` ends; 0 when it is over. */
  warmUntil(index: number, now: number, windowMs: number): number {
    const end = Number(Atomics.load(this.warmSince, index)) + windowMs;
    return end > now ? end : 0;
  }

  // ---- connections (a lease the connection holds from its dial until its close) ----

  active(index: number): number {
    return Atomics.load(this.i32, index * FIELDS + ACTIVE);
  }

  /** Takes one of the backend's `max` connections (0 = unlimited, always counted). */
  take(index: number, max: number): boolean {
    const at = index * FIELDS + ACTIVE;
    if (max <= 0) {
      Atomics.add(this.i32, at, 1);
      return true;
    }
    for (;;) {
      const current = Atomics.load(this.i32, at);
      if (current >= max) return false;
      if (Atomics.compareExchange(this.i32, at, current, current + 1) === current) return true;
    }
  }

  release(index: number): void {
    Atomics.sub(this.i32, index * FIELDS + ACTIVE, 1);
  }

  // ---- up or down ----

  /**
   * True when a new connection may go to it by health: checks find it up, it is not ejected, and
   * on probation no probe is in flight (the one who picks it must still win claimProbe).
   */
  isUp(index: number, now: number): boolean {
    const base = index * FIELDS;
    if (Atomics.load(this.i32, base + CHECK_DOWN) === 1) return false;
    if (Atomics.load(this.i32, base + EJECTED) === 0) return true;
    if (this.stillEjected(index, now)) return false;
    return Atomics.load(this.i32, base + EJECTIONS) === 0 || Number(Atomics.load(this.probeUntil, index)) <= now;
  }

  /**
   * True when checks find it up and it is not in an ejection's cooldown (smartproxy_backend_up).
   * On probation it counts as up: it may stay there long without traffic (a backup while the
   * primaries are up, a drained backend), and it is in rotation, one connection at a time.
   */
  isHealthy(index: number, now: number): boolean {
    return Atomics.load(this.i32, index * FIELDS + CHECK_DOWN) === 0 && !this.isEjected(index, now);
  }

  /** On probation with its probe out (and not checked down): the nearest thing to up there is. */
  probeOut(index: number, now: number): boolean {
    return Atomics.load(this.i32, index * FIELDS + CHECK_DOWN) === 0 && this.onProbation(index, now) && Number(Atomics.load(this.probeUntil, index)) > now;
  }

  /** True when its cooldown is over and no connect has succeeded since. */
  onProbation(index: number, now: number): boolean {
    const base = index * FIELDS;
    return Atomics.load(this.i32, base + EJECTED) === 1 && Atomics.load(this.i32, base + EJECTIONS) > 0 && !this.stillEjected(index, now);
  }

  /**
   * Takes the probe of a backend on probation for `windowMs` (a dial's longest time): true for one
   * caller, whichever thread it runs in, until the probe's outcome or the window's end.
   */
  claimProbe(index: number, now: number, windowMs: number): boolean {
    const held = Atomics.load(this.probeUntil, index);
    if (Number(held) > now) return false;
    return Atomics.compareExchange(this.probeUntil, index, held, BigInt(now + windowMs)) === held;
  }

  /** The probe was claimed and not dialled (the backend was at its cap): another may take it. */
  dropProbe(index: number): void {
    Atomics.store(this.probeUntil, index, 0n);
  }

  /** EJECTED_UNTIL is the one truth: after it, the backend takes connections again. */
  private stillEjected(index: number, now: number): boolean {
    return Number(Atomics.load(this.until, index)) > now;
  }

  setCheckDown(index: number, down: boolean): void {
    Atomics.store(this.i32, index * FIELDS + CHECK_DOWN, down ? 1 : 0);
  }

  admin(index: number): AdminState {
    return ADMIN_STATES[Atomics.load(this.i32, index * FIELDS + ADMIN)]!;
  }

  /** True when the operator lets new connections go to it (runtime state "ready"). */
  isReady(index: number): boolean {
    return Atomics.load(this.i32, index * FIELDS + ADMIN) === 0;
  }

  setAdmin(index: number, state: AdminState): void {
    Atomics.store(this.i32, index * FIELDS + ADMIN, ADMIN_STATES.indexOf(state));
  }

  // ---- passive ejection ----

  /**
   * A connect succeeded: the failure streak and the ejection history end. True when this ended an
   * ejection history (the backend is back: one log line, from the thread that saw it first; its
   * slow start begins `now`, as after uneject()).
   */
  connected(index: number, now: number): boolean {
    const base = index * FIELDS;
    // Read first: a healthy backend's fields stay untouched, so threads do not fight over the line.
    if (Atomics.load(this.i32, base + FAILS) !== 0) Atomics.store(this.i32, base + FAILS, 0);
    if (Atomics.load(this.i32, base + EJECTIONS) === 0) return false;
    if (Atomics.exchange(this.i32, base + EJECTIONS, 0) === 0) return false;
    // A connect during the cooldown (panic, or a dial from before the ejection) ends it too.
    Atomics.store(this.until, index, 0n);
    Atomics.store(this.probeUntil, index, 0n);
    this.startWarming(index, now);
    return true;
  }

  /**
   * A connect failed. Returns the cooldown in ms when this failure ejects the backend (the
   * caller has checked the route's max_share with `mayEject`), else 0. A backend back from an
   * ejection without a success since is ejected again by its first failure, for longer.
   */
  connectFailed(index: number, now: number, policy: { consecutiveFailures: number; baseTimeMs: number; maxTimeMs: number }, mayEject: () => boolean): number {
    if (policy.consecutiveFailures <= 0) return 0;
    const base = index * FIELDS;
    const fails = Atomics.add(this.i32, base + FAILS, 1) + 1;
    const ejections = Atomics.load(this.i32, base + EJECTIONS);
    if (fails < policy.consecutiveFailures && ejections === 0) return 0;
    const until = Atomics.load(this.until, index);
    if (Number(until) > now) return 0; // already out
    // A backend that failed again after an ejection (a failed probe) is ejected whatever the share:
    // left on probation it would take the route's connections one timeout after another.
    if (ejections === 0 && !mayEject()) return 0;
    Atomics.store(this.i32, base + EJECTED, 1); // before UNTIL: a reader that sees UNTIL sees the hint
    const cooldown = Math.min(policy.baseTimeMs * (ejections + 1), policy.maxTimeMs);
    // One thread ejects: the one whose compare-and-swap moves UNTIL from the value it read.
    if (Atomics.compareExchange(this.until, index, until, BigInt(now + cooldown)) !== until) return 0;
    Atomics.add(this.i32, base + EJECTIONS, 1);
    Atomics.store(this.i32, base + FAILS, 0);
    Atomics.store(this.probeUntil, index, 0n); // the failed probe's lease: the next probe may start when this cooldown ends
    return cooldown;
  }

  /**
   * Ends a passive ejection at once, cooldown, probation and history: an active check found the
   * backend up (Envoy unejects on a passing check too). True when it was ejected or on probation.
   */
  uneject(index: number, now: number): boolean {
    if (!this.isEjected(index, now) && !this.onProbation(index, now)) return false;
    const base = index * FIELDS;
    // UNTIL first: a thread ejecting it at this instant loses its compare-and-swap or is undone here.
    Atomics.store(this.until, index, 0n);
    Atomics.store(this.i32, base + EJECTIONS, 0);
    Atomics.store(this.i32, base + FAILS, 0);
    Atomics.store(this.probeUntil, index, 0n);
    this.startWarming(index, now);
    return true;
  }

  /**
   * True while it is in an ejection's cooldown (what max_share counts). Not on probation after it:
   * a backend nobody dials (a backup while the primaries are up, a drained one) may stay on
   * probation for good, and counted it would turn passive ejection off for the rest of its route.
   */
  isEjected(index: number, now: number): boolean {
    return Atomics.load(this.i32, index * FIELDS + EJECTED) === 1 && this.stillEjected(index, now);
  }

  snapshot(index: number, now: number): BackendSnapshot {
    const base = index * FIELDS;
    const ejected = this.isEjected(index, now);
    return {
      active: Atomics.load(this.i32, base + ACTIVE),
      checkDown: Atomics.load(this.i32, base + CHECK_DOWN) === 1,
      admin: this.admin(index),
      failures: Atomics.load(this.i32, base + FAILS),
      ejections: Atomics.load(this.i32, base + EJECTIONS),
      ejectedUntil: ejected ? Number(Atomics.load(this.until, index)) : 0,
      probation: this.onProbation(index, now),
    };
  }

  /**
   * A backend (re)entering the config: up, ready, no failures, in slow start since `warmSince`
   * (0: none, as for the backends of the config the process starts with, as HAProxy's slowstart
   * never applies at start). Its active count is left alone: connections of an earlier generation
   * may still hold it, and they give it back when they close.
   */
  reset(index: number, warmSince = 0): void {
    const base = index * FIELDS;
    for (const field of [CHECK_DOWN, ADMIN, FAILS, EJECTIONS, EJECTED]) Atomics.store(this.i32, base + field, 0);
    Atomics.store(this.until, index, 0n);
    Atomics.store(this.probeUntil, index, 0n);
    Atomics.store(this.warmSince, index, BigInt(warmSince));
  }
}
