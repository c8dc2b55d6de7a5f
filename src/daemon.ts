// Process lifecycle: bind the listeners of a config, swap generations on reload, drain on stop.
// Owns what outlives a config generation: the registry, the global slot pool, the listeners
// (with their per-client tables and queues) and the metrics.
import type { Config } from './config/types.ts';
import { Registry } from './connection/registry.ts';
import type { ConnectionInfo } from './connection/connection.ts';
import { daemonStats, type DaemonStats } from './admin/stats.ts';
import { compileGeneration, type Generation } from './generation.ts';
import { Listener, type BindOptions, type ListenerDeps, type SharedState } from './listener/listener.ts';
import { SharedClientTable } from './governance/client-table.ts';
import { CountIndexes, SharedCounts } from './governance/shared-counts.ts';
import type { ListenerGeneration } from './listener/listener-generation.ts';
import { SlotPool } from './listener/slot-pool.ts';
import type { Logger } from './logging/logger.ts';
import { Metrics, type BackendSource } from './metrics.ts';
import type { AdminState } from './backends/backend-states.ts';
import { SharedBackendStates } from './backends/backend-states.ts';
import { BackendDirectory, type BackendUpdate } from './backends/directory.ts';
import { BackendSupervisor, type BackendEntry, type BackendView } from './backends/supervisor.ts';
import { Cluster } from './cluster/cluster.ts';
import type { RedisStore } from './cluster/store.ts';

export interface ShutdownResult {
  /** Connections that finished by themselves during the drain. */
  readonly drained: number;
  /** Connections still open at the deadline, closed with reason "shutdown". */
  readonly cut: number;
}

export interface ReloadResult {
  readonly added: string[];
  readonly removed: string[];
  readonly changed: string[];
}

/** A reload between its two halves: what commit swaps in, or abort releases. */
export interface PreparedReload {
  readonly config: Config;
  readonly next: Generation;
  readonly created: Map<string, Listener>;
  readonly bound: Array<[Listener, string]>;
  readonly moves: Array<[Listener, Listener, string]>;
  /** A store for a new [cluster] address, connected at commit; null when the one in use stays. */
  readonly store: RedisStore | null;
}

/** The counts of a daemon that is the process's only event loop. */
function ownSharedState(config: Config): SharedState {
  const indexes = new CountIndexes();
  const full = indexes.assign(config.listeners);
  if (full !== null) throw new Error(full);
  return {
    counts: new SharedCounts(),
    backends: new SharedBackendStates(),
    clients: new SharedClientTable({ maxTrackedIps: config.limits.maxTrackedIps }),
    indexes,
    thread: 0,
    threads: 1,
  };
}

/** A reload asked for once a shutdown had begun: it changes nothing. */
export class ShuttingDownError extends Error {
  readonly code = 'ESHUTTINGDOWN';
  constructor() {
    super('the daemon is shutting down; reload ignored');
  }
}

export class Daemon {
  readonly registry = new Registry();
  readonly metrics: Metrics;
  readonly log: Logger;
  readonly listeners = new Map<string, Listener>();
  /** Listeners removed by a reload that still have connections draining. */
  readonly retired = new Set<Listener>();
  readonly shared: SharedState;
  /** This thread's copy of the backend answers and indexes (routes build their pools from it). */
  readonly backends: BackendDirectory;
  /**
   * Resolution, health checks and runtime states, when this daemon is the process's only event
   * loop; with threads the main thread runs them (EventLoops) and sends updates.
   */
  readonly supervisor: BackendSupervisor | null;
  /** [cluster] of this event loop: outlives generations, as the per-client table does. */
  readonly cluster: Cluster;
  private readonly slots: SlotPool;
  private generation: Generation;
  /** Bind options every listener of this thread uses (reusePort and the port each address got). */
  private bindOptions: BindOptions;
  private readonly sweepTimer: NodeJS.Timeout | null;
  private stopping: Promise<ShutdownResult> | null = null;
  /** Connections a second, immediate shutdown closed while draining: reported as cut. */
  private cutByImmediate: number | null = null;
  private drainTimers = new Set<NodeJS.Timeout>();
  /** False once shutdown began: /healthz answers 503. */
  accepting = true;

