// One event-loop thread (a worker_threads Worker): runs a Daemon over the process's shared counts
// and answers the main thread's requests. Every listener address is bound in every thread with
// SO_REUSEPORT, the kernel spreads new connections, and no socket ever moves between threads.
// Nothing here is on a connection's path: the requests are start, reload (prepare, then commit
// or abort), shutdown, and the views the admin API gathers.
import { parentPort, workerData } from 'node:worker_threads';
import { daemonStats } from './admin/stats.ts';
import type { Config } from './config/types.ts';
import type { AdminState } from './backends/backend-states.ts';
import { SharedBackendStates } from './backends/backend-states.ts';
import type { BackendUpdate } from './backends/directory.ts';
import { Daemon, type PreparedReload } from './daemon.ts';
import { SharedClientTable } from './governance/client-table.ts';
import { CountIndexes, SharedCounts } from './governance/shared-counts.ts';
import { BindError, type SharedState } from './listener/listener.ts';
import { createLogger, type LogFormat, type LogLevel } from './logging/logger.ts';
import { Metrics } from './metrics.ts';

/** What the main thread gives a new thread (structured-cloned; the buffers are shared). */
export interface ThreadData {
  readonly smartproxyThread: true;
  readonly thread: number;
  readonly threads: number;
  readonly counts: SharedArrayBuffer;
  readonly clients: SharedArrayBuffer;
  readonly backends: SharedArrayBuffer;
  readonly maxTrackedIps: number;
  readonly logLevel: LogLevel;
  readonly logFormat: LogFormat;
}

export type Ports = Array<{ listener: string; address: string; port: number }>;

/** Requests from the main thread; each gets one reply with the same id. */
export type ThreadRequest =
  | { readonly id: number; readonly type: 'start'; readonly config: Config; readonly backends: BackendUpdate; readonly ports: Ports }
  | { readonly id: number; readonly type: 'prepare'; readonly config: Config; readonly backends: BackendUpdate; readonly ports: Ports }
  | { readonly id: number; readonly type: 'backends'; readonly update: BackendUpdate }
  | { readonly id: number; readonly type: 'backend-state'; readonly indexes: readonly number[]; readonly state: AdminState }
  | { readonly id: number; readonly type: 'commit'; readonly logLevel?: LogLevel }
  | { readonly id: number; readonly type: 'abort' }
  | { readonly id: number; readonly type: 'shutdown'; readonly drainTimeoutMs: number; readonly immediate: boolean }
  | { readonly id: number; readonly type: 'metrics' }
  | { readonly id: number; readonly type: 'stats' }
  | { readonly id: number; readonly type: 'connections'; readonly limit: number };

/** A failure sent back as data: a BindError keeps what the main thread reports. */
export interface ThreadError {
  readonly message: string;
  readonly code?: string;
  readonly listener?: string;
  readonly address?: string;
  readonly bind: boolean;
}

export async function runThread(): Promise<void> {
  const data = workerData as ThreadData;
  const port = parentPort!;
  const log = createLogger({ level: data.logLevel, format: data.logFormat, base: { thread: data.thread } });
  const metrics = new Metrics({ role: 'thread' });
  let daemon: Daemon | null = null;
  let prepared: PreparedReload | null = null;

  const reply = (id: number, body: Record<string, unknown>): void => port.postMessage({ id, ...body });
  const failure = (err: unknown): ThreadError =>
    err instanceof BindError
      ? { message: err.message, code: err.code, listener: err.listener, address: err.address, bind: true }
      : { message: err instanceof Error ? err.message : String(err), code: (err as NodeJS.ErrnoException).code, bind: false };

  port.on('message', (request: ThreadRequest) => {
    void handle(request).catch((err: unknown) => reply(request.id, { ok: false, error: failure(err) }));
  });

  async function handle(request: ThreadRequest): Promise<void> {
    switch (request.type) {
      case 'start': {
        const shared: SharedState = {
          counts: new SharedCounts(data.counts),
          backends: new SharedBackendStates(data.backends),
          clients: new SharedClientTable({ maxTrackedIps: data.maxTrackedIps, buffer: data.clients }),
          indexes: new CountIndexes(request.backends.indexes),
          thread: data.thread,
          threads: data.threads,
        };
        const portFor = portLookup(request.ports);
        daemon = await Daemon.start(request.config, log, { metrics, shared, bind: { reusePort: data.threads > 1, portFor }, backends: request.backends });
        return reply(request.id, { ok: true, ports: daemon.boundPorts() });
      }
      case 'prepare': {
        const d = daemon!;
        d.setPortLookup(portLookup(request.ports));
        prepared = await d.prepare(request.config, request.backends);
        return reply(request.id, { ok: true, ports: d.boundPorts(prepared) });
      }
      case 'commit': {
        const result = daemon!.commit(prepared!);
        prepared = null;
        if (request.logLevel !== undefined) log.level = request.logLevel;
        return reply(request.id, { ok: true, result });
      }
      case 'abort': {
        const pending = prepared;
        prepared = null; // before the await: a second request must not abort it again
        if (pending !== null) await daemon!.abort(pending);
        return reply(request.id, { ok: true });
      }
      case 'shutdown': {
        const pending = prepared;
        prepared = null;
        if (pending !== null) await daemon!.abort(pending);
        const result = await daemon!.shutdown({ drainTimeoutMs: request.drainTimeoutMs, immediate: request.immediate });
        return reply(request.id, { ok: true, result });
      }
      case 'metrics':
        return reply(request.id, { ok: true, metrics: await metrics.registry.getMetricsAsJSON() });
      case 'stats':
        return reply(request.id, { ok: true, stats: daemonStats(daemon!) });
      case 'connections': {
        const now = Date.now();
        const list = [];
        for (const conn of daemon!.registry.values()) {
          if (list.length >= request.limit) break;
          list.push(conn.describe(now));
        }
        return reply(request.id, { ok: true, total: daemon!.registry.size, connections: list });
      }
      case 'backends':
        daemon!.applyBackendUpdate(request.update);
        return reply(request.id, { ok: true });
      case 'backend-state':
        daemon!.backendStateChanged(request.indexes, request.state);
        return reply(request.id, { ok: true });
    }
  }
}

function portLookup(ports: Ports): (listener: string, address: string) => number | undefined {
  const byAddress = new Map(ports.map((p) => [`${p.listener}\u0000${p.address}`, p.port]));
  return (listener, address) => byAddress.get(`${listener}\u0000${address}`);
}
