// The counts that every event loop of the process changes together: the global slot pool, each
// listener's busy workers, queue and open connections, each route's active connections, and the
// FIFO tickets of queued connections. One SharedArrayBuffer, changed only with Atomics, so a limit
// holds exactly over all threads (as nginx's shared-memory zones and HAProxy's stick tables do)
// and nothing on the accept path waits for a message from another thread.
//
// Every count is taken once, as a lease the connection holds, and given back by its one close().
//
// Cross-thread FIFO: a queued connection draws a ticket from its listener's counter, and each
// thread publishes the ticket of its oldest queued connection per listener ("head"). A thread
// starts its head only while that head is the oldest of all threads' heads, so a slot goes to the
// oldest connection queued anywhere, as seen when the slot is offered. A thread that frees a slot
// it cannot use itself (its own head is not the oldest) bumps a sequence number and wakes the
// others (Atomics.notify; they wait with Atomics.waitAsync), which costs a few milliseconds at most.

/** Most event-loop threads, listeners and routes (over the whole life of the process) it can count. */
export const MAX_THREADS = 64;
export const MAX_LISTENERS = 256;
export const MAX_ROUTES = 4096;

// Int32 layout.
const GLOBAL_BUSY = 0;
/** Bumped (and notified) whenever a queued connection elsewhere may now take a slot. */
const WAKE_SEQ = 1;
/** 1 once the process is stopping: every thread refuses new connections from that instant. */
const STOPPING = 2;
const LISTENERS_AT = 16;
const LISTENER_FIELDS = 4;
const L_BUSY = 0;
const L_QUEUED = 1;
const L_OPEN = 2;
const L_TICKET = 3;
const HEADS_AT = LISTENERS_AT + MAX_LISTENERS * LISTENER_FIELDS;
const ROUTES_AT = HEADS_AT + MAX_LISTENERS * MAX_THREADS;
const TOTAL_INTS = ROUTES_AT + MAX_ROUTES;

/** No queued connection: a head slot holding this has nothing waiting. */
const NO_TICKET = 0;

export class SharedCounts {
  readonly buffer: SharedArrayBuffer;
  private readonly i32: Int32Array;

  constructor(buffer: SharedArrayBuffer = new SharedArrayBuffer(TOTAL_INTS * 4)) {
    this.buffer = buffer;
    this.i32 = new Int32Array(buffer);
  }

  // ---- the global slot pool (limits.max_connections) and each listener's workers ----

  get globalBusy(): number {
    return Atomics.load(this.i32, GLOBAL_BUSY);
  }

  busy(listener: number): number {
    return Atomics.load(this.i32, LISTENERS_AT + listener * LISTENER_FIELDS + L_BUSY);
  }

  queued(listener: number): number {
    return Atomics.load(this.i32, LISTENERS_AT + listener * LISTENER_FIELDS + L_QUEUED);
  }

  /** Connections of the listener open in any thread, queued included. */
  open(listener: number): number {
    return Atomics.load(this.i32, LISTENERS_AT + listener * LISTENER_FIELDS + L_OPEN);
  }

  /**
   * Takes one of the listener's `workers` slots and one of the global `globalMax` (0 =
   * unlimited), or neither. Compare-and-swap, so two threads can never both take the last one.
   */
  takeSlot(listener: number, workers: number, globalMax: number): boolean {
    const at = LISTENERS_AT + listener * LISTENER_FIELDS + L_BUSY;
    if (!takeBelow(this.i32, at, workers)) return false;
    if (globalMax > 0 && !takeBelow(this.i32, GLOBAL_BUSY, globalMax)) {
      Atomics.sub(this.i32, at, 1);
      return false;
    }
    if (globalMax <= 0) Atomics.add(this.i32, GLOBAL_BUSY, 1);
    return true;
  }

  /** Gives back a slot taken by takeSlot. */
  releaseSlot(listener: number): void {
    Atomics.sub(this.i32, LISTENERS_AT + listener * LISTENER_FIELDS + L_BUSY, 1);
    Atomics.sub(this.i32, GLOBAL_BUSY, 1);
  }

  /** True when a slot could be taken now (a hint: takeSlot decides). */
  slotFree(listener: number, workers: number, globalMax: number): boolean {
    return this.busy(listener) < workers && (globalMax <= 0 || this.globalBusy < globalMax);
  }