  private constructor(config: Config, log: Logger, metrics: Metrics, shared: SharedState, bindOptions: BindOptions, backends: BackendDirectory, supervisor: BackendSupervisor | null) {
    this.log = log;
    this.metrics = metrics;
    this.shared = shared;
    this.bindOptions = bindOptions;
    this.backends = backends;
    this.supervisor = supervisor;
    this.slots = new SlotPool(shared.counts, shared.threads);
    this.generation = compileGeneration(config, shared.indexes, backends);
    this.cluster = new Cluster(shared.thread, log, metrics.cluster);
    metrics.attach({
      clusterMode: () => this.cluster.mode,
      listeners: () => this.allListeners(),
      connections: () => this.registry.values(),
      capacity: () => ({ maxConnections: this.config.limits.maxConnections, maxTrackedIps: shared.clients.maxTrackedIps }),
      backends: () => this.backendSources(),
    });
    // Idle per-client entries whose window has passed are deleted a few per admission; this
    // coarse sweep (one thread does it) keeps the table tidy while no traffic comes.
    this.sweepTimer = shared.thread === 0 ? setInterval(() => shared.clients.sweepIdle(), 100) : null;
    this.sweepTimer?.unref();
    this.slots.startWaking();
  }

  /**
   * Binds every listener of `config`; on a bind failure nothing stays bound and the BindError is
   * thrown. Without `shared`, this thread is the only one and owns its counts (tests, threads = 1
   * in-process); with it, one of several event-loop threads (src/thread.ts).
   */
  static async start(
    config: Config,
    log: Logger,
    opts: { metrics?: Metrics; shared?: SharedState; bind?: BindOptions; backends?: BackendUpdate } = {},
  ): Promise<Daemon> {
    const shared = opts.shared ?? ownSharedState(config);
    const metrics = opts.metrics ?? new Metrics();
    const directory = new BackendDirectory(shared.backends, shared.indexes);
    let supervisor: BackendSupervisor | null = null;
    let daemon: Daemon | null = null;
    if (opts.backends !== undefined) directory.apply(opts.backends);
    else {
      supervisor = new BackendSupervisor({
        states: shared.backends,
        indexes: shared.indexes,
        log,
        metrics,
        publish: (update) => daemon?.applyBackendUpdate(update),
      });
      directory.apply(await supervisor.prepare(config));
    }
    daemon = new Daemon(config, log, metrics, shared, opts.bind ?? { reusePort: false, portFor: () => undefined }, directory, supervisor);
    supervisor?.commit(config);
    try {
      daemon.cluster.commit(config.cluster, daemon.cluster.prepare(config.cluster));
      for (const gen of daemon.generation.listeners.values()) {
        const listener = daemon.createListener(gen.name);
        await listener.bind(gen.config.bind, daemon.bindOptions);
        if (shared.thread === 0) log.info({ listener: gen.name, bind: listener.boundAddresses.map((a) => `${a}`) }, 'listener started');
      }
    } catch (err) {
      await daemon.releaseAll();
      throw err;
    }
    daemon.metrics.started();
    return daemon;
  }

  /** Worker slots taken from the global pool (`limits.max_connections`) by every thread. */
  get slotsBusy(): number {
    return this.shared.counts.globalBusy;
  }

  /**
   * The ports bound addresses got (port 0 resolved), for the other threads to bind the same:
   * every address, or those a prepared reload bound.
   */
  boundPorts(prepared?: PreparedReload): Array<{ listener: string; address: string; port: number }> {
    const pairs: Array<[Listener, string]> = prepared?.bound ?? [...this.listeners.values()].flatMap((l) => l.boundAddresses.map((a): [Listener, string] => [l, a]));
    return pairs.map(([listener, address]) => ({ listener: listener.name, address, port: listener.portOf(address) }));
  }

  /** Where a thread other than the first finds the port another thread resolved (see Listener.bind). */
  setPortLookup(portFor: BindOptions['portFor']): void {
    this.bindOptions = { ...this.bindOptions, portFor };
  }

  get config(): Config {
    return this.generation.config;
  }

  // ---- the admin API's views (AdminSource) ----

