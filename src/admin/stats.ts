// GET /stats: the daemon's state as JSON (also what `smartproxy status` prints).
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
}

export interface DaemonStats {
  readonly version: string;
  readonly pid: number;
  readonly uptimeSeconds: number;
  readonly accepting: boolean;
  readonly active: number;
  readonly maxConnections: number;
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
      queued: listener.queue.size,
      active: listener.activeCount(),
      trackedClients: listener.clients.size,
      rejections: listener.rejections.totals(),
      routes: gen.config.routes.map((r) => ({ name: r.name, active: listener.routeActive.get(r.name) ?? 0 })),
      topClients: listener.clients.top(20).map((c) => ({ client: c.key, active: c.active })),
    });
  }
  return {
    version: VERSION,
    pid: process.pid,
    uptimeSeconds: Math.round(process.uptime()),
    accepting: daemon.accepting,
    active: daemon.registry.size,
    maxConnections: daemon.config.limits.maxConnections,
    listeners,
  };
}
