// The main thread's side of `[process] threads`: starts N event-loop threads (src/thread.ts), each
// binding every listener address with SO_REUSEPORT, and speaks for them to serve.ts and the admin
// API. Owns what is process-wide: the shared counts and per-client table (handed to every thread
// at start), the count indexes of listener and route names, and the config in force.
//
// A reload is applied to every thread or to none: all threads prepare (bind new addresses; the
// first thread resolves port 0 and the others bind the port it got), then all commit, or all
// abort if any failed. Shutdown drains every thread with the same deadline. An uncaught exception
// in a thread is a bug: the thread's error reaches the main thread, which logs it with its stack
// and exits 70 (systemd restarts the unit).
import { availableParallelism } from 'node:os';
import v8 from 'node:v8';
import { Worker } from 'node:worker_threads';
import client from 'prom-client';
import type { DaemonStats } from './admin/stats.ts';
import type { Config } from './config/types.ts';
import type { ConnectionInfo } from './connection/connection.ts';
import { ShuttingDownError, type ReloadResult, type ShutdownResult } from './daemon.ts';
import { SharedClientTable } from './governance/client-table.ts';
import { CountIndexes, MAX_THREADS, SharedCounts } from './governance/shared-counts.ts';
import { BindError } from './listener/listener.ts';
import type { LogFormat, LogLevel, Logger } from './logging/logger.ts';
import { Metrics } from './metrics.ts';
import { SharedBackendStates, type AdminState } from './backends/backend-states.ts';
import type { BackendUpdate } from './backends/directory.ts';
import { BackendSupervisor, type BackendEntry, type BackendView } from './backends/supervisor.ts';
import type { Ports, ThreadData, ThreadError, ThreadRequest } from './thread.ts';

/**
 * V8 heap flags for the event-loop threads (README, "Memory"): a small young generation and room
 * in the old one. Set here, in the main thread, before any thread is created, so they apply to
 * every thread however the daemon was started (`node dist/smartproxy.js`, the shebang, systemd).
 */
const THREAD_V8_FLAGS = ['--max-semi-space-size=2', '--initial-old-space-size=64'];

/** The flags, or SMARTPROXY_THREAD_V8_FLAGS (space-separated; empty = none) for A/B benchmarks. */
function threadV8Flags(): string[] {
  const override = process.env.SMARTPROXY_THREAD_V8_FLAGS;
  return override === undefined ? THREAD_V8_FLAGS : override.split(/\s+/).filter((flag) => flag.length > 0);
}

/** Distributive Omit, so each member of the request union keeps its own fields. */
type RequestBody = ThreadRequest extends infer R ? (R extends unknown ? Omit<R, 'id'> : never) : never;

interface Reply {
  readonly id: number;
  readonly ok: boolean;
  readonly error?: ThreadError;
  readonly [field: string]: unknown;
}

/** One event-loop thread as the main thread sees it. */
class LoopThread {
  private nextId = 1;
  private readonly pending = new Map<number, (reply: Reply) => void>();
  private exited = false;

  constructor(
    readonly index: number,
    readonly worker: Worker,
  ) {
    worker.on('message', (reply: Reply) => {
      const resolve = this.pending.get(reply.id);
      if (resolve === undefined) return;
      this.pending.delete(reply.id);
      resolve(reply);
    });
    // A request still waiting when the thread ends (terminated after a shutdown) is answered
    // "shutting down", so no caller waits forever (a reload racing SIGTERM once left the main
    // thread's top-level await unsettled: exit 13).
    worker.on('exit', () => {
      this.exited = true;
      for (const [id, resolve] of this.pending) resolve({ id, ok: false, error: GONE });
      this.pending.clear();
    });
  }

  /** Sends a request; resolves with the reply (rejects with the thread's error when not ok). */
  async call(body: RequestBody): Promise<Reply> {
    const id = this.nextId++;
    const reply = this.exited
      ? { id, ok: false, error: GONE }
      : await new Promise<Reply>((resolve) => {
          this.pending.set(id, resolve);
          this.worker.postMessage({ ...body, id });
        });
    if (!reply.ok) throw toError(reply.error!);
    return reply;
  }
}