  async metricsText(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.metrics.registry.contentType, body: await this.metrics.exposition() };
  }

  async stats(): Promise<DaemonStats> {
    return daemonStats(this);
  }

  async connections(limit: number): Promise<{ total: number; connections: ConnectionInfo[] }> {
    const now = Date.now();
    const connections: ConnectionInfo[] = [];
    for (const conn of this.registry.values()) {
      if (connections.length >= limit) break;
      connections.push(conn.describe(now));
    }
    return { total: this.registry.size, connections };
  }

  private createListener(name: string): Listener {
    const gen = this.generation.listeners.get(name)!;
    const listener = new Listener(gen, this.listenerDeps(this.generation.config));
    this.listeners.set(name, listener);
    return listener;
  }

  *allListeners(): Iterable<Listener> {
    yield* this.listeners.values();
    yield* this.retired;
  }

  /** Port actually bound by a listener address (tests bind port 0). */
  portOf(listener: string, address?: string): number {
    const l = this.listeners.get(listener);
    if (l === undefined) return 0;
    return l.portOf(address ?? l.boundAddresses[0] ?? '');
  }

  /**
   * Applies a new config atomically. New addresses are bound first; if any bind fails, or a
   * shutdown begins meanwhile, everything bound for this reload is released and the old config
   * stays in force (the error is thrown). An address that moves between listeners (kept,
   * renamed or new) is handed over at commit, never bound twice. The commit is synchronous, so
   * no await can let a shutdown in between it and the listeners it leaves accepting.
   * Established connections keep the generation that admitted them.
   */
  async reload(config: Config): Promise<ReloadResult> {
    return this.commit(await this.prepare(config));
  }

  /**
   * First half of a reload (every thread prepares before any commits, so a reload applies to
   * all threads or none): compiles `config` and binds its new addresses. On failure, or when a
   * shutdown began meanwhile, releases what it bound and throws. `indexes` are the count indexes
   * the config thread assigned; without them this thread assigns its own (it is the only one).
   */
  async prepare(config: Config, backends?: BackendUpdate): Promise<PreparedReload> {
    if (this.stopping !== null) throw new ShuttingDownError();
    if (backends === undefined) {
      const full = this.shared.indexes.assign(config.listeners);
      if (full !== null) throw new Error(full);
      this.backends.apply(await this.supervisor!.prepare(config));
      if (this.stopping !== null) {
        this.supervisor!.abort();
        throw new ShuttingDownError();
      }
    } else {
      this.backends.apply(backends);
    }
    const next = compileGeneration(config, this.shared.indexes, this.backends);
    // First, as it can fail (password_file) and binds nothing.
    const store = this.cluster.prepare(config.cluster);
    const created = new Map<string, Listener>();
    const bound: Array<[Listener, string]> = [];
    /** Listening sockets to hand from one listener to another at commit: [from, to, address]. */
    const moves: Array<[Listener, Listener, string]> = [];
    try {
      for (const gen of next.listeners.values()) {
        let owner = this.listeners.get(gen.name);
        if (owner === undefined) {
          owner = new Listener(gen, this.listenerDeps(config));
          created.set(gen.name, owner);
        }
        for (const address of gen.config.bind) {
          if (owner.boundAddresses.includes(address.text)) continue;
          const holder = this.holderOf(address.text);
          if (holder !== undefined) {
            moves.push([holder, owner, address.text]);
            continue;
          }
          await owner.bind([address], this.bindOptions);
          bound.push([owner, address.text]);
          if (this.stopping !== null) throw new ShuttingDownError();
        }
      }
    } catch (err) {
      await this.undo({ config, next, created, bound, moves, store });
      throw err;
    }
    return { config, next, created, bound, moves, store };
  }

  /** Undoes a prepared reload that will not be committed (another thread failed to prepare). */
  async abort(prepared: PreparedReload): Promise<void> {
    await this.undo(prepared);
  }

  private async undo(prepared: PreparedReload): Promise<void> {
    this.supervisor?.abort();
    this.cluster.discard(prepared.store);
    for (const [listener, text] of prepared.bound) await listener.unbind(text);
    for (const listener of prepared.created.values()) {
      await listener.stopAccepting();
      listener.dispose();
    }
  }

  /**
   * Second half of a reload: swaps the generation. Nothing awaits and nothing can fail, so no
   * shutdown can come in between it and the listeners it leaves accepting.
   */
  commit(prepared: PreparedReload): ReloadResult {
    const { config, next, created, moves } = prepared;
    const result: ReloadResult = { added: [], removed: [], changed: [] };
    this.generation = next;
    this.supervisor?.commit(config);
    this.cluster.commit(config.cluster, prepared.store);
    for (const [from, to, text] of moves) to.adopt(text, from.release(text)!);
    for (const [name, listener] of this.listeners) {
      const gen = next.listeners.get(name);
      if (gen === undefined) {
        this.listeners.delete(name);
        this.retireListener(listener, config);
        result.removed.push(name);
        continue;
      }
      const old = listener.generation;
      listener.generation = gen;
      for (const text of listener.boundAddresses) {
        if (!gen.config.bind.some((a) => a.text === text)) void listener.unbind(text);
      }
      this.applyRouteRemovals(listener, old, gen, config);
      if (JSON.stringify(old.config) !== JSON.stringify(gen.config)) result.changed.push(name);
    }
    for (const listener of created.values()) {
      this.listeners.set(listener.name, listener);
      result.added.push(listener.name);
    }
    // More workers or a higher global limit: start queued connections now.
    this.slots.handOver(null);
    this.metrics.reloaded(true);
    return result;
  }

  // ---- backends ----

  /** A new resolution from the config owner: the routes in force take their new members. */
  applyBackendUpdate(update: BackendUpdate): void {
    this.backends.apply(update);
    for (const gen of this.generation.listeners.values()) {
      for (const route of gen.routes.routes) route.pool.setMembers(this.backends.membersOf(gen.name, route.config));
    }
  }

  /** Every backend of the routes in force with its shared state (metrics). */
  private *backendSources(): Iterable<BackendSource> {
    const now = Date.now();
    const states = this.shared.backends;
    for (const gen of this.generation.listeners.values()) {
      for (const route of gen.routes.routes) {
        for (const m of route.pool.all) {
          yield { listener: gen.name, route: route.name, backend: m.address.text, up: states.isHealthy(m.index, now), active: states.active(m.index) };
        }
      }
    }
  }

  /** AdminSource: every backend with its state (only the daemon that owns the config knows them all). */
  async backendViews(): Promise<BackendView[]> {
    return this.supervisor?.describe() ?? [];
  }

  /** AdminSource: the runtime state of a backend; see BackendSupervisor.setState. */
  async setBackendState(target: { backend: string; listener?: string; route?: string }, state: AdminState): Promise<BackendEntry[]> {
    const changed = this.supervisor!.setState(target, state);
    this.backendStateChanged(changed.map((e) => e.index), state);
    return changed;
  }

  /**
   * Backends were put into `state`: in maintenance, their connections in this thread are closed
   * once shutdown.drain_timeout has passed, unless the backend is back to ready or drain by then.
   */
  backendStateChanged(indexes: readonly number[], state: AdminState): void {
    if (state !== 'maintenance' || indexes.length === 0) return;
    const set = new Set(indexes);
    const states = this.shared.backends;
    this.scheduleDrain(() => {
      for (const conn of [...this.registry.values()]) {
        if (set.has(conn.backendIndex) && states.admin(conn.backendIndex) === 'maintenance') conn.close('maintenance');
      }
    }, this.config.shutdown.drainTimeoutMs);
  }

  /** The listener currently bound to an address as written (port 0 is never shared: each is its own). */
  private holderOf(text: string): Listener | undefined {
    if (text.endsWith(':0')) return undefined;
    for (const listener of this.listeners.values()) {
      if (listener.boundAddresses.includes(text)) return listener;
    }
    return undefined;
  }

  private listenerDeps(config: Config): ListenerDeps {
    return {
      registry: this.registry,
      slots: this.slots,
      log: this.log,
      metrics: this.metrics,
      shared: this.shared,
      rejectionSummaryIntervalMs: config.logging.rejectionSummaryIntervalMs,
      cluster: this.cluster,
    };
  }

  /** A listener the new config removed: stop accepting, then keep, drain or close its connections. */
  private retireListener(listener: Listener, config: Config): void {
    listener.draining = true;
    void listener.stopAccepting();
    for (const conn of [...listener.queue]) conn.close('draining');
    const policy = listener.generation.config.onRemoval;
    this.retired.add(listener);
    if (policy === 'close') listener.closeAll('removed');
    else if (policy === 'drain') this.scheduleDrain(() => listener.closeAll('removed'), config.shutdown.drainTimeoutMs);
    this.disposeWhenIdle(listener);
  }

  private disposeWhenIdle(listener: Listener): void {
    const dispose = (): void => {
      this.retired.delete(listener);
      listener.dispose();
    };
    if (listener.activeCount() === 0) dispose();
    else listener.onIdle = dispose;
  }

  /**
   * Routes the new generation no longer has: keep, drain or close their connections. The policy
   * is also remembered on the listener, for connections still in their handshake that will route
   * later through an older generation (see Listener.removedRoutes).
   */
  private applyRouteRemovals(listener: Listener, old: ListenerGeneration, gen: ListenerGeneration, config: Config): void {
    const kept = new Set(gen.config.routes.map((r) => r.name));
    const removed = old.config.routes.filter((r) => !kept.has(r.name));
    if (removed.length === 0) return;
    const closeAt = Date.now() + config.shutdown.drainTimeoutMs;
    for (const route of removed) listener.removedRoutes.set(route.name, { policy: route.onRemoval, closeAt, seq: gen.seq });
    const names = new Set(removed.map((r) => r.name));
    const doomed = [...this.registry.values()].filter(
      (c) => c.owner === listener && c.route !== null && names.has(c.route.name),
    );
    for (const conn of doomed) {
      const policy = conn.route!.config.onRemoval;
      if (policy === 'close') conn.close('removed');
      else if (policy === 'drain') conn.closeAtRemovalDeadline(closeAt);
    }
  }

  private scheduleDrain(action: () => void, ms: number): void {
    const timer = setTimeout(() => {
      this.drainTimers.delete(timer);
      action();
    }, ms);
    timer.unref();
    this.drainTimers.add(timer);
  }

  /**
   * Graceful stop: refuse new connections, let established ones finish for `drainTimeoutMs`, then
   * close what remains. Idempotent; a second call with `immediate` closes everything at once.
   */
  shutdown(opts: { drainTimeoutMs?: number; immediate?: boolean } = {}): Promise<ShutdownResult> {
    if (this.stopping !== null) {
      if (opts.immediate) {
        for (const conn of [...this.registry.values()]) {
          conn.close('shutdown');
          if (this.cutByImmediate !== null) this.cutByImmediate++; // counted once the drain took its census
        }
      }
      return this.stopping;
    }
    this.accepting = false;
    if (this.shared.threads === 1) this.shared.counts.markStopping(); // with threads, EventLoops marks it
    this.stopping = this.drain(opts.immediate ? 0 : (opts.drainTimeoutMs ?? this.config.shutdown.drainTimeoutMs));
    return this.stopping;
  }

  private async drain(drainTimeoutMs: number): Promise<ShutdownResult> {
    const listeners = [...this.allListeners()];
    for (const listener of listeners) listener.draining = true;
    await Promise.all(listeners.map((l) => l.stopAccepting()));
    for (const listener of listeners) for (const conn of [...listener.queue]) conn.close('draining');
    const open = this.registry.size;
    this.cutByImmediate = 0;
    let cut = 0;
    if (open > 0) {
      let timer: NodeJS.Timeout | undefined;
      const deadline = new Promise<void>((resolve) => {
        timer = setTimeout(resolve, drainTimeoutMs);
      });
      await Promise.race([this.registry.whenEmpty(), deadline]);
      clearTimeout(timer);
      for (const conn of [...this.registry.values()]) {
        conn.close('shutdown');
        cut++;
      }
    }
    await this.releaseAll();
    cut += this.cutByImmediate;
    return { drained: open - cut, cut };
  }

  private async releaseAll(): Promise<void> {
    this.slots.stop();
    this.supervisor?.close();
    this.cluster.close();
    if (this.sweepTimer !== null) clearInterval(this.sweepTimer);
    for (const timer of this.drainTimers) clearTimeout(timer);
    this.drainTimers.clear();
    for (const listener of this.allListeners()) {
      await listener.stopAccepting();
      listener.dispose();
    }
  }
}