  // ---- queue ----

  /** Takes a queue place below `capacity` and returns its ticket, or NO_TICKET when full. */
  enqueue(listener: number, capacity: number): number {
    const base = LISTENERS_AT + listener * LISTENER_FIELDS;
    if (!takeBelow(this.i32, base + L_QUEUED, capacity)) return NO_TICKET;
    let ticket = Atomics.add(this.i32, base + L_TICKET, 1) + 1;
    if (ticket === NO_TICKET) ticket = Atomics.add(this.i32, base + L_TICKET, 1) + 1; // wrapped to 0
    return ticket;
  }

  /** Gives back a queue place (the connection left the queue: started or closed). */
  dequeue(listener: number): void {
    Atomics.sub(this.i32, LISTENERS_AT + listener * LISTENER_FIELDS + L_QUEUED, 1);
  }

  /** Publishes this thread's oldest queued ticket for the listener (NO_TICKET: none). */
  setHead(listener: number, thread: number, ticket: number): void {
    if (thread >= MAX_THREADS || listener >= MAX_LISTENERS) throw new Error(`bug: thread ${thread} or listener ${listener} out of range`);
    Atomics.store(this.i32, HEADS_AT + listener * MAX_THREADS + thread, ticket);
  }

  /** True when no thread has a queued connection of the listener older than `ticket`. */
  isOldest(listener: number, thread: number, ticket: number, threads: number): boolean {
    const base = HEADS_AT + listener * MAX_THREADS;
    for (let t = 0; t < threads; t++) {
      if (t === thread) continue;
      const other = Atomics.load(this.i32, base + t);
      // Wrap-safe: tickets are compared by their difference, as TCP compares sequence numbers.
      if (other !== NO_TICKET && ((other - ticket) | 0) < 0) return false;
    }
    return true;
  }

  /** Adds `delta` (+1 or -1) to the listener's open connections. */
  addOpen(listener: number, delta: number): void {
    Atomics.add(this.i32, LISTENERS_AT + listener * LISTENER_FIELDS + L_OPEN, delta);
  }

  // ---- routes (max_connections per route) ----

  routeActive(route: number): number {
    return Atomics.load(this.i32, ROUTES_AT + route);
  }

  /** Takes one of the route's `max` connections (0 = unlimited, always counted). */
  takeRoute(route: number, max: number): boolean {
    if (max > 0) return takeBelow(this.i32, ROUTES_AT + route, max);
    Atomics.add(this.i32, ROUTES_AT + route, 1);
    return true;
  }

  releaseRoute(route: number): void {
    Atomics.sub(this.i32, ROUTES_AT + route, 1);
  }

  // ---- stopping ----

  /** True once markStopping() ran in any thread: accept() refuses with `draining`. */
  get stopping(): boolean {
    return Atomics.load(this.i32, STOPPING) === 1;
  }

  /**
   * Shutdown began: set by the main thread before it asks each thread to drain, so no thread
   * admits a connection in between (the messages take a moment to arrive).
   */
  markStopping(): void {
    Atomics.store(this.i32, STOPPING, 1);
  }

  // ---- waking the other threads ----

  get wakeSequence(): number {
    return Atomics.load(this.i32, WAKE_SEQ);
  }

  /** Tells every thread waiting in waitForWake that a slot may be theirs now. */
  wakeOthers(): void {
    Atomics.add(this.i32, WAKE_SEQ, 1);
    Atomics.notify(this.i32, WAKE_SEQ);
  }

  /**
   * Resolves when wakeOthers() is called after `seen` was read, or after `timeoutMs`; null when
   * it already was (the caller goes round at once).
   */
  waitForWake(seen: number, timeoutMs: number): Promise<unknown> | null {
    const result = Atomics.waitAsync(this.i32, WAKE_SEQ, seen, timeoutMs);
    return result.async ? result.value : null;
  }
}

/** Adds 1 to i32[at] if it stays at most `limit`; false (and no change) otherwise. */
function takeBelow(i32: Int32Array, at: number, limit: number): boolean {
  for (;;) {
    const current = Atomics.load(i32, at);
    if (current >= limit) return false;
    if (Atomics.compareExchange(i32, at, current, current + 1) === current) return true;
  }
}

/**
 * Stable indexes of listener and route names in the shared counts, for the life of the process:
 * a reload keeps a name's index (its counts survive), a new name gets the next one. Kept by the
 * thread that owns the config and handed to the others with each config.
 */
