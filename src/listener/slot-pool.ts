// `[limits] max_connections`: the worker slots of all listeners together. When it is reached a
// listener treats its own workers as busy, so new connections queue (and time out) as usual.

/** Something that can hand a freed slot to the oldest connection it has queued. */
export interface SlotWaiter {
  /** Starts its oldest queued connection if it can; true when it took the slot (even if that
   * connection was then refused and gave the slot back). */
  promoteOne(): boolean;
}

export class SlotPool {
  /** 0 = unlimited. Replaced on reload. */
  max: number;
  busy = 0;
  private readonly waiters = new Set<SlotWaiter>();
  /** handOver is running (a nested call only sets `again`). */
  private handingOver = false;
  private again = false;

  constructor(max: number) {
    this.max = max;
  }

  get full(): boolean {
    return this.max > 0 && this.busy >= this.max;
  }

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
   */
  handOver(first: SlotWaiter | null): void {
    if (this.handingOver) {
      this.again = true;
      return;
    }
    this.handingOver = true;
    try {
      do {
        this.again = false;
        if (first !== null) while (first.promoteOne()) this.again = true;
        for (const waiter of this.waiters) {
          if (waiter !== first) while (waiter.promoteOne()) this.again = true;
        }
      } while (this.again && !this.full);
    } finally {
      this.handingOver = false;
    }
  }
}