const GONE: ThreadError = { message: 'the event-loop thread has stopped', code: 'ESHUTTINGDOWN', bind: false };

function toError(error: ThreadError): Error {
  if (error.bind) {
    return new BindError(error.listener ?? '?', error.address ?? '?', Object.assign(new Error(error.message), { code: error.code }));
  }
  if (error.code === 'ESHUTTINGDOWN') return new ShuttingDownError();
  return Object.assign(new Error(error.message), { code: error.code });
}

export interface EventLoopsOptions {
  readonly logLevel: LogLevel;
  readonly logFormat: LogFormat;
}

export class EventLoops {
  readonly log: Logger;
  readonly metrics: Metrics;
  readonly threads: number;
  private readonly loops: LoopThread[] = [];
  private readonly counts: SharedCounts;
  private readonly clients: SharedClientTable;
  private readonly backendStates = new SharedBackendStates();
  /** Backend resolution, health checks and runtime states for every thread. */
  readonly supervisor: BackendSupervisor;
  private readonly indexes = new CountIndexes();
  private current: Config;
  private stopping: Promise<ShutdownResult> | null = null;
  private reloading = false;
  /** False once shutdown began: /healthz answers 503. */
  accepting = true;

  private constructor(config: Config, log: Logger, threads: number) {
    this.current = config;
    this.log = log;
    this.threads = threads;
    this.metrics = new Metrics({ role: 'process' });
    this.counts = new SharedCounts();
    this.clients = new SharedClientTable({ maxTrackedIps: config.limits.maxTrackedIps });
    this.supervisor = new BackendSupervisor({
      states: this.backendStates,
      indexes: this.indexes,
      log,
      metrics: this.metrics,
      publish: (update) => {
        for (const loop of this.loops) void loop.call({ type: 'backends', update }).catch(() => undefined);
      },
    });
  }

  /** How many threads `[process] threads` asks for on this machine. */
  static threadsFor(config: Config): number {
    const wanted = config.process.threads;
    // "auto" is capped like a number is (the shared counts hold MAX_THREADS threads' queue heads).
    return wanted === 'auto' ? Math.min(MAX_THREADS, Math.max(1, availableParallelism())) : wanted;
  }

  /**
   * Starts every thread and binds every listener in each; on a bind failure nothing stays bound,
   * every thread is stopped and the BindError is thrown.
   */
  static async start(config: Config, log: Logger, opts: EventLoopsOptions): Promise<EventLoops> {
    const loops = new EventLoops(config, log, EventLoops.threadsFor(config));
    const full = loops.indexes.assign(config.listeners);
    if (full !== null) throw new Error(full);
    for (const flag of threadV8Flags()) v8.setFlagsFromString(flag);
    let backends: BackendUpdate;
    try {
      backends = await loops.supervisor.prepare(config);
    } catch (err) {
      loops.supervisor.close();
      throw err;
    }
    for (let i = 0; i < loops.threads; i++) loops.loops.push(loops.spawn(i, opts));
    try {
      const first = await loops.loops[0]!.call({ type: 'start', config, backends, ports: [] });
      const ports = first.ports as Ports;
      await Promise.all(loops.loops.slice(1).map((loop) => loop.call({ type: 'start', config, backends, ports })));
    } catch (err) {
      await loops.terminate();
      throw err;
    }
    loops.supervisor.commit(config);
    loops.metrics.started();
    log.info({ threads: loops.threads }, 'event-loop threads started');
    return loops;
  }

