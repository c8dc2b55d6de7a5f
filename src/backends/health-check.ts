// Active health checks: one check against one backend (runCheck), and the scheduler that runs a
// check per watched key on a jittered interval and turns results into up/down (HealthChecker).
//
// A check is one short connection owned by one Probe. Every socket event and the deadline end in
// the Probe's succeed() or fail(), which report exactly once. After a success the connection is
// ended (a FIN, never an RST: whatever the peer still sends is read and dropped) and destroyed at
// the latest timeoutMs later; after a failure it is destroyed at once.
import net from 'node:net';
import tls from 'node:tls';
import { MAX_TIMER_MS } from '../config/units.ts';

export type CheckType = 'tcp' | 'send_expect' | 'tls';

export interface CheckDefinition {
  readonly type: CheckType;
  /** Between the end of one check and the start of the next, ± jitter. */
  readonly intervalMs: number;
  /** The whole check: connect + (handshake) + send + expect. */
  readonly timeoutMs: number;
  /** Consecutive successes to go down -> up. */
  readonly rise: number;
  /** Consecutive failures to go up -> down. */
  readonly fall: number;
  /** 0-100: each interval is randomised by ±jitterPct %; the first check starts after a random delay in [0, interval). */
  readonly jitterPct: number;
  /** Bytes written after connect (send_expect; null: only read). */
  readonly send: Buffer | null;
  readonly expect: { readonly kind: 'prefix'; readonly bytes: Buffer } | { readonly kind: 'regex'; readonly regex: RegExp } | null;
  /** SNI for type tls (null: none sent). */
  readonly tlsServerName: string | null;
  /** Verify the certificate (default false in config). */
  readonly tlsVerify: boolean;
  /** Written first on connect (a PROXY v2 LOCAL header when the route sends PROXY), before `send` / the ClientHello. */
  readonly proxyHeader: Buffer | null;
}

/** A backend address; host is an IP literal. */
export interface CheckTarget {
  readonly host: string;
  readonly port: number;
}

/**
 * A failed check's reason is one of these or the code of the socket / TLS error (ECONNREFUSED,
 * ECONNRESET, DEPTH_ZERO_SELF_SIGNED_CERT, ERR_SSL_...).
 */
export const CHECK_REASONS = {
  timeout: 'timeout', // the whole check did not finish within timeoutMs
  unexpectedReply: 'unexpected reply', // send_expect: a prefix mismatch, or the peer ended / sent 4 KB without a match
  closed: 'closed', // the peer's connection closed before success without any error (should not happen; a fallback)
  error: 'error', // a socket error without a code
} as const;

export type CheckResult = { readonly ok: true; readonly ms: number } | { readonly ok: false; readonly ms: number; readonly reason: string };

/** send_expect reads at most this much looking for its expectation. */
const MAX_REPLY_BYTES = 4096;

/** Runs one check; never rejects, never throws. */
export function runCheck(target: CheckTarget, def: CheckDefinition): Promise<CheckResult> {
  return new Promise((resolve) => {
    new Probe(target, def, resolve, () => {});
  });
}

/*
 * A probe:  running --(success | failure | timeout | cancel)--> settled --(socket closed)--> released
 * It reports once, when it leaves `running` (not when cancelled). Settled by a success, its socket
 * has been ended and lingers until the peer closes or timeoutMs passes; otherwise it was destroyed.
 * onReleased fires once, when the socket has closed (at once if none could be created).
 */
