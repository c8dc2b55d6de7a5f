// Prometheus metrics. Counters the hot path bumps are cached per label set (no label hashing per
// connection); gauges are read at scrape time from the owners of the numbers (registry size,
// listener queues), never kept as parallel counters that could drift.
// Label cardinality is bounded by the config: listener, route, backend, reason. Never a client IP.
// Every series an alert needs exists from start-up at 0 (each listener's counters for every reason,
// its routes' active gauges): a series that appears with its first event hides that event from
// `increase()`. The zeros are filled at scrape time from the listeners in force, so a listener a
// reload adds has them at once and one whose reload was aborted never appears.
import { readFileSync } from 'node:fs';
import client from 'prom-client';
import type { Connection } from './connection/connection.ts';
import type { ClusterMetrics, ClusterMode } from './cluster/cluster.ts';
import { STORE_ERROR_KINDS, type StoreErrorKind } from './cluster/store.ts';
import { END_REASONS, isRejection, REJECT_REASONS, type CloseReason, type RejectReason } from './connection/reasons.ts';

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

/** One listener as the metrics read it at scrape time. */
export interface ListenerSource {
  readonly name: string;
  /** Shared over every thread, like `queued` and `clients.size`. */
  readonly busy: number;
  readonly queued: number;
  readonly clients: { readonly size: number };
  /** The generation new connections get: configured capacity and routes. */
  readonly generation: {
    readonly config: { readonly workers: number; readonly queue: number; readonly routes: ReadonlyArray<{ readonly name: string }> };
  };
}

/** What the metrics read at scrape time. */
export interface MetricsSource {
  /** Listeners in force first, then those a reload removed that are still draining. */
  listeners(): Iterable<ListenerSource>;
  connections(): Iterable<Connection>;
  /** Process-wide capacity in force: `limits.max_connections` (0 = unlimited) and the per-client table's size. */
  capacity(): { readonly maxConnections: number; readonly maxTrackedIps: number };
  /** [cluster] of this event loop. */
  clusterMode?(): ClusterMode;
  /** Every backend of the routes in force, with its shared state read now. */
  backends(): Iterable<BackendSource>;
}

export interface BackendSource {
  readonly listener: string;
  readonly route: string;
  readonly backend: string;
  /** Active checks find it up and it is not passively ejected. */
  readonly up: boolean;
  readonly active: number;
}

/** Every reason a connection of a listener can end with (refusals after admission included). */
const CLOSE_REASONS: readonly CloseReason[] = [...REJECT_REASONS, ...END_REASONS];

/**
 * prom-client's default gauges whose names end in `_total`, which the exposition format reserves
 * for counters (`promtool check metrics` fails on them). Each is the sum over `type` of the gauge
 * of the same name without the suffix (`nodejs_active_handles{type}`...), so nothing is lost.
 */
const MISNAMED_DEFAULTS = ['smartproxy_nodejs_active_handles_total', 'smartproxy_nodejs_active_requests_total', 'smartproxy_nodejs_active_resources_total'];