export class CountIndexes {
  readonly listeners: Map<string, number>;
  readonly routes: Map<string, number>;
  /** Backend state indexes (backends/backend-states.ts), keyed by backendKey(listener, route, address). */
  readonly backends: Map<string, number>;
  /** Backend indexes given back (releaseBackend), used again before new ones. */
  private readonly freeBackends: number[] = [];
  private nextBackend: number;

  constructor(init?: { listeners: Array<[string, number]>; routes: Array<[string, number]>; backends?: Array<[string, number]> }) {
    this.listeners = new Map(init?.listeners ?? []);
    this.routes = new Map(init?.routes ?? []);
    this.backends = new Map(init?.backends ?? []);
    this.nextBackend = Math.max(-1, ...this.backends.values()) + 1;
  }

  /** Indexes for backend keys not seen before; null, or a message when the process has used them up. */
  assignBackends(keys: Iterable<string>, max: number): string | null {
    const fresh = [...new Set(keys)].filter((key) => !this.backends.has(key));
    if (this.backends.size + fresh.length > max) return `more than ${max} backends at once (backends in the config, and those that left it less than 10 minutes ago)`;
    for (const key of fresh) this.backends.set(key, this.freeBackends.pop() ?? this.nextBackend++);
    return null;
  }

  /**
   * A backend gone from the config (and its connections) for good: its index may serve another.
   * Other threads may keep the old key in their copy; it is never looked up again unless the
   * owner assigns it anew, and then the owner's mapping replaces it.
   */
  releaseBackend(key: string): void {
    const index = this.backends.get(key);
    if (index === undefined) return;
    this.backends.delete(key);
    this.freeBackends.push(index);
  }

  backend(key: string): number {
    const index = this.backends.get(key);
    if (index === undefined) throw new Error(`bug: backend "${key.replaceAll('\u0000', '/')}" has no index`);
    return index;
  }

  /** Takes indexes another thread assigned (a reload's or a resolution's). */
  adopt(json: ReturnType<CountIndexes['toJSON']>): void {
    for (const [name, index] of json.listeners) this.listeners.set(name, index);
    for (const [key, index] of json.routes) this.routes.set(key, index);
    // The owner sends its whole map: keys it recycled must not linger in this copy.
    this.backends.clear();
    for (const [key, index] of json.backends) this.backends.set(key, index);
  }

  /**
   * Indexes for every listener and route of a config, allocating new ones; null with a message
   * when the process has used up its indexes (a reload then fails and changes nothing).
   */
  assign(listeners: ReadonlyArray<{ readonly name: string; readonly routes: ReadonlyArray<{ readonly name: string }> }>): string | null {
    const newListeners = listeners.filter((l) => !this.listeners.has(l.name)).length;
    const newRoutes = listeners.reduce((n, l) => n + l.routes.filter((r) => !this.routes.has(routeKey(l.name, r.name))).length, 0);
    if (this.listeners.size + newListeners > MAX_LISTENERS) return `more than ${MAX_LISTENERS} distinct listener names in the life of the process; restart to reset`;
    if (this.routes.size + newRoutes > MAX_ROUTES) return `more than ${MAX_ROUTES} distinct route names in the life of the process; restart to reset`;
    for (const l of listeners) {
      if (!this.listeners.has(l.name)) this.listeners.set(l.name, this.listeners.size);
      for (const r of l.routes) {
        const key = routeKey(l.name, r.name);
        if (!this.routes.has(key)) this.routes.set(key, this.routes.size);
      }
    }
    return null;
  }

  listener(name: string): number {
    const index = this.listeners.get(name);
    if (index === undefined) throw new Error(`bug: listener "${name}" has no count index`);
    return index;
  }

  route(listener: string, route: string): number {
    const index = this.routes.get(routeKey(listener, route));
    if (index === undefined) throw new Error(`bug: route "${listener}/${route}" has no count index`);
    return index;
  }

  /** Plain data, to send to another thread. */
  toJSON(): { listeners: Array<[string, number]>; routes: Array<[string, number]>; backends: Array<[string, number]> } {
    return { listeners: [...this.listeners], routes: [...this.routes], backends: [...this.backends] };
  }
}

function routeKey(listener: string, route: string): string {
  return `${listener}\u0000${route}`;
}