class Probe {
  private state: 'running' | 'settled' | 'released' = 'running';
  private readonly started = performance.now();
  private raw: net.Socket | null = null;
  private secure: tls.TLSSocket | null = null;
  private received: Buffer = Buffer.alloc(0);
  /** The check's deadline while running; the linger bound after success. One timer at a time. */
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly target: CheckTarget,
    private readonly def: CheckDefinition,
    private readonly report: (result: CheckResult) => void,
    private readonly onReleased: () => void,
  ) {
    let raw: net.Socket;
    try {
      raw = net.connect({ host: target.host, port: target.port });
    } catch (err) {
      // A bad port or host throws synchronously (ERR_SOCKET_BAD_PORT...): a failed check, not a
      // crash, reported on the next tick like every other result.
      process.nextTick(() => this.fail(codeOf(err)));
      return;
    }
    this.raw = raw;
    raw.on('error', (err) => this.fail(codeOf(err)));
    raw.on('close', () => this.release());
    raw.once('connect', () => this.onConnect());
    this.timer = setTimeout(() => this.fail(CHECK_REASONS.timeout), def.timeoutMs);
  }

  /** Stops the check now without reporting; the socket is destroyed. Idempotent. */
  cancel(): void {
    if (this.state === 'running') this.state = 'settled'; // so no report follows
    this.destroy();
  }

  private onConnect(): void {
    const raw = this.raw!;
    if (this.state !== 'running') return;
    if (this.def.proxyHeader !== null) raw.write(this.def.proxyHeader);
    switch (this.def.type) {
      case 'tcp':
        this.succeed();
        return;
      case 'send_expect':
        if (this.def.send !== null) raw.write(this.def.send);
        if (this.def.expect === null) {
          this.succeed();
          return;
        }
        raw.on('data', (chunk: Buffer) => this.onData(chunk));
        raw.on('end', () => this.fail(CHECK_REASONS.unexpectedReply));
        return;
      case 'tls': {
        // The PROXY header went out raw above; libuv keeps the order of writes on one handle, so the
        // ClientHello follows it.
        const secure = tls.connect({
          socket: raw,
          host: this.target.host, // the identity checked when verifying without a server name
          servername: this.def.tlsServerName ?? undefined,
          rejectUnauthorized: this.def.tlsVerify,
        });
        this.secure = secure;
        secure.on('error', (err) => this.fail(codeOf(err)));
        secure.once('secureConnect', () => this.succeed());
        return;
      }
    }
  }

  private onData(chunk: Buffer): void {
    if (this.state !== 'running') return; // after a success: drained and dropped
    const room = MAX_REPLY_BYTES - this.received.length;
    this.received = Buffer.concat([this.received, chunk.length > room ? chunk.subarray(0, room) : chunk]);
    const verdict = judge(this.def.expect!, this.received);
    if (verdict === 'match') this.succeed();
    else if (verdict === 'mismatch' || this.received.length >= MAX_REPLY_BYTES) this.fail(CHECK_REASONS.unexpectedReply);
  }

  private succeed(): void {
    if (this.state !== 'running') return;
    this.state = 'settled';
    this.clearTimer();
    const socket = this.secure ?? this.raw!;
    // Read and drop whatever still comes: closing with unread bytes would make the kernel send an RST.
    socket.resume();
    socket.end();
    // A peer that never closes its side costs us nothing past this.
    this.timer = setTimeout(() => this.destroy(), this.def.timeoutMs).unref();
    this.report({ ok: true, ms: this.elapsed() });
  }

  private fail(reason: string): void {
    if (this.state !== 'running') return; // errors after a success or a cancel are the peer's business
    this.state = 'settled';
    this.destroy();
    this.report({ ok: false, ms: this.elapsed(), reason });
  }

  private destroy(): void {
    this.clearTimer();
    this.secure?.destroy();
    if (this.raw !== null) this.raw.destroy();
    else this.release(); // no socket was ever created: nothing will close
  }

  private release(): void {
    if (this.state === 'released') return;
    if (this.state === 'running') {
      // Closed without an error event first (a fallback: net and tls emit one).
      this.state = 'settled';
      this.report({ ok: false, ms: this.elapsed(), reason: CHECK_REASONS.closed });
    }
    this.state = 'released';
    this.clearTimer();
    this.onReleased();
  }

  private clearTimer(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }

  private elapsed(): number {
    return performance.now() - this.started;
  }
}