const CONNECT_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];
/** Store round trips: the default timeout is 20 ms, loopback answers in ~0.1 ms. */
const STORE_LATENCY_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1];
const CLUSTER_MODES: readonly ClusterMode[] = ['off', 'ok', 'degraded'];

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
  private readonly backendEjectionsTotal: client.Counter<'listener' | 'route' | 'backend'>;
  private readonly connectTime: client.Histogram<'listener' | 'route'>;
  private readonly healthChecksTotal: client.Counter<'backend' | 'result'>;
  private readonly reloadsTotal: client.Counter<'result'>;
  private readonly lastReload: client.Gauge;
  private readonly lastReloadSuccess: client.Gauge;
  private readonly families: Families;
  /** [cluster]: store latency and errors, fed by cluster/cluster.ts. */
  readonly cluster: ClusterMetrics;
  /** Per listener name; kept across reloads so counters never restart. */
  private readonly listenerViews = new Map<string, ListenerMetrics>();

  /**
   * `role`: 'all' in a daemon that is the process's only event loop (tests); with threads, the
   * main thread is 'process' (build info, reloads, Node's process metrics) and each event-loop
   * thread 'thread' (connections). The main thread sums the threads' series at scrape time
   * (prom-client's AggregatorRegistry): one message per thread per scrape, none per connection.
   * Gauges read from the shared counts or from the config are the same in every thread and
   * aggregate by max; counters (their zeros included) and `connections_active` (each thread's own
   * connections) sum.
   */
  constructor(opts: { defaultMetrics?: boolean; role?: 'all' | 'process' | 'thread' } = {}) {
    const role = opts.role ?? 'all';
    /** Process-wide series: build info, reloads, Node's process metrics. */
    const processRegisters = role === 'thread' ? [] : [this.registry];
    /** Connection series: in each event loop (the main thread of a threaded daemon has none). */
    const registers = role === 'process' ? [] : [this.registry];
    if (opts.defaultMetrics !== false && role !== 'thread') {
      client.collectDefaultMetrics({ register: this.registry, prefix: 'smartproxy_' });
      for (const name of MISNAMED_DEFAULTS) this.registry.removeSingleMetric(name);
    }
    const self = this;
    new client.Gauge({
      name: 'smartproxy_build_info',
      help: 'Always 1; labels carry the version of smartproxy and of Node.js.',
      labelNames: ['version', 'node'],
      registers: processRegisters,
      aggregator: 'max',
      collect() {
        this.set({ version: VERSION, node: process.versions.node }, 1);
      },
    });
    this.acceptedTotal = new client.Counter({
      name: 'smartproxy_connections_accepted_total',
      help: 'Connections admitted at accept (started or queued), per listener.',
      labelNames: ['listener'],
      registers,
      collect() {
        for (const l of self.listeners()) this.inc({ listener: l.name }, 0);
      },
    });
    this.routedTotal = new client.Counter({
      name: 'smartproxy_route_connections_total',
      help: 'Connections that chose a route, per listener and route.',
      labelNames: ['listener', 'route'],
      registers,
      collect() {
        for (const l of self.listeners()) for (const r of l.generation.config.routes) this.inc({ listener: l.name, route: r.name }, 0);
      },
    });
    this.rejectionsTotal = new client.Counter({
      name: 'smartproxy_rejections_total',
      help: 'Connections refused, per listener and reason.',
      labelNames: ['listener', 'reason'],
      registers,
      collect() {
        for (const l of self.listeners()) for (const reason of REJECT_REASONS) this.inc({ listener: l.name, reason }, 0);
      },
    });
    this.closedTotal = new client.Counter({
      name: 'smartproxy_connections_closed_total',
      help: 'Admitted connections that ended, per listener and reason (refusals after admission included).',
      labelNames: ['listener', 'reason'],
      registers,
      collect() {
        for (const l of self.listeners()) for (const reason of CLOSE_REASONS) this.inc({ listener: l.name, reason }, 0);
      },
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
      collect() {
        for (const l of self.listeners()) self.forListener(l.name).seedDuration();
      },
    });
    this.reloadsTotal = new client.Counter({
      name: 'smartproxy_config_reloads_total',
      help: 'Configuration reloads (start-up not counted) by result.',
      labelNames: ['result'],
      registers: processRegisters,
    });
    this.reloadsTotal.inc({ result: 'success' }, 0);
    this.reloadsTotal.inc({ result: 'failure' }, 0);
    this.lastReload = new client.Gauge({
      name: 'smartproxy_config_last_reload_timestamp_seconds',
      help: 'When the configuration was last loaded successfully (start or reload).',
      registers: processRegisters,
      aggregator: 'max',
    });
    this.lastReloadSuccess = new client.Gauge({
      name: 'smartproxy_config_last_reload_success',
      help: '1 if the last reload succeeded (or none was tried since start-up), 0 if it failed and the previous configuration stays in force.',
      registers: processRegisters,
      aggregator: 'max',
    });
    this.backendEjectionsTotal = new client.Counter({
      name: 'smartproxy_backend_ejections_total',
      help: 'Passive ejections (consecutive connect failures), per backend.',
      labelNames: ['listener', 'route', 'backend'],
      registers,
      collect() {
        for (const b of self.source?.backends() ?? []) this.inc({ listener: b.listener, route: b.route, backend: b.backend }, 0);
      },
    });
    this.connectTime = new client.Histogram({
      name: 'smartproxy_backend_connect_seconds',
      help: 'Time from the start of a backend dial to its TCP connect, per route (failed dials not included).',
      labelNames: ['listener', 'route'],
      buckets: CONNECT_BUCKETS,
      registers,
    });
    this.healthChecksTotal = new client.Counter({
      name: 'smartproxy_backend_health_checks_total',
      help: 'Active health checks run, per backend address and result (ok, failed).',
      labelNames: ['backend', 'result'],
      registers: processRegisters,
    });
    new client.Gauge({
      name: 'smartproxy_backend_up',
      help: '1 when the backend takes new connections by health (active checks find it up and it is not passively ejected), else 0; the runtime state is in /stats.',
      labelNames: ['listener', 'route', 'backend'],
      registers,
      aggregator: 'max',
      collect() {
        this.reset();
        for (const b of self.source?.backends() ?? []) this.set({ listener: b.listener, route: b.route, backend: b.backend }, b.up ? 1 : 0);
      },
    });
    new client.Gauge({
      name: 'smartproxy_backend_connections_active',
      help: 'Connections to the backend (dialling or relaying), over every thread.',
      labelNames: ['listener', 'route', 'backend'],
      registers,
      aggregator: 'max',
      collect() {
        this.reset();
        for (const b of self.source?.backends() ?? []) this.set({ listener: b.listener, route: b.route, backend: b.backend }, b.active);
      },
    });
    const storeLatency = new client.Histogram({
      name: 'smartproxy_cluster_store_latency_seconds',
      help: '[cluster]: round trip of each admission asked of the store (answered calls only; failures count in smartproxy_cluster_store_errors_total).',
      buckets: STORE_LATENCY_BUCKETS,
      registers,
    });
    const storeErrors = new client.Counter<'kind'>({
      name: 'smartproxy_cluster_store_errors_total',
      help: '[cluster]: failed store calls and connection failures, by kind.',
      labelNames: ['kind'],
      registers,
    });
    for (const kind of STORE_ERROR_KINDS) storeErrors.inc({ kind }, 0);
    this.cluster = {
      storeLatency: (seconds: number) => storeLatency.observe(seconds),
      storeError: (kind: StoreErrorKind) => storeErrors.inc({ kind }),
    };
    new client.Gauge<'mode'>({
      name: 'smartproxy_cluster_mode',
      help: '[cluster]: event loops whose store is in this mode (off = no [cluster]; degraded = on_store_failure applies).',
      labelNames: ['mode'],
      registers,
      collect() {
        const current = self.source?.clusterMode?.() ?? 'off';
        for (const mode of CLUSTER_MODES) this.set({ mode }, mode === current ? 1 : 0);
      },
    });
    this.families = {
      accepted: this.acceptedTotal,
      routed: this.routedTotal,
      rejections: this.rejectionsTotal,
      closed: this.closedTotal,
      backendFailures: this.backendFailuresTotal,
      backendEjections: this.backendEjectionsTotal,
      connectTime: this.connectTime,
      duration: this.duration,
    };
    new client.Gauge({
      name: 'smartproxy_connections_active',
      help: 'Open connections (queued included), per listener and route ("" before routing).',
      labelNames: ['listener', 'route'],
      registers,
      collect() {
        this.reset();
        for (const l of self.listeners()) {
          this.set({ listener: l.name, route: '' }, 0);
          for (const r of l.generation.config.routes) this.set({ listener: l.name, route: r.name }, 0);
        }
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
        for (const view of self.listenerViews.values()) {
          for (const [route, bytes] of view.closedBytes) {
            if (bytes.fromClient > 0) this.inc({ listener: view.name, route, direction: 'from_client' }, bytes.fromClient);
            if (bytes.fromBackend > 0) this.inc({ listener: view.name, route, direction: 'from_backend' }, bytes.fromBackend);
          }
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
      aggregator: 'max',
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
      aggregator: 'max',
      collect() {
        this.reset();
        for (const l of self.source?.listeners() ?? []) this.set({ listener: l.name }, l.queued);
      },
    });
    new client.Gauge({
      name: 'smartproxy_tracked_clients',
      help: 'Entries in the per-client table (concurrency and rate windows), per listener.',
      labelNames: ['listener'],
      registers,
      aggregator: 'max',
      collect() {
        this.reset();
        for (const l of self.source?.listeners() ?? []) this.set({ listener: l.name }, l.clients.size);
      },
    });
    new client.Gauge({
      name: 'smartproxy_listener_workers',
      help: 'Configured worker slots (workers), per listener: the capacity smartproxy_workers_busy fills.',
      labelNames: ['listener'],
      registers,
      aggregator: 'max',
      collect() {
        this.reset();
        for (const l of self.listenersByName()) this.set({ listener: l.name }, l.generation.config.workers);
      },
    });
    new client.Gauge({
      name: 'smartproxy_listener_queue_size',
      help: 'Configured queue places (queue), per listener: the capacity smartproxy_queue_depth fills; 0 = no queue.',
      labelNames: ['listener'],
      registers,
      aggregator: 'max',
      collect() {
        this.reset();
        for (const l of self.listenersByName()) this.set({ listener: l.name }, l.generation.config.queue);
      },
    });
    new client.Gauge({
      name: 'smartproxy_max_connections',
      help: 'Worker slots of all listeners together (limits.max_connections); 0 = unlimited.',
      registers,
      aggregator: 'max',
      collect() {
        const capacity = self.source?.capacity();
        if (capacity !== undefined) this.set(capacity.maxConnections);
      },
    });
    new client.Gauge({
      name: 'smartproxy_max_tracked_ips',
      help: 'Entries the process-wide per-client table holds (limits.max_tracked_ips, start-only): the capacity the sum of smartproxy_tracked_clients over listeners fills.',
      registers,
      aggregator: 'max',
      collect() {
        const capacity = self.source?.capacity();
        if (capacity !== undefined) this.set(capacity.maxTrackedIps);
      },
    });
  }

  /** Every listener with connections: those in force and those draining after a reload removed them. */
  private listeners(): Iterable<ListenerSource> {
    return this.source?.listeners() ?? [];
  }

  /**
   * Each listener name once, the one in force first: a removed listener still draining under a
   * name a later reload reused does not report its old capacity.
   */
  private *listenersByName(): Iterable<ListenerSource> {
    const seen = new Set<string>();
    for (const l of this.listeners()) {
      if (seen.has(l.name)) continue;
      seen.add(l.name);
      yield l;
    }
  }

  attach(source: MetricsSource): void {
    this.source = source;
  }

  /** The hot-path view for one listener: label children resolved once, not per connection. */
  forListener(listener: string): ListenerMetrics {
    let view = this.listenerViews.get(listener);
    if (view === undefined) {
      view = new ListenerMetrics(listener, this.families);
      this.listenerViews.set(listener, view);
    }
    return view;
  }

  /** One active health check ended (counted where the checks run: the config owner). */
  healthChecked(backend: string, ok: boolean): void {
    this.healthChecksTotal.inc({ backend, result: ok ? 'ok' : 'failed' });
  }

  /** The first config is in force (start-up): not a reload, but the config's load time. */
  started(): void {
    this.lastReloadSuccess.set(1);
    this.lastReload.setToCurrentTime();
  }

  /** A reload (SIGHUP) ended: counted by result. */
  reloaded(ok: boolean): void {
    this.reloadsTotal.inc({ result: ok ? 'success' : 'failure' });
    this.lastReloadSuccess.set(ok ? 1 : 0);
    if (ok) this.lastReload.setToCurrentTime();
  }

  /** The text exposition for GET /metrics. */
  exposition(): Promise<string> {
    return this.registry.metrics();
  }
}

interface Families {
  readonly accepted: client.Counter<'listener'>;
  readonly routed: client.Counter<'listener' | 'route'>;
  readonly rejections: client.Counter<'listener' | 'reason'>;
  readonly closed: client.Counter<'listener' | 'reason'>;
  readonly backendFailures: client.Counter<'listener' | 'route' | 'backend' | 'code'>;
  readonly backendEjections: client.Counter<'listener' | 'route' | 'backend'>;
  readonly connectTime: client.Histogram<'listener' | 'route'>;
  readonly duration: client.Histogram<'listener'>;
}

/** One listener's counters, with label children cached so an accept or close hashes no labels. */
export class ListenerMetrics {
  /** Bytes of connections already closed, per route; live ones are added at scrape time. */
  readonly closedBytes = new Map<string, { fromClient: number; fromBackend: number }>();
  private readonly acceptedChild: client.Counter.Internal;
  private readonly durationChild: client.Histogram.Internal<'listener'>;
  private readonly rejectedChildren = new Map<string, client.Counter.Internal>();
  private readonly closedChildren = new Map<string, client.Counter.Internal>();
  private readonly routedChildren = new Map<string, client.Counter.Internal>();
  private readonly connectTimeChildren = new Map<string, client.Histogram.Internal<'listener' | 'route'>>();
  /** True once the duration histogram has this listener's series (observed, or zeroed at a scrape). */
  private durationSeeded = false;

  constructor(
    readonly name: string,
    private readonly families: Families,
  ) {
    this.acceptedChild = families.accepted.labels({ listener: name });
    this.durationChild = families.duration.labels({ listener: name });
  }

  accepted(): void {
    this.acceptedChild.inc();
  }

  /**
   * The duration histogram's series at 0 before the first observation (called at scrape time).
   * Only then: prom-client's zero() would wipe what was observed.
   */
  seedDuration(): void {
    if (this.durationSeeded) return;
    this.durationSeeded = true;
    this.families.duration.zero({ listener: this.name });
  }

  routed(route: string): void {
    let child = this.routedChildren.get(route);
    if (child === undefined) {
      child = this.families.routed.labels({ listener: this.name, route });
      this.routedChildren.set(route, child);
    }
    child.inc();
  }

  rejected(reason: RejectReason): void {
    let child = this.rejectedChildren.get(reason);
    if (child === undefined) {
      child = this.families.rejections.labels({ listener: this.name, reason });
      this.rejectedChildren.set(reason, child);
    }
    child.inc();
  }

  backendFailed(route: string, backend: string, code: string): void {
    this.families.backendFailures.inc({ listener: this.name, route, backend, code });
  }

  backendEjected(route: string, backend: string): void {
    this.families.backendEjections.inc({ listener: this.name, route, backend });
  }

  /** A dial connected after `ms`. */
  backendConnected(route: string, ms: number): void {
    let child = this.connectTimeChildren.get(route);
    if (child === undefined) {
      child = this.families.connectTime.labels({ listener: this.name, route });
      this.connectTimeChildren.set(route, child);
    }
    child.observe(ms / 1000);
  }

  /** Once per admitted connection, from the single release point. */
  closed(conn: Connection, reason: CloseReason): void {
    let child = this.closedChildren.get(reason);
    if (child === undefined) {
      child = this.families.closed.labels({ listener: this.name, reason });
      this.closedChildren.set(reason, child);
    }
    child.inc();
    if (conn.route === null) return;
    let bytes = this.closedBytes.get(conn.route.name);
    if (bytes === undefined) {
      bytes = { fromClient: 0, fromBackend: 0 };
      this.closedBytes.set(conn.route.name, bytes);
    }
    bytes.fromClient += conn.bytesFromClient;
    bytes.fromBackend += conn.bytesFromBackend;
    if (!isRejection(reason)) {
      this.durationSeeded = true;
      this.durationChild.observe((Date.now() - conn.acceptedAt) / 1000);
    }
  }
}