  private spawn(index: number, opts: EventLoopsOptions): LoopThread {
    const data: ThreadData = {
      smartproxyThread: true,
      thread: index,
      threads: this.threads,
      counts: this.counts.buffer,
      clients: this.clients.buffer,
      backends: this.backendStates.buffer,
      maxTrackedIps: this.current.limits.maxTrackedIps,
      logLevel: opts.logLevel,
      logFormat: opts.logFormat,
    };
    // The entry script (src/cli.ts under tsx, or the bundle) starts a thread when it is not the
    // main thread; workers inherit the main thread's execArgv (tsx's loader included).
    const worker = new Worker(process.argv[1]!, { workerData: data, argv: [], stdout: false, stderr: false });
    worker.on('error', (err) => {
      this.log.fatal({ err, thread: index }, 'uncaught exception in an event-loop thread (bug)');
      process.exit(70);
    });
    worker.on('exit', (code) => {
      if (this.stopping === null) {
        this.log.fatal({ thread: index, code }, 'an event-loop thread exited (bug)');
        process.exit(70);
      }
    });
    return new LoopThread(index, worker);
  }

  get config(): Config {
    return this.current;
  }

  /** Connections open in every thread (queued included). */
  get openConnections(): number {
    let open = 0;
    for (const index of this.indexes.listeners.values()) open += this.counts.open(index);
    return open;
  }

  /** Connections open in every thread that are not waiting in a queue. */
  private get establishedConnections(): number {
    let established = 0;
    for (const index of this.indexes.listeners.values()) established += this.counts.open(index) - this.counts.queued(index);
    return established;
  }

  /**
   * Applies `config` to every thread or to none (see the header). `logLevel`, when given, is set
   * with the commit, in the same message: a separate round trip after it could meet threads that
   * a SIGTERM arriving meanwhile had already ended.
   */
  async reload(config: Config, opts: { logLevel?: LogLevel } = {}): Promise<ReloadResult> {
    if (this.stopping !== null) throw new ShuttingDownError();
    if (this.reloading) throw new Error('bug: reloads overlap');
    this.reloading = true;
    try {
      const full = this.indexes.assign(config.listeners);
      if (full !== null) throw new Error(full);
      const prepared: LoopThread[] = [];
      try {
        const backends = await this.supervisor.prepare(config);
        if (this.stopping !== null) throw new ShuttingDownError();
        const [first, ...rest] = this.loops;
        const reply = await first!.call({ type: 'prepare', config, backends, ports: [] });
        prepared.push(first!);
        const ports = reply.ports as Ports;
        const results = await Promise.allSettled(rest.map(async (loop) => {
          await loop.call({ type: 'prepare', config, backends, ports });
          prepared.push(loop);
        }));
        const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
        if (failed !== undefined) throw failed.reason;
        if (this.stopping !== null) throw new ShuttingDownError();
      } catch (err) {
        await Promise.all(prepared.map((loop) => loop.call({ type: 'abort' }).catch(() => undefined)));
        this.supervisor.abort();
        throw err;
      }
      const replies = await Promise.all(this.loops.map((loop) => loop.call({ type: 'commit', logLevel: opts.logLevel })));
      if (opts.logLevel !== undefined) this.log.level = opts.logLevel;
      this.supervisor.commit(config);
      this.current = config;
      this.metrics.reloaded(true);
      return replies[0]!.result as ReloadResult;
    } finally {
      this.reloading = false;
    }
  }

  /**
   * Graceful stop of every thread: refuse new connections, let established ones finish for
   * `drainTimeoutMs`, then close what remains. A second call with `immediate` closes everything
   * at once in every thread.
   */
  shutdown(opts: { drainTimeoutMs?: number; immediate?: boolean } = {}): Promise<ShutdownResult> {
    const drainTimeoutMs = opts.drainTimeoutMs ?? this.current.shutdown.drainTimeoutMs;
    const immediate = opts.immediate ?? false;
    if (this.stopping !== null) {
      if (immediate) for (const loop of this.loops) void loop.call({ type: 'shutdown', drainTimeoutMs: 0, immediate: true }).catch(() => undefined);
      return this.stopping;
    }
    this.accepting = false;
    this.counts.markStopping();
    // The established connections at this instant: one that finishes before its thread's drain
    // begins (the message takes a moment) finished during the drain too, and counts as drained.
    const established = this.establishedConnections;
    this.stopping = (async () => {
      const replies = await Promise.all(this.loops.map((loop) => loop.call({ type: 'shutdown', drainTimeoutMs, immediate })));
      await this.terminate();
      let cut = 0;
      for (const reply of replies) cut += (reply.result as ShutdownResult).cut;
      return { drained: Math.max(0, established - cut), cut };
    })();
    return this.stopping;
  }

