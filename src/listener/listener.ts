// One configured listener: its listening sockets, its worker slots and queue, its per-client
// table. It outlives config generations: a reload swaps `generation` (routes, limits, timeouts)
// and keeps the sockets, the counts and the queue.
//
// Accept path, one call per arrow:
//   socket -> admit (draining, firewall, per-client, fair share) -> new Connection
//          -> slot free ? start() : queue (FIFO, queue_timeout) -> ... -> close(reason)
//          -> connectionClosed: release slot, client count, route count -> slots.handOver (a loop)
//
// Listener states: ready <-> full (all workers busy or the global pool exhausted: new connections
// queue) -> draining (removed or shutting down: accepts nothing, established ones finish).
import net from 'node:net';
import type { HostPort, OnRemoval } from '../config/types.ts';
import { Connection, type ConnectionState } from '../connection/connection.ts';
import { isRejection, type CloseReason, type RejectReason } from '../connection/reasons.ts';
import type { Registry } from '../connection/registry.ts';
import { ClientTable } from '../governance/client-table.ts';
import { clientKey } from '../governance/client-key.ts';
import { fairShareRefuses } from '../governance/fair-share.ts';
import { RejectionLog } from '../governance/rejection-log.ts';
import type { Logger } from '../logging/logger.ts';
import type { ListenerMetrics, Metrics } from '../metrics.ts';
import type { ListenerGeneration } from './listener-generation.ts';
import type { SlotPool, SlotWaiter } from './slot-pool.ts';

export class BindError extends Error {
  readonly code: string;
  constructor(
    readonly listener: string,
    readonly address: string,
    cause: NodeJS.ErrnoException,
  ) {
    super(`listener "${listener}": cannot bind ${address}: ${cause.code ?? cause.message}`);
    this.code = cause.code ?? 'EBIND';
  }
}

export interface ListenerDeps {
  readonly registry: Registry;
  readonly slots: SlotPool;
  readonly log: Logger;
  readonly metrics: Metrics;
  readonly maxTrackedIps: number;
  readonly rejectionSummaryIntervalMs: number;
}

export class Listener implements SlotWaiter {
  readonly name: string;
  generation: ListenerGeneration;
  /** Worker slots in use by this listener's connections. */
  busy = 0;
  /** Connections waiting for a slot, oldest first (a Set keeps insertion order and deletes in O(1)). */
  readonly queue = new Set<Connection>();
  readonly clients: ClientTable;
  /** Active connections per route name; survives reloads so route limits stay true. */
  readonly routeActive = new Map<string, number>();
  readonly rejections: RejectionLog;
  /**
   * Routes that reloads removed (by name; a later reload that adds the name back deletes it), so
   * a connection still in its handshake at that reload, routing later through its older
   * generation, gets the removal policy too: refused for "close", closed at `closeAt` for "drain".
   */
  readonly removedRoutes = new Map<string, { readonly policy: OnRemoval; readonly closeAt: number }>();
  draining = false;
  /** Open connections (queued included): +1 right after `new Connection`, -1 in connectionClosed. */
  private open = 0;
  /** Called once a draining listener has no connection left (the daemon disposes it). */
  onIdle: (() => void) | null = null;
  private readonly servers = new Map<string, net.Server>();
  private readonly deps: ListenerDeps;
  private readonly metrics: ListenerMetrics;
  private lastAcceptWarning = 0;
  private suppressedAcceptErrors = 0;
  /** Per backend: when we last warned and how many failures went unlogged since. */
  private readonly backendWarnings = new Map<string, { last: number; suppressed: number }>();

  constructor(generation: ListenerGeneration, deps: ListenerDeps) {
    this.name = generation.name;
    this.generation = generation;
    this.deps = deps;
    this.metrics = deps.metrics.forListener(this.name);
    this.clients = new ClientTable({ maxTrackedIps: deps.maxTrackedIps });
    this.rejections = new RejectionLog({
      listener: this.name,
      intervalMs: deps.rejectionSummaryIntervalMs,
      log: (level, obj, msg) => deps.log[level]({ listener: this.name, ...obj }, msg),
    });
    deps.slots.register(this);
  }

  /** The addresses currently bound, as written in the config. */
  get boundAddresses(): string[] {
    return [...this.servers.keys()];
  }

  /** Binds every address of the generation not bound yet. On failure, nothing new stays bound. */
  async bind(addresses: readonly HostPort[]): Promise<void> {
    const opened: string[] = [];
    try {
      for (const address of addresses) {
        if (this.servers.has(address.text)) continue;
        await this.bindOne(address);
        opened.push(address.text);
      }
    } catch (err) {
      await Promise.all(opened.map((text) => this.unbind(text)));
      throw err;
    }
  }

