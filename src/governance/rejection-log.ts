// Rejection logging that cannot become the flood: a rejection is counted, not logged, except the
// first of each (reason, client) pair in an interval (at most MAX_FIRST_SIGHTINGS lines), and one
// summary line per interval says what the counts were:
//   rejected 48,213 connections in 10s: ip_limit 48,000 (top 127.0.0.2 x48,000), queue_full 213
// Memory is bounded too: at most `maxTrackedAddresses` (reason, client) pairs per interval; the
// rest are counted under their reason only.
//
// The interval timer (one, unref()'d) starts on the first record and stops after an interval
// with nothing in it, so a quiet listener has no timer.

import { REJECT_REASONS, type RejectReason } from '../connection/reasons.ts';

export type RejectionLogSink = (level: 'info' | 'warn', obj: object, msg: string) => void;

export interface RejectionLogOptions {
  /** Listener name, put in every line. */
  readonly listener: string;
  readonly intervalMs: number;
  readonly log: RejectionLogSink;
  /** Milliseconds; defaults to performance.now. Only used to say how long an interval was. */
  readonly now?: () => number;
  /** Individual lines per interval; default 10. */
  readonly maxFirstSightings?: number;
  /** (reason, client) pairs counted individually per interval; default 10,000. */
  readonly maxTrackedAddresses?: number;
}

/** Top offenders shown per reason in the summary. */
const TOP_PER_REASON = 3;

class ReasonTally {
  count = 0;
  readonly byClient = new Map<string, number>();
}

export class RejectionLog {
  readonly #listener: string;
  readonly #intervalMs: number;
  readonly #log: RejectionLogSink;
  readonly #now: () => number;
  readonly #maxFirstSightings: number;
  readonly #maxTrackedAddresses: number;
  readonly #totals: Record<RejectReason, number>;

  // The current interval.
  #tallies = new Map<RejectReason, ReasonTally>();
  #count = 0;
  #logged = 0;
  #trackedAddresses = 0;
  #intervalStart = 0;
  #timer: ReturnType<typeof setInterval> | null = null;

  constructor(options: RejectionLogOptions) {
    this.#listener = options.listener;
    this.#intervalMs = options.intervalMs;
    this.#log = options.log;
    this.#now = options.now ?? (() => performance.now());
    this.#maxFirstSightings = options.maxFirstSightings ?? 10;
    this.#maxTrackedAddresses = options.maxTrackedAddresses ?? 10_000;
    this.#totals = Object.fromEntries(REJECT_REASONS.map((reason) => [reason, 0])) as Record<RejectReason, number>;
  }

  /** Counts one rejection; logs it only if it is the first of its kind this interval. */
  record(reason: RejectReason, clientAddress: string): void {
    this.#totals[reason]++;
    if (this.#timer === null) {
      this.#intervalStart = this.#now();
      this.#timer = setInterval(() => this.flush(), this.#intervalMs);
      this.#timer.unref();
    }
    this.#count++;
    let tally = this.#tallies.get(reason);
    if (tally === undefined) {
      tally = new ReasonTally();
      this.#tallies.set(reason, tally);
    }
    tally.count++;
    const seen = tally.byClient.get(clientAddress);
    if (seen !== undefined) {
      tally.byClient.set(clientAddress, seen + 1);
      return;
    }
    if (this.#trackedAddresses >= this.#maxTrackedAddresses) return; // counted in tally.count only
    tally.byClient.set(clientAddress, 1);
    this.#trackedAddresses++;
    if (this.#logged < this.#maxFirstSightings) {
      this.#logged++;
      this.#log('info', { listener: this.#listener, reason, client: clientAddress }, `rejected connection: ${reason}`);
    }
  }

  /**
   * Ends the interval: logs the summary (unless every rejection in it was already logged on its
   * own line) and starts counting afresh. An interval with nothing in it stops the timer.
   */
  flush(): void {
    if (this.#count === 0) {
      this.#stopTimer();
      return;
    }
    const now = this.#now();
    if (this.#count > this.#logged) this.#logSummary(now - this.#intervalStart);
    this.#tallies = new Map();
    this.#count = 0;
    this.#logged = 0;
    this.#trackedAddresses = 0;
    this.#intervalStart = now;
  }

  /** Rejections since construction by reason, every reason present (for metrics). */
  totals(): Record<RejectReason, number> {
    return { ...this.#totals };
  }

  /** Logs what is pending and stops the timer. Idempotent; a later record starts it again. */
  close(): void {
    this.flush();
    this.#stopTimer();
  }

  #stopTimer(): void {
    if (this.#timer !== null) clearInterval(this.#timer);
    this.#timer = null;
  }

  #logSummary(elapsedMs: number): void {
    const tallies = [...this.#tallies].sort((a, b) => b[1].count - a[1].count);
    const reasons: Record<string, number> = {};
    const top: Record<string, Array<{ client: string; count: number }>> = {};
    const parts: string[] = [];
    for (const [reason, tally] of tallies) {
      reasons[reason] = tally.count;
      const offenders = topOffenders(tally.byClient);
      let part = `${reason} ${withThousands(tally.count)}`;
      if (offenders.length > 0) {
        top[reason] = offenders;
        part += ` (top ${offenders.map((o) => `${o.client} x${withThousands(o.count)}`).join(', ')})`;
      }
      parts.push(part);
    }
    const noun = this.#count === 1 ? 'connection' : 'connections';
    this.#log(
      'warn',
      { listener: this.#listener, rejected: this.#count, intervalMs: Math.round(elapsedMs), reasons, top },
      `rejected ${withThousands(this.#count)} ${noun} in ${formatDuration(elapsedMs)}: ${parts.join(', ')}`,
    );
  }
}

/**
 * The clients rejected most, most first, at most TOP_PER_REASON. Clients rejected once are left
 * out: they are not offenders, and the first sightings already named some of them.
 */
function topOffenders(byClient: Map<string, number>): Array<{ client: string; count: number }> {
  const best: Array<{ client: string; count: number }> = [];
  for (const [client, count] of byClient) {
    if (count < 2) continue;
    if (best.length === TOP_PER_REASON && count <= best[TOP_PER_REASON - 1]!.count) continue;
    let i = best.length === TOP_PER_REASON ? TOP_PER_REASON - 1 : best.length;
    while (i > 0 && best[i - 1]!.count < count) {
      best[i] = best[i - 1]!;
      i--;
    }
    best[i] = { client, count };
  }
  return best;
}

/** 48213 -> "48,213" (fixed format, whatever the process locale). */
export function withThousands(n: number): string {
  const digits = String(Math.trunc(n));
  let text = '';
  for (let i = 0; i < digits.length; i++) {
    if (i > 0 && (digits.length - i) % 3 === 0) text += ',';
    text += digits[i];
  }
  return text;
}

/** 850 -> "850ms", 10003 -> "10s", 2500 -> "2.5s". */
function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  const tenths = Math.round(ms / 100);
  return tenths % 10 === 0 ? `${tenths / 10}s` : `${(tenths / 10).toFixed(1)}s`;
}
