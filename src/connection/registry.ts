// Every live connection, from admission to close. The constructor of Connection is the only
// place that adds and Connection.close() the only place that removes: the active count is this
// map's size, never a separate counter that could drift.
import type { Connection } from './connection.ts';

export class Registry {
  private readonly live = new Map<number, Connection>();
  private nextId = 1;
  private emptyWaiters: Array<() => void> = [];

  /** Called by the Connection constructor only. */
  add(conn: Connection): number {
    const id = this.nextId++;
    this.live.set(id, conn);
    return id;
  }

  /** Called by Connection.close() only. */
  remove(conn: Connection): void {
    this.live.delete(conn.id);
    if (this.live.size === 0 && this.emptyWaiters.length > 0) {
      const waiters = this.emptyWaiters;
      this.emptyWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  /** Resolves when no connection is left (at once if none is). */
  whenEmpty(): Promise<void> {
    if (this.live.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.emptyWaiters.push(resolve));
  }

  get size(): number {
    return this.live.size;
  }

  get(id: number): Connection | undefined {
    return this.live.get(id);
  }

  values(): IterableIterator<Connection> {
    return this.live.values();
  }
}