  private bindOne(address: HostPort): Promise<void> {
    // No `noDelay` here: it would cost a setsockopt on every connection, refused ones included.
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
    return new Promise((resolve, reject) => {
      const onListenError = (err: NodeJS.ErrnoException): void => {
        server.close();
        reject(new BindError(this.name, address.text, err));
      };
      server.once('error', onListenError);
      // ipv6Only as nginx does: `[::]:443` and `0.0.0.0:443` can be bound side by side.
      const backlog = listenBacklog(this.generation.config.workers, this.generation.config.queue);
      server.listen({ host: address.host, port: address.port, backlog, ipv6Only: address.host.includes(':') }, () => {
        server.off('error', onListenError);
        if (this.draining) {
          // Shutdown began while a host name resolved: this socket must not outlive it.
          server.close();
          reject(new BindError(this.name, address.text, Object.assign(new Error('draining'), { code: 'EDRAINING' })));
          return;
        }
        this.adopt(address.text, server);
        resolve();
      });
    });
  }

  /** Takes a listening socket as its own: bound here, or handed over by another listener. */
  adopt(text: string, server: net.Server): void {
    server.removeAllListeners('error');
    server.removeAllListeners('connection');
    server.on('error', (err: NodeJS.ErrnoException) => this.onServerError(err));
    server.on('connection', (socket: net.Socket) => this.accept(socket));
    this.servers.set(text, server);
  }

  /**
   * Gives up a listening socket without closing it, for another listener to adopt in the same
   * tick: an address moved between listeners by a reload never stops accepting (and cannot fail
   * with EADDRINUSE, as binding it anew while this one held it did).
   */
  release(text: string): net.Server | undefined {
    const server = this.servers.get(text);
    this.servers.delete(text);
    return server;
  }

  /**
   * Stops accepting on one address; established connections are untouched. Resolves at once: the
   * listening socket closes synchronously, while net.Server's own close callback would wait for
   * every connection it ever accepted to end.
   */
  unbind(text: string): Promise<void> {
    const server = this.servers.get(text);
    if (server !== undefined) {
      this.servers.delete(text);
      server.close();
    }
    return Promise.resolve();
  }

  /** Stops accepting on every address. */
  async stopAccepting(): Promise<void> {
    await Promise.all([...this.servers.keys()].map((text) => this.unbind(text)));
  }

  /** The port actually bound for an address (tests bind port 0). */
  portOf(text: string): number {
    const address = this.servers.get(text)?.address();
    return typeof address === 'object' && address !== null ? address.port : 0;
  }

  private onServerError(err: NodeJS.ErrnoException): void {
    // EMFILE/ENFILE at accept: the server stays up (libuv sheds the pending connection); warn at
    // most once every 10 s so the log does not become the flood.
    const now = Date.now();
    if (now - this.lastAcceptWarning < 10_000) {
      this.suppressedAcceptErrors++;
      return;
    }
    this.deps.log.warn(
      { listener: this.name, code: err.code, suppressed: this.suppressedAcceptErrors },
      'accept failed; the listener keeps running',
    );
    this.lastAcceptWarning = now;
    this.suppressedAcceptErrors = 0;
  }

  // ---- admission ----

  /** The accept path. Every check happens before anything is counted, so a refusal costs nobody quota. */
  accept(socket: net.Socket): void {
    const gen = this.generation;
    const address = socket.remoteAddress;
    if (address === undefined) {
      socket.on('error', ignoreError);
      socket.destroy(); // already gone
      return;
    }
    const trustedBalancer = gen.proxyTrusted !== null && gen.proxyTrusted.allows(address);
    let key: string | null = null;
    if (this.draining) return this.refuse(socket, address, 'draining');
    // A trusted balancer is judged by the client it names, once its PROXY header arrives.
    if (!trustedBalancer) {
      if (!gen.admitsAddress(address)) return this.refuse(socket, address, 'firewall');
      key = clientKey(address, gen.ipv6Prefix);
      const verdict = this.checkClient(key);
      if (verdict !== null) return this.refuse(socket, address, verdict);
    }
    const slotFree = this.slotFree();
    if (!slotFree && this.queue.size >= gen.config.queue) return this.refuse(socket, address, 'queue_full');

    socket.setNoDelay(true); // a relay forwards what it has at once
    const conn = new Connection(gen, socket, trustedBalancer);
    this.open++;
    if (key !== null) this.holdClient(conn, key);
    this.metrics.accepted();
    if (slotFree) {
      this.takeSlot(conn);
      conn.start();
    } else {
      this.queue.add(conn);
      conn.enqueue(gen.config.queueTimeoutMs);
    }
  }

