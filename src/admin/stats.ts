// GET /stats: the daemon's state as JSON (also what `smartproxy status` prints). Counts are read
// from the shared counts, so they cover every event-loop thread; `rejections` and the top-level
// `active` are this thread's own (the main thread sums them over threads: event-loops.ts).
import type { Daemon } from '../daemon.ts';
import { VERSION } from '../metrics.ts';

export interface ListenerStats {
  readonly name: string;
  readonly bind: string[];
  readonly draining: boolean;
  readonly workers: number;
  readonly busy: number;
  readonly queue: number;
  readonly queued: number;
  readonly active: number;
  readonly trackedClients: number;
  readonly rejections: Record<string, number>;
  readonly routes: Array<{ readonly name: string; readonly active: number }>;
  readonly topClients: Array<{ readonly client: string; readonly active: number }>;
  // Optional: absent from the answers of daemons older than these fields (`status` reads any).
  /** Clients holding at least one connection (the per-client table's own count, the fair-share divisor). */
  readonly activeClients?: number;
  /** Connections counted on a route, routes a reload removed included (`routes` lists the current ones only). */
  readonly routedActive?: number;
}

export interface DaemonStats {
  readonly version: string;
  readonly pid: number;
  readonly uptimeSeconds: number;
  readonly accepting: boolean;
  readonly active: number;
  readonly maxConnections: number;
  /** Worker slots taken from the process-wide pool (`limits.max_connections`) by every thread. */
  readonly slotsBusy?: number | null;
  /** Event-loop threads (`[process] threads`); absent from an in-process daemon. */
  readonly threads?: number;
  /**
   * [cluster]: the store's mode (with threads: `degraded` when any event loop is) and the
   * connections holding a cluster-wide count. Absent without [cluster].
   */
  readonly cluster?: { readonly mode: 'ok' | 'degraded'; readonly leases: number };
  readonly listeners: ListenerStats[];
}

export function daemonStats(daemon: Daemon): DaemonStats {
  const listeners: ListenerStats[] = [];
  for (const listener of daemon.allListeners()) {
    const gen = listener.generation;
    listeners.push({
      name: listener.name,
      bind: listener.boundAddresses,
      draining: listener.draining,
      workers: gen.config.workers,
      busy: listener.busy,
      queue: gen.config.queue,
      queued: listener.queued,
      active: daemon.shared.counts.open(listener.countIndex),
      trackedClients: listener.clients.size,
      rejections: listener.rejections.totals(),
      routes: gen.config.routes.map((r) => ({ name: r.name, active: listener.routeActive.get(r.name) ?? 0 })),
      topClients: listener.clients.top(20).map((c) => ({ client: c.key, active: c.active })),
      activeClients: listener.clients.distinctActive,
      routedActive: [...listener.routeActive.values()].reduce((sum, n) => sum + n, 0),
    });
  }
  return {
    version: VERSION,
    pid: process.pid,
    uptimeSeconds: Math.round(process.uptime()),
    accepting: daemon.accepting,
    active: daemon.registry.size,
    maxConnections: daemon.config.limits.maxConnections,
    slotsBusy: daemon.slotsBusy,
    ...(daemon.cluster.mode === 'off' ? {} : { cluster: { mode: daemon.cluster.mode, leases: daemon.cluster.leases } }),
    listeners,
  };
}