  private async terminate(): Promise<void> {
    this.stopping ??= Promise.resolve({ drained: 0, cut: 0 });
    this.supervisor.close();
    await Promise.all(this.loops.map((loop) => loop.worker.terminate()));
  }

  // ---- the admin API's views, gathered from every thread ----

  /** The Prometheus text: the main thread's own series plus every thread's, summed. */
  async metricsText(): Promise<{ contentType: string; body: string }> {
    const replies = await Promise.all(this.loops.map((loop) => loop.call({ type: 'metrics' })));
    const all = [await this.metrics.registry.getMetricsAsJSON(), ...replies.map((r) => r.metrics as client.MetricObjectWithValues<client.MetricValue<string>>[])];
    const registry = client.AggregatorRegistry.aggregate(all as Parameters<typeof client.AggregatorRegistry.aggregate>[0]);
    return { contentType: registry.contentType, body: await registry.metrics() };
  }

  /** /stats: the first thread's view (counts are shared), with per-thread numbers summed. */
  async stats(): Promise<DaemonStats> {
    const replies = await Promise.all(this.loops.map((loop) => loop.call({ type: 'stats' })));
    const views = replies.map((r) => r.stats as DaemonStats);
    const first = views[0]!;
    const listeners = first.listeners.map((listener) => {
      // A name appears twice only while a removed listener drains beside its re-added namesake;
      // then the draining flag tells them apart.
      const twice = first.listeners.filter((l) => l.name === listener.name).length > 1;
      const matches = (l: (typeof first.listeners)[number]): boolean => l.name === listener.name && (!twice || l.draining === listener.draining);
      const rejections: Record<string, number> = {};
      for (const view of views) {
        for (const same of view.listeners.filter(matches)) {
          for (const [reason, n] of Object.entries(same.rejections)) rejections[reason] = (rejections[reason] ?? 0) + n;
        }
      }
      // Draining once every thread drains it (each stops accepting when its message arrives); a
      // thread that no longer lists it has finished draining it (its connections ended first).
      const draining = listener.draining && views.every((view) => !view.listeners.some(matches) || view.listeners.some((l) => matches(l) && l.draining));
      return { ...listener, draining, rejections };
    });
    const clusters = views.flatMap((v) => (v.cluster === undefined ? [] : [v.cluster]));
    const cluster = clusters.length === 0
      ? {}
      : { cluster: { mode: clusters.some((c) => c.mode === 'degraded') ? ('degraded' as const) : ('ok' as const), leases: clusters.reduce((n, c) => n + c.leases, 0) } };
    return { ...first, active: views.reduce((n, v) => n + v.active, 0), accepting: this.accepting, threads: this.threads, ...cluster, listeners };
  }

  /** AdminSource: every backend with its state. */
  async backendViews(): Promise<BackendView[]> {
    return this.supervisor.describe();
  }

  /** AdminSource: the runtime state of a backend; every thread learns it (maintenance closes). */
  async setBackendState(target: { backend: string; listener?: string; route?: string }, state: AdminState): Promise<BackendEntry[]> {
    const changed = this.supervisor.setState(target, state);
    const indexes = changed.map((e) => e.index);
    await Promise.all(this.loops.map((loop) => loop.call({ type: 'backend-state', indexes, state })));
    return changed;
  }

  /** /connections: up to `limit` connections of every thread, and how many there are in all. */
  async connections(limit: number): Promise<{ total: number; connections: ConnectionInfo[] }> {
    const replies = await Promise.all(this.loops.map((loop) => loop.call({ type: 'connections', limit })));
    const connections = replies.flatMap((r) => r.connections as ConnectionInfo[]).slice(0, limit);
    return { total: replies.reduce((n, r) => n + (r.total as number), 0), connections };
  }
}
