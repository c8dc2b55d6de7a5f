// Hands freed worker slots to queued connections: this thread's listeners through one loop, and
// the other threads' by waking them. `[limits] max_connections` (the global pool) and each
// listener's `workers` are counts in shared memory (governance/shared-counts.ts); when the global
// pool is exhausted a listener treats its own workers as busy, so new connections queue (and
// time out) as usual.
import type { SharedCounts } from '../governance/shared-counts.ts';

/** Something that can hand a freed slot to the oldest connection it has queued. */
export interface SlotWaiter {
  /** Starts its oldest queued connection if it can; true when it took a slot (even if that
   * connection was then refused and gave the slot back). */
  promoteOne(): boolean;
  /** True when a connection queued in another thread could take a free slot now. */
  othersWaiting(): boolean;
}

export class SlotPool {
  private readonly waiters = new Set<SlotWaiter>();
  /** handOver is running (a nested call only sets `again`). */
  private handingOver = false;
  private again = false;
  /** A nested call (a slot really released during the loop) asked to wake the others. */
  private wakeAfter = false;
  private waking = false;

  constructor(
    private readonly counts: SharedCounts,
    private readonly threads: number,
  ) {}

  register(waiter: SlotWaiter): void {
    this.waiters.add(waiter);
  }

  unregister(waiter: SlotWaiter): void {
    this.waiters.delete(waiter);
  }

  /**
   * Gives free slots to queued connections until no slot is free or nobody waits: `first`'s
   * queue first (the listener that freed the slot), then every other listener's. A loop, never
   * a recursion: a connection that start() refuses at once frees its slot back into this same
   * loop (the nested call only asks for another pass), so a queue of any length that refuses
   * synchronously costs one stack frame (issue 13, defect 2: 1,300 such connections recursed
   * through close -> release -> promote -> start -> close and overflowed the stack).
   * With several threads, a slot this thread cannot use (the oldest queued connection is in
   * another thread) wakes the others.
   */
  handOver(first: SlotWaiter | null, wakeOthers = true): void {
    if (this.handingOver) {
      this.again = true;
      if (wakeOthers) this.wakeAfter = true;
      return;
    }
    this.handingOver = true;
    this.wakeAfter = wakeOthers;
    try {
      do {
        this.again = false;
        if (first !== null) while (first.promoteOne()) this.again = true;
        for (const waiter of this.waiters) {
          if (waiter !== first) while (waiter.promoteOne()) this.again = true;
        }
      } while (this.again);
    } finally {
      this.handingOver = false;
    }
    if (this.wakeAfter && this.threads > 1) {
      this.wakeAfter = false;
      for (const waiter of this.waiters) {
        if (waiter.othersWaiting()) {
          this.counts.wakeOthers();
          break;
        }
      }
    }
  }

  /**
   * With several threads: runs handOver each time another thread wakes this one, until stop().
   * Waiting costs nothing while nobody wakes (Atomics.waitAsync); the timeout only re-checks.
   */
  startWaking(): void {
    if (this.threads <= 1 || this.waking) return;
    this.waking = true;
    const loop = async (): Promise<void> => {
      while (this.waking) {
        const seen = this.counts.wakeSequence;
        // Never wakes the others from here: they were woken by the same notify, and a thread
        // woken by its own bump would go round without ever yielding (a frozen event loop).
        this.handOver(null, false);
        const wait = this.counts.waitForWake(seen, 1000);
        // Woken already (the sequence moved while handing over): yield once to the event loop.
        await (wait ?? new Promise((resolve) => setImmediate(resolve)));
      }
    };
    void loop();
  }

  stop(): void {
    this.waking = false;
  }
}