/** send_expect's pure decision on the bytes received so far. */
function judge(expect: NonNullable<CheckDefinition['expect']>, received: Buffer): 'match' | 'mismatch' | 'need_more' {
  if (expect.kind === 'prefix') {
    const n = Math.min(received.length, expect.bytes.length);
    if (!received.subarray(0, n).equals(expect.bytes.subarray(0, n))) return 'mismatch';
    return n === expect.bytes.length ? 'match' : 'need_more';
  }
  // search() always starts at 0 and ignores lastIndex, so a /g or /y regex shared by checks is safe.
  return received.toString('latin1').search(expect.regex) !== -1 ? 'match' : 'need_more';
}

function codeOf(err: unknown): string {
  const code = (err as NodeJS.ErrnoException | null)?.code;
  return typeof code === 'string' && code.length > 0 ? code : CHECK_REASONS.error;
}

// ---- the scheduler ----

export interface HealthCheckerOptions {
  /** Every check's result. */
  readonly onResult: (key: string, result: CheckResult) => void;
  /** Only on an up <-> down transition (after `rise` / `fall`); `streak` is the run that caused it. */
  readonly onChange: (key: string, up: boolean, result: CheckResult, streak: number) => void;
  /** In [0, 1); injectable for tests. */
  readonly random?: () => number;
}

export interface HealthState {
  readonly up: boolean;
  readonly last: CheckResult | null;
  /** Date.now() of the last transition, or of when the key started being watched. */
  readonly since: number;
}

/*
 * A watched key's health:   up --(fall consecutive failures)--> down --(rise consecutive successes)--> up
 * (starts up; `streak` counts the consecutive results against the current state).
 * Its schedule:             waiting --(timer)--> checking --(result)--> waiting ...
 * and `stopped` from either, final (removed by update() or close()).
 */
class Watch {
  up = true;
  streak = 0;
  last: CheckResult | null = null;
  since = Date.now();
  stopped = false;
  /** The wait before the next check; null while the check is in flight (one at most: the next is scheduled when it settles). */
  timer: NodeJS.Timeout | null = null;
  /** Every probe whose socket is still open: the one in flight, and those lingering after a success. */
  readonly open = new Set<Probe>();

  constructor(
    readonly key: string,
    readonly target: CheckTarget,
    readonly def: CheckDefinition,
  ) {}
}

/** Schedules checks for a set of keyed targets; at most one check in flight per key. */
export class HealthChecker {
  private readonly watches = new Map<string, Watch>();
  private readonly random: () => number;
  private closed = false;

  constructor(private readonly opts: HealthCheckerOptions) {
    this.random = opts.random ?? Math.random;
  }

  /**
   * Replaces the watched set. A key kept with an identical definition and target keeps its state
   * and schedule; a new key, or one whose target or definition changed, starts up with streak 0;
   * removed keys stop (an in-flight check's result is dropped). A key given twice: the last wins.
   * `initialUp: false` starts a new key down (a backend already known down whose check definition
   * changed must not come back up by a reload). Ignored after close().
   */
  update(entries: ReadonlyArray<{ key: string; target: CheckTarget; def: CheckDefinition; initialUp?: boolean }>): void {
    if (this.closed) return;
    const wanted = new Map<string, { key: string; target: CheckTarget; def: CheckDefinition; initialUp?: boolean }>();
    for (const entry of entries) wanted.set(entry.key, entry);
    for (const [key, watch] of this.watches) {
      const entry = wanted.get(key);
      if (entry === undefined || !sameTarget(entry.target, watch.target) || !sameDefinition(entry.def, watch.def)) {
        this.stop(watch);
        this.watches.delete(key);
      }
    }
    for (const entry of wanted.values()) {
      if (this.watches.has(entry.key)) continue;
      const watch = new Watch(entry.key, entry.target, entry.def);
      watch.up = entry.initialUp ?? true;
      this.watches.set(entry.key, watch);
      // Spread first checks over one interval so targets added together do not run in lockstep.
      this.schedule(watch, this.random() * entry.def.intervalMs);
    }
  }

