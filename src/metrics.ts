// Prometheus metrics. Counters the hot path bumps are cached per label set (no label hashing per
// connection); gauges are read at scrape time from the owners of the numbers (registry size,
// listener queues), never kept as parallel counters that could drift.
// Label cardinality is bounded by the config: listener, route, backend, reason. Never a client IP.
import { readFileSync } from 'node:fs';
import client from 'prom-client';
import type { Connection } from './connection/connection.ts';
import { isRejection, type CloseReason, type RejectReason } from './connection/reasons.ts';

declare const SMARTPROXY_VERSION: string | undefined;
/** Set by esbuild in the bundle; read from package.json when running from source. */
export const VERSION: string = typeof SMARTPROXY_VERSION === 'string' ? SMARTPROXY_VERSION : packageVersion();

function packageVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? '0.0.0-dev';
  } catch {
    return '0.0.0-dev';
  }
}

/** What the metrics read at scrape time. */
export interface MetricsSource {
  listeners(): Iterable<{
    readonly name: string;
    readonly busy: number;
    readonly queue: { readonly size: number };
    readonly clients: { readonly size: number };
  }>;
  connections(): Iterable<Connection>;
}

const DURATION_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400];

export class Metrics {
  readonly registry = new client.Registry();
  private source: MetricsSource | null = null;
  private readonly acceptedTotal: client.Counter<'listener'>;
  private readonly routedTotal: client.Counter<'listener' | 'route'>;
  private readonly rejectionsTotal: client.Counter<'listener' | 'reason'>;
  private readonly closedTotal: client.Counter<'listener' | 'reason'>;
  private readonly backendFailuresTotal: client.Counter<'listener' | 'route' | 'backend' | 'code'>;
  private readonly duration: client.Histogram<'listener'>;
  private readonly reloadsTotal: client.Counter<'result'>;
  private readonly lastReload: client.Gauge;
  /** Bytes of connections already closed, per listener/route/direction; live ones are added at scrape. */
  private readonly closedBytes = new Map<string, number>();
  private readonly children = new Map<string, client.Counter.Internal>();

