// `[limits] max_connections`: the worker slots of all listeners together. When it is reached a
// listener treats its own workers as busy, so new connections queue (and time out) as usual.

/** Something that can hand a freed slot to the oldest connection it has queued. */
export interface SlotWaiter {
  /** Starts its oldest queued connection if it can; true when it took the slot. */
  promoteOne(): boolean;
}

export class SlotPool {
  /** 0 = unlimited. Replaced on reload. */
  max: number;
  busy = 0;
  private readonly waiters = new Set<SlotWaiter>();

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
   * A slot was freed by a listener that had nobody queued: offer it to the other listeners in
   * turn. (A listener with its own queue promotes from it first.)
   */
  offer(from: SlotWaiter): void {
    if (this.full) return;
    for (const waiter of this.waiters) {
      if (waiter !== from && waiter.promoteOne()) return;
    }
  }
}