  state(key: string): HealthState | undefined {
    const watch = this.watches.get(key);
    return watch === undefined ? undefined : { up: watch.up, last: watch.last, since: watch.since };
  }

  /** Stops every timer and in-flight check (sockets destroyed); idempotent. */
  close(): void {
    this.closed = true;
    for (const watch of this.watches.values()) this.stop(watch);
    this.watches.clear();
  }

  private schedule(watch: Watch, delayMs: number): void {
    // Unref'd: the daemon's listeners keep the loop alive; checks alone must not.
    watch.timer = setTimeout(() => this.check(watch), delayMs).unref();
  }

  private check(watch: Watch): void {
    watch.timer = null;
    const probe: Probe = new Probe(
      watch.target,
      watch.def,
      (result) => this.settle(watch, result),
      () => watch.open.delete(probe),
    );
    watch.open.add(probe);
  }

  private settle(watch: Watch, result: CheckResult): void {
    // (A stopped watch never gets here: stop() cancels its probes, and a cancelled probe does not report.)
    watch.last = result;
    let changed = false;
    let streak = 0;
    if (result.ok !== watch.up) {
      watch.streak++;
      if (watch.streak >= Math.max(1, watch.up ? watch.def.fall : watch.def.rise)) {
        streak = watch.streak;
        watch.up = result.ok;
        watch.streak = 0;
        watch.since = Date.now();
        changed = true;
      }
    } else {
      watch.streak = 0;
    }
    // Scheduled before the callbacks, so that one which throws or calls update() / close() leaves
    // a consistent state; a key that onResult removed gets no onChange.
    this.schedule(watch, nextDelay(watch.def, this.random));
    this.opts.onResult(watch.key, result);
    if (changed && !watch.stopped) this.opts.onChange(watch.key, watch.up, result, streak);
  }

  private stop(watch: Watch): void {
    watch.stopped = true;
    if (watch.timer !== null) clearTimeout(watch.timer);
    watch.timer = null;
    for (const probe of watch.open) probe.cancel();
    watch.open.clear();
  }
}

/** interval ± jitterPct %, never negative, never past setTimeout's limit (Node would make it 1 ms). */
function nextDelay(def: CheckDefinition, random: () => number): number {
  const spread = Math.min(100, Math.max(0, def.jitterPct)) / 100;
  return Math.min(MAX_TIMER_MS, Math.max(0, def.intervalMs * (1 + spread * (2 * random() - 1))));
}

function sameTarget(a: CheckTarget, b: CheckTarget): boolean {
  return a.host === b.host && a.port === b.port;
}

function sameBytes(a: Buffer | null, b: Buffer | null): boolean {
  return a === null || b === null ? a === b : a.equals(b);
}

/** Field by field: definitions are rebuilt on every reload, so identity says nothing. */
function sameDefinition(a: CheckDefinition, b: CheckDefinition): boolean {
  if (a === b) return true;
  return (
    a.type === b.type &&
    a.intervalMs === b.intervalMs &&
    a.timeoutMs === b.timeoutMs &&
    a.rise === b.rise &&
    a.fall === b.fall &&
    a.jitterPct === b.jitterPct &&
    sameBytes(a.send, b.send) &&
    sameExpect(a.expect, b.expect) &&
    a.tlsServerName === b.tlsServerName &&
    a.tlsVerify === b.tlsVerify &&
    sameBytes(a.proxyHeader, b.proxyHeader)
  );
}

function sameExpect(a: CheckDefinition['expect'], b: CheckDefinition['expect']): boolean {
  if (a === null || b === null) return a === b;
  if (a.kind === 'prefix' && b.kind === 'prefix') return a.bytes.equals(b.bytes);
  if (a.kind === 'regex' && b.kind === 'regex') return a.regex.source === b.regex.source && a.regex.flags === b.regex.flags;
  return false;
}