  constructor(opts: { defaultMetrics?: boolean } = {}) {
    const registers = [this.registry];
    if (opts.defaultMetrics !== false) client.collectDefaultMetrics({ register: this.registry, prefix: 'smartproxy_' });
    const self = this;
    new client.Gauge({
      name: 'smartproxy_build_info',
      help: 'Always 1; labels carry the version of smartproxy and of Node.js.',
      labelNames: ['version', 'node'],
      registers,
      collect() {
        this.set({ version: VERSION, node: process.versions.node }, 1);
      },
    });
    this.acceptedTotal = new client.Counter({
      name: 'smartproxy_connections_accepted_total',
      help: 'Connections admitted at accept (started or queued), per listener.',
      labelNames: ['listener'],
      registers,
    });
    this.routedTotal = new client.Counter({
      name: 'smartproxy_route_connections_total',
      help: 'Connections that chose a route, per listener and route.',
      labelNames: ['listener', 'route'],
      registers,
    });
    this.rejectionsTotal = new client.Counter({
      name: 'smartproxy_rejections_total',
      help: 'Connections refused, per listener and reason.',
      labelNames: ['listener', 'reason'],
      registers,
    });
    this.closedTotal = new client.Counter({
      name: 'smartproxy_connections_closed_total',
      help: 'Admitted connections that ended, per listener and reason (refusals after admission included).',
      labelNames: ['listener', 'reason'],
      registers,
    });
    this.backendFailuresTotal = new client.Counter({
      name: 'smartproxy_backend_connect_failures_total',
      help: 'Failed backend connection attempts, per backend and error code.',
      labelNames: ['listener', 'route', 'backend', 'code'],
      registers,
    });
    this.duration = new client.Histogram({
      name: 'smartproxy_connection_duration_seconds',
      help: 'Lifetime of relayed connections, from admission to close.',
      labelNames: ['listener'],
      buckets: DURATION_BUCKETS,
      registers,
    });
    this.reloadsTotal = new client.Counter({
      name: 'smartproxy_config_reloads_total',
      help: 'Configuration reloads by result.',
      labelNames: ['result'],
      registers,
    });
    this.lastReload = new client.Gauge({
      name: 'smartproxy_config_last_reload_timestamp_seconds',
      help: 'When the configuration was last loaded successfully (start or reload).',
      registers,
    });
    new client.Gauge({
      name: 'smartproxy_connections_active',
      help: 'Open connections (queued included), per listener and route ("" before routing).',
      labelNames: ['listener', 'route'],
      registers,
      collect() {
        this.reset();
        for (const conn of self.source?.connections() ?? []) {
          this.inc({ listener: conn.owner.name, route: conn.route?.name ?? '' });
        }
      },
    });
    new client.Counter({
      name: 'smartproxy_bytes_total',
      help: 'Bytes relayed, per listener, route and direction (from_client, from_backend); live connections included.',
      labelNames: ['listener', 'route', 'direction'],
      registers,
      collect() {
        this.reset();
        for (const [key, value] of self.closedBytes) {
          const [listener, route, direction] = key.split('\0') as [string, string, string];
          this.inc({ listener, route, direction }, value);
        }
        for (const conn of self.source?.connections() ?? []) {
          if (conn.route === null) continue;
          const labels = { listener: conn.owner.name, route: conn.route.name };
          if (conn.bytesFromClient > 0) this.inc({ ...labels, direction: 'from_client' }, conn.bytesFromClient);
          if (conn.bytesFromBackend > 0) this.inc({ ...labels, direction: 'from_backend' }, conn.bytesFromBackend);
        }
      },
    });
    new client.Gauge({
      name: 'smartproxy_workers_busy',
      help: 'Worker slots in use, per listener.',
      labelNames: ['listener'],
      registers,
      collect() {
        this.reset();
        for (const l of self.source?.listeners() ?? []) this.set({ listener: l.name }, l.busy);
      },
    });
    new client.Gauge({
      name: 'smartproxy_queue_depth',
      help: 'Connections waiting for a worker slot, per listener.',
      labelNames: ['listener'],
      registers,
      collect() {
        this.reset();
        for (const l of self.source?.listeners() ?? []) this.set({ listener: l.name }, l.queue.size);
      },
    });
    new client.Gauge({
      name: 'smartproxy_tracked_clients',
      help: 'Entries in the per-client table (concurrency and rate windows), per listener.',
      labelNames: ['listener'],
      registers,
      collect() {
        this.reset();
        for (const l of self.source?.listeners() ?? []) this.set({ listener: l.name }, l.clients.size);
      },
    });
  }

  attach(source: MetricsSource): void {
    this.source = source;
  }

  private child(counter: client.Counter<string>, key: string, labels: Record<string, string>): client.Counter.Internal {
    let child = this.children.get(key);
    if (child === undefined) {
      child = counter.labels(labels);
      this.children.set(key, child);
    }
    return child;
  }

  accepted(listener: string): void {
    this.child(this.acceptedTotal, `a\0${listener}`, { listener }).inc();
  }

  routed(listener: string, route: string): void {
    this.child(this.routedTotal, `r\0${listener}\0${route}`, { listener, route }).inc();
  }

  rejected(listener: string, reason: RejectReason): void {
    this.child(this.rejectionsTotal, `j\0${listener}\0${reason}`, { listener, reason }).inc();
  }

  backendFailed(listener: string, route: string, backend: string, code: string): void {
    this.backendFailuresTotal.inc({ listener, route, backend, code });
  }

  /** Once per admitted connection, from the single release point. */
  closed(conn: Connection, reason: CloseReason): void {
    const listener = conn.owner.name;
    this.child(this.closedTotal, `c\0${listener}\0${reason}`, { listener, reason }).inc();
    if (conn.route === null) return;
    const base = `${listener}\0${conn.route.name}\0`;
    if (conn.bytesFromClient > 0) this.addBytes(`${base}from_client`, conn.bytesFromClient);
    if (conn.bytesFromBackend > 0) this.addBytes(`${base}from_backend`, conn.bytesFromBackend);
    if (!isRejection(reason)) this.duration.observe({ listener }, (Date.now() - conn.acceptedAt) / 1000);
  }

  private addBytes(key: string, n: number): void {
    this.closedBytes.set(key, (this.closedBytes.get(key) ?? 0) + n);
  }

  reloaded(ok: boolean): void {
    this.reloadsTotal.inc({ result: ok ? 'success' : 'failure' });
    if (ok) this.lastReload.setToCurrentTime();
  }

  /** The text exposition for GET /metrics. */
  exposition(): Promise<string> {
    return this.registry.metrics();
  }
}