  /** Per-client concurrency, rate and fair share, in that order; null = admitted. */
  checkClient(key: string): RejectReason | null {
    const gen = this.generation;
    const verdict = this.clients.check(key, gen.config.limits);
    if (verdict !== 'ok') return verdict;
    const capacity = gen.config.workers + gen.config.queue;
    const refused = fairShareRefuses({
      occupancy: this.busy + this.queue.size,
      capacity,
      fairShareAbove: gen.config.limits.fairShareAbove,
      clientActive: this.clients.activeOf(key),
      distinctClients: this.clients.distinctActive,
    });
    return refused ? 'fair_share' : null;
  }

  holdClient(conn: Connection, key: string): void {
    this.clients.acquire(key, this.generation.config.limits);
    conn.clientKey = key;
  }

  private slotFree(): boolean {
    return this.busy < this.generation.config.workers && !this.deps.slots.full;
  }

  private takeSlot(conn: Connection): void {
    conn.holdsSlot = true;
    this.busy++;
    this.deps.slots.busy++;
  }

  /** Refuses before any Connection exists: no byte read, no backend dialled, one RST (or FIN). */
  private refuse(socket: net.Socket, address: string, reason: RejectReason): void {
    socket.on('error', ignoreError);
    if (this.generation.config.reject === 'reset') socket.resetAndDestroy();
    else socket.destroy();
    this.recordRejection(reason, address);
  }

  recordRejection(reason: RejectReason, address: string): void {
    this.rejections.record(reason, address);
    this.metrics.rejected(reason);
  }

  /** SlotWaiter: starts the oldest queued connection if a slot is free. Called by SlotPool.handOver only. */
  promoteOne(): boolean {
    if (!this.slotFree()) return false;
    for (const conn of this.queue) {
      this.queue.delete(conn);
      this.takeSlot(conn);
      conn.start();
      return true;
    }
    return false;
  }

  /** A backend dial failed: counted always, warned at most once per 10 s per backend. */
  backendFailed(conn: Connection, backend: HostPort, code: string): void {
    const route = conn.route?.name ?? '';
    this.metrics.backendFailed(route, backend.text, code);
    const now = Date.now();
    const seen = this.backendWarnings.get(backend.text);
    if (seen !== undefined && now - seen.last < 10_000) {
      seen.suppressed++;
      return;
    }
    this.deps.log.warn(
      { listener: this.name, route, backend: backend.text, code, suppressed: seen?.suppressed ?? 0 },
      'backend connect failed; trying the next one',
    );
    this.backendWarnings.set(backend.text, { last: now, suppressed: 0 });
  }

  routed(route: string): void {
    this.metrics.routed(route);
  }

  // ---- the single release point, called from Connection.close() only ----

  connectionClosed(conn: Connection, reason: CloseReason, before: ConnectionState): void {
    if (before === 'queued') this.queue.delete(conn);
    if (conn.clientKey !== null) {
      this.clients.release(conn.clientKey);
      conn.clientKey = null;
    }
    if (conn.countedRoute !== null) {
      const name = conn.countedRoute.name;
      const left = (this.routeActive.get(name) ?? 1) - 1;
      if (left === 0) this.routeActive.delete(name);
      else this.routeActive.set(name, left);
      conn.countedRoute = null;
    }
    if (isRejection(reason)) this.recordRejection(reason, conn.clientAddress);
    this.metrics.closed(conn, reason);
    const log = this.deps.log;
    if (log.isLevelEnabled('debug')) log.debug({ conn: conn.uniqueId, reason, ...conn.describe() }, 'connection closed');
    if (conn.holdsSlot) {
      conn.holdsSlot = false;
      this.busy--;
      this.deps.slots.busy--;
      this.deps.slots.handOver(this);
    }
    this.open--;
    if (this.open === 0 && this.draining && this.onIdle !== null) {
      const onIdle = this.onIdle;
      this.onIdle = null;
      onIdle();
    }
  }

  /** Closes every connection of this listener now (shutdown past its drain deadline, on_removal = "close"). */
  closeAll(reason: CloseReason): number {
    let closed = 0;
    for (const conn of [...this.deps.registry.values()]) {
      if (conn.owner.listener === this) {
        conn.close(reason);
        closed++;
      }
    }
    return closed;
  }

  /** Connections of this listener still open (queued ones included). */
  activeCount(): number {
    return this.open;
  }

  /** Final teardown once nothing is left: timers of the tables stop. */
  dispose(): void {
    this.deps.slots.unregister(this);
    this.clients.close();
    this.rejections.close();
  }
}

function ignoreError(): void {}

/**
 * The kernel accept queue: at least 4096 and at least the listener's capacity, rather than Node's
 * fixed 511. During a flood the queue fills between two event-loop turns, and a SYN the kernel
 * drops is retried by the client only after a second (measured: p99 of legitimate clients went
 * from ~1 s to ~40 ms). The kernel caps it at net.core.somaxconn, which stays the operator's knob.
 */
export function listenBacklog(workers: number, queue: number): number {
  return Math.min(65535, Math.max(4096, workers + queue));
}
