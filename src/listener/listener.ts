// One configured listener in one event-loop thread: its listening sockets, its queue of this
// thread's waiting connections, and every admission decision about its connections. It outlives
// config generations: a reload swaps `generation` (routes, limits, timeouts) and keeps the
// sockets and the queue. The counts themselves (workers busy, queue places, per-client, routes)
// live in shared memory, the same numbers for every thread (governance/shared-counts.ts).
//
// Admission, every refusal in this file, in the order README documents:
//   accept():          draining -> firewall -> per-client (ip_limit, ip_rate, ip_table_full,
//                      fair_share) -> worker slot, else a queue place (queue_full)
//   admitRealClient(): after a PROXY header (or its absence) from a trusted balancer: firewall
//                      and per-client on the client it names, or on the balancer itself
//   admitRoute():      after SNI: removed route, route firewall, route limit
// With [cluster], once every local check has passed and its counts are taken, the cluster-wide
// per-client checks (cluster/cluster.ts): cluster_ip_limit, cluster_ip_rate, cluster_unavailable.
// A locally refused connection never reaches the store. While the store is asked the connection
// exists, holds its local leases and is neither started, promoted nor routed (clusterPending).
// Each count taken is a lease on the Connection (holdsSlot, ticket, clientKey, routeIndex,
// clusterTag), given back once, in connectionClosed, the single release point.
//
// Accept path, one call per arrow:
//   socket -> accept (admission) -> new Connection
//          -> slot ? start() : queue (FIFO across threads, queue_timeout) -> ... -> close(reason)
//          -> connectionClosed: give back every lease -> slots.handOver (a loop)
//
// Listener states: ready <-> full (all workers busy or the global pool exhausted: new connections
// queue) -> draining (removed or shutting down: accepts nothing, established ones finish).
import net from 'node:net';
import type { HostPort, OnRemoval } from '../config/types.ts';
import { Connection, type ConnectionOwner, type ConnectionState } from '../connection/connection.ts';
import { isRejection, type CloseReason, type RejectReason } from '../connection/reasons.ts';
import type { Registry } from '../connection/registry.ts';
import type { HostPort as Backend } from '../config/types.ts';
import type { Member, NoBackend } from '../backends/backend-pool.ts';
import type { SharedBackendStates } from '../backends/backend-states.ts';
import type { ClientTable, SharedClientTable } from '../governance/client-table.ts';
import type { Cluster, ClusterAnswer } from '../cluster/cluster.ts';
import { clientKey, unmappedIPv4 } from '../governance/client-key.ts';
import { fairShareRefuses } from '../governance/fair-share.ts';
import type { CountIndexes, SharedCounts } from '../governance/shared-counts.ts';
import type { Route } from '../routing/route-table.ts';
import { RejectionLog } from '../governance/rejection-log.ts';
import type { Logger } from '../logging/logger.ts';
import type { ListenerMetrics, Metrics } from '../metrics.ts';
import { FirewallGate, type GateOwner } from './firewall-gate.ts';
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

/** How this thread binds: SO_REUSEPORT (several threads), and the port of an address another thread resolved. */
export interface BindOptions {
  readonly reusePort: boolean;
  portFor(listener: string, address: string): number | undefined;
}

const NO_BIND_OPTIONS: BindOptions = { reusePort: false, portFor: () => undefined };

/** What every thread shares: the counts, the per-client table, and which thread this is. */
export interface SharedState {
  readonly counts: SharedCounts;
  readonly backends: SharedBackendStates;
  readonly clients: SharedClientTable;
  readonly indexes: CountIndexes;
  /** This event loop's number, 0-based, and how many there are. */
  readonly thread: number;
  readonly threads: number;
}

export interface ListenerDeps {
  readonly registry: Registry;
  readonly slots: SlotPool;
  readonly log: Logger;
  readonly metrics: Metrics;
  readonly shared: SharedState;
  readonly rejectionSummaryIntervalMs: number;
  /** [cluster] of this event loop (off when the config has none). */
  readonly cluster: Cluster;
}

export class Listener implements SlotWaiter, ConnectionOwner, GateOwner {
  readonly name: string;
  #generation: ListenerGeneration;
  /** This thread's connections waiting for a slot, oldest first (insertion order = ticket order). */
  readonly queue = new Set<Connection>();
  readonly clients: ClientTable;
  readonly rejections: RejectionLog;
  readonly registry: Registry;
  readonly log: Logger;
  /** Index of this listener's counts in the shared counts. */
  readonly countIndex: number;
  /**
   * Routes that reloads removed, by name, with the generation that removed them (`seq`), so a
   * connection still in its handshake at that reload, routing later through its older generation,
   * gets the removal policy too: refused for "close", closed at `closeAt` for "drain". A later
   * reload that adds the name back does not undo it for those connections: their route is the
   * removed one, not the one added back (connections of generations from `seq` on are unaffected).
   */
  readonly removedRoutes = new Map<string, { readonly policy: OnRemoval; readonly closeAt: number; readonly seq: number }>();
  draining = false;
  /** Open connections (queued included): +1 right after `new Connection`, -1 in connectionClosed. */
  private open = 0;
  /** Called once a draining listener has no connection left (the daemon disposes it). */
  onIdle: (() => void) | null = null;
  private readonly servers = new Map<string, net.Server>();
  private readonly gate = new FirewallGate(this);
  private readonly deps: ListenerDeps;
  private readonly counts: SharedCounts;
  private readonly metrics: ListenerMetrics;
  private lastAcceptWarning = 0;
  private suppressedAcceptErrors = 0;
  /** Per backend: when we last warned and how many failures went unlogged since. */
  private readonly backendWarnings = new Map<string, { last: number; suppressed: number }>();

  constructor(generation: ListenerGeneration, deps: ListenerDeps) {
    this.name = generation.name;
    this.#generation = generation;
    this.deps = deps;
    this.registry = deps.registry;
    this.log = deps.log;
    this.countIndex = generation.countIndex;
    this.counts = deps.shared.counts;
    this.metrics = deps.metrics.forListener(this.name);
    this.clients = deps.shared.clients.view(this.countIndex);
    this.rejections = new RejectionLog({
      listener: this.name,
      intervalMs: deps.rejectionSummaryIntervalMs,
      log: (level, obj, msg) => deps.log[level]({ listener: this.name, ...obj }, msg),
    });
    deps.slots.register(this);
  }

  /** The config generation new connections get (a reload swaps it). */
  get generation(): ListenerGeneration {
    return this.#generation;
  }

  set generation(next: ListenerGeneration) {
    this.#generation = next;
    for (const server of this.servers.values()) this.setGate(server);
  }

  /** The firewall gate on a listening socket, only with reject = "close" (see firewall-gate.ts). */
  private setGate(server: net.Server): void {
    // `blockList` is read by net.Server for every accepted connection (Node >= 22.13); @types/node
    // declares it only as a constructor option.
    (server as net.Server & { blockList?: net.BlockList }).blockList = this.#generation.config.reject === 'close' ? this.gate : undefined;
  }

  /** GateOwner: the accept-time firewall, for the gate; counts the refusal. */
  refusesAtGate(address: string): boolean {
    const gen = this.#generation;
    if (this.draining || this.counts.stopping || (gen.proxyTrusted !== null && gen.proxyTrusted.allows(address))) return false;
    if (gen.admitsAddress(address)) return false;
    this.recordRejection('firewall', address);
    return true;
  }

  /** The addresses currently bound, as written in the config. */
  get boundAddresses(): string[] {
    return [...this.servers.keys()];
  }

  /** Binds every address of the generation not bound yet. On failure, nothing new stays bound. */
  async bind(addresses: readonly HostPort[], options: BindOptions = NO_BIND_OPTIONS): Promise<void> {
    const opened: string[] = [];
    try {
      for (const address of addresses) {
        if (this.servers.has(address.text)) continue;
        await this.bindOne(address, options);
        opened.push(address.text);
      }
    } catch (err) {
      await Promise.all(opened.map((text) => this.unbind(text)));
      throw err;
    }
  }

  private bindOne(address: HostPort, options: BindOptions): Promise<void> {
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
      // With several threads every thread binds every address with SO_REUSEPORT and the kernel
      // spreads new connections; an address given as port 0 takes the port the first thread got.
      const port = options.portFor(this.name, address.text) ?? address.port;
      const ipv6Only = address.host.includes(':') && this.generation.config.ipv6Only;
      const listenOptions = { host: address.host, port, backlog, ipv6Only, ...(options.reusePort ? { reusePort: true } : {}) };
      server.listen(listenOptions, () => {
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
    this.setGate(server);
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

  /**
   * The accept path. Every check is asked before anything is counted, so a refusal costs nobody
   * quota; the counts are then taken with compare-and-swap (or under the client table's lock),
   * so two threads can never both take the last place.
   */
  accept(socket: net.Socket): void {
    const gen = this.generation;
    const peer = socket.remoteAddress;
    if (peer === undefined) {
      socket.on('error', ignoreError);
      socket.destroy(); // already gone
      return;
    }
    const address = unmappedIPv4(peer);
    if (this.draining || this.counts.stopping) return this.refuse(socket, address, 'draining');
    // A trusted balancer is judged by the client it names (or as the client itself) once its
    // PROXY phase is over: admitRealClient.
    const trustedBalancer = gen.proxyTrusted !== null && gen.proxyTrusted.allows(address);
    let key: string | null = null;
    if (!trustedBalancer) {
      if (!gen.admitsAddress(address)) return this.refuse(socket, address, 'firewall');
      key = clientKey(address, gen.ipv6Prefix);
      // Asked first so that a client over its limits hears that, not queue_full.
      const verdict = this.checkClient(key, 0);
      if (verdict !== null) return this.refuse(socket, address, verdict);
    }
    // A slot only when nobody of this listener waits in any thread: the queue is FIFO.
    const { config } = gen;
    const idx = this.countIndex;
    let slot = false;
    let ticket = 0;
    if (this.counts.queued(idx) === 0 && this.counts.takeSlot(idx, config.workers, gen.globalMaxConnections)) slot = true;
    else {
      ticket = this.counts.enqueue(idx, config.queue);
      if (ticket === 0) return this.refuse(socket, address, 'queue_full');
    }
    let cluster: ClusterAnswer | Promise<ClusterAnswer> | null = null;
    if (key !== null) {
      // The same checks again, now taking the count, atomically over every thread.
      let verdict = this.takeClient(key, 1);
      if (verdict === null) {
        // Every local check passed: only now the cluster-wide ones.
        cluster = this.deps.cluster.admit(clusterTag(this.name, key), config.limits);
        if (cluster === 'cluster_unavailable' || cluster === 'cluster_ip_limit' || cluster === 'cluster_ip_rate') {
          this.clients.release(key);
          verdict = cluster;
        }
      }
      if (verdict !== null) {
        if (slot) this.giveBackSlot();
        else this.giveBackQueuePlace();
        return this.refuse(socket, address, verdict);
      }
    }

    socket.setNoDelay(true); // a relay forwards what it has at once
    const conn = new Connection(this, gen, socket, address, trustedBalancer);
    conn.clientKey = key;
    this.open++;
    this.counts.addOpen(idx, 1);
    this.metrics.accepted();
    if (cluster === 'leased') conn.clusterTag = clusterTag(this.name, key!);
    else if (cluster !== null && typeof cluster !== 'string') {
      conn.clusterPending = true;
      const tag = clusterTag(this.name, key!);
      void cluster.then((answer) => this.clusterAnswered(conn, tag, answer));
    }
    if (slot) {
      conn.holdsSlot = true;
      if (!conn.clusterPending) conn.start();
    } else {
      conn.ticket = ticket;
      this.queue.add(conn);
      if (this.queue.size === 1) this.counts.setHead(idx, this.deps.shared.thread, ticket);
      conn.enqueue(config.queueTimeoutMs);
      // A slot freed by another thread between our failed takeSlot and our enqueue found nobody
      // queued and woke nobody: offer it now rather than at the next 1 s re-check.
      if (this.counts.slotFree(idx, config.workers, gen.globalMaxConnections)) this.deps.slots.handOver(this);
    }
  }

  /**
   * The store answered a connection's cluster-wide check. The connection may have closed
   * meanwhile (client gone, queue_timeout, shutdown): then a count the answer took is given back
   * here, since connectionClosed has already run.
   */
  private clusterAnswered(conn: Connection, tag: string, answer: ClusterAnswer): void {
    conn.clusterPending = false;
    if (conn.state === 'closed') {
      if (answer === 'leased') this.deps.cluster.release(tag);
      return;
    }
    if (answer === 'leased') conn.clusterTag = tag;
    else if (answer !== 'ok') return conn.close(answer);
    if (this.draining) return conn.close('draining');
    if (conn.state === 'handshake') return conn.resumeHandshake();
    if (conn.holdsSlot) return conn.start();
    // Queued: it may be the head that held the queue back.
    const gen = this.generation;
    if (this.counts.slotFree(this.countIndex, gen.config.workers, gen.globalMaxConnections)) this.deps.slots.handOver(this);
  }

  /**
   * Per-client concurrency, rate and fair share, in that order, without counting; null =
   * admitted. `own` is what the asking connection already holds of the listener's capacity.
   */
  private checkClient(key: string, own: number): RejectReason | null {
    const verdict = this.clients.verdict(key, this.deps.cluster.localLimits(this.generation.config.limits), (active, distinct) => this.fairShareRefuses(active, distinct, own));
    return verdict === 'ok' ? null : verdict;
  }

  /** The per-client checks and the count, in one step under the table's lock; null = taken. */
  private takeClient(key: string, own: number): RejectReason | null {
    const verdict = this.clients.admit(key, this.deps.cluster.localLimits(this.generation.config.limits), (active, distinct) => this.fairShareRefuses(active, distinct, own));
    return verdict === 'ok' ? null : verdict;
  }

  private fairShareRefuses(clientActive: number, distinctClients: number, own: number): boolean {
    const gen = this.generation;
    const idx = this.countIndex;
    return fairShareRefuses({
      occupancy: this.counts.busy(idx) + this.counts.queued(idx) - own,
      capacity: gen.config.workers + gen.config.queue,
      fairShareAbove: gen.config.limits.fairShareAbove,
      clientActive,
      distinctClients,
    });
  }

  /** ConnectionOwner: see the header (admission after the PROXY phase). */
  admitRealClient(conn: Connection): RejectReason | 'pending' | null {
    const gen = conn.settings as ListenerGeneration;
    const address = conn.clientAddress;
    if (!gen.admitsAddress(address)) return 'firewall';
    const key = clientKey(address, gen.ipv6Prefix);
    const refusal = this.takeClient(key, 1);
    if (refusal !== null) return refusal;
    conn.clientKey = key;
    const tag = clusterTag(this.name, key);
    const cluster = this.deps.cluster.admit(tag, gen.config.limits);
    if (cluster === null || cluster === 'ok') return null;
    if (cluster === 'leased') {
      conn.clusterTag = tag;
      return null;
    }
    if (typeof cluster === 'string') return cluster;
    conn.clusterPending = true;
    void cluster.then((answer) => this.clusterAnswered(conn, tag, answer));
    return 'pending';
  }

  /**
   * ConnectionOwner: after SNI, a route a later reload removed (a connection still in its
   * handshake at that reload routes through its older generation), then the route's firewall,
   * then its connection limit (a count over every thread).
   */
  admitRoute(conn: Connection, route: Route): CloseReason | null {
    const removal = this.removedRoutes.size === 0 ? undefined : this.removedRoutes.get(route.name);
    if (removal !== undefined && (conn.settings as ListenerGeneration).seq < removal.seq) {
      if (removal.policy === 'close') return 'removed';
      if (removal.policy === 'drain') conn.closeAtRemovalDeadline(removal.closeAt);
    }
    if (!route.firewall.allows(conn.clientAddress)) return 'route_firewall';
    if (!this.counts.takeRoute(route.countIndex, route.config.limits.maxConnections)) return 'route_limit';
    conn.routeIndex = route.countIndex;
    this.metrics.routed(route.name);
    return null;
  }

  /** Active connections per route name of this listener, over every thread (0s left out). */
  get routeActive(): Map<string, number> {
    const active = new Map<string, number>();
    const prefix = `${this.name}\u0000`;
    for (const [key, index] of this.deps.shared.indexes.routes) {
      if (!key.startsWith(prefix)) continue;
      const n = this.counts.routeActive(index);
      if (n !== 0) active.set(key.slice(prefix.length), n);
    }
    return active;
  }

  /** Worker slots in use by this listener in every thread. */
  get busy(): number {
    return this.counts.busy(this.countIndex);
  }

  /** Connections of this listener queued in every thread. */
  get queued(): number {
    return this.counts.queued(this.countIndex);
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

  /**
   * SlotWaiter: starts this thread's oldest queued connection if it is the oldest of the
   * listener in every thread and a slot is free. Called by SlotPool.handOver only.
   */
  promoteOne(): boolean {
    // A draining listener closes its queue one by one: promoting from it would dial a backend
    // for a connection about to be closed.
    if (this.draining) return false;
    const head = this.queue.values().next();
    if (head.done === true) return false;
    const conn = head.value;
    if (conn.clusterPending) return false; // promoted once the store answers (clusterAnswered)
    const gen = this.generation;
    const { thread, threads } = this.deps.shared;
    const idx = this.countIndex;
    if (threads > 1 && !this.counts.isOldest(idx, thread, conn.ticket, threads)) return false;
    if (!this.counts.takeSlot(idx, gen.config.workers, gen.globalMaxConnections)) return false;
    this.leaveQueue(conn);
    conn.holdsSlot = true;
    conn.start();
    return true;
  }

  /** True when a connection of this listener queued in another thread could take a free slot now. */
  othersWaiting(): boolean {
    const gen = this.generation;
    const idx = this.countIndex;
    return this.counts.queued(idx) > this.queue.size && this.counts.slotFree(idx, gen.config.workers, gen.globalMaxConnections);
  }

  /** Gives back the queue place and publishes this thread's new oldest ticket. */
  private leaveQueue(conn: Connection): void {
    const wasHead = this.queue.values().next().value === conn;
    this.queue.delete(conn);
    this.counts.dequeue(this.countIndex);
    conn.ticket = 0;
    if (wasHead) {
      const next = this.queue.values().next();
      this.counts.setHead(this.countIndex, this.deps.shared.thread, next.done === true ? 0 : next.value.ticket);
    }
  }

  /** A queue place taken and not used (a refusal after it): another thread may have queued behind it. */
  private giveBackQueuePlace(): void {
    this.counts.dequeue(this.countIndex);
    const gen = this.generation;
    if (this.counts.slotFree(this.countIndex, gen.config.workers, gen.globalMaxConnections)) this.deps.slots.handOver(this);
  }

  private giveBackSlot(): void {
    this.counts.releaseSlot(this.countIndex);
    this.deps.slots.handOver(this);
  }

  // ---- backends: a lease on the backend's connection count from the dial to the close ----

  /** ConnectionOwner: see backends/backend-pool.ts for the choice. */
  chooseBackend(conn: Connection, route: Route, tried: readonly number[]): Member | NoBackend {
    const choice = route.pool.choose(tried, conn.clientAddress, Date.now());
    if (typeof choice !== 'string') conn.backendIndex = choice.index;
    return choice;
  }

  /** ConnectionOwner: the dial connected. */
  backendConnected(conn: Connection): void {
    if (this.deps.shared.backends.connected(conn.backendIndex, Date.now())) {
      const route = conn.route!;
      const backend = conn.backendAddress!.text;
      this.deps.log.info({ listener: this.name, route: route.name, backend }, `backend ${backend} of route ${route.name} is back: a connect succeeded after its ejection`);
    }
    this.metrics.backendConnected(conn.route!.name, performance.now() - conn.lastDialAt);
  }

  /**
   * ConnectionOwner: a dial failed. Gives its lease back, counts it for passive ejection (an
   * ejection is one warning), and warns of the failure at most once per 10 s per backend.
   */
  backendFailed(conn: Connection, backend: Backend, code: string, last: boolean): void {
    const states = this.deps.shared.backends;
    const index = conn.backendIndex;
    states.release(index);
    conn.backendIndex = -1;
    const route = conn.route!;
    const now = Date.now();
    const policy = route.config.ejection;
    const cooldown = states.connectFailed(index, now, policy, () => ejectionAllowed(route, states, index, now));
    if (cooldown > 0) {
      this.metrics.backendEjected(route.name, backend.text);
      this.deps.log.warn(
        { listener: this.name, route: route.name, backend: backend.text, code, cooldownMs: cooldown },
        `backend ${backend.text} of route ${route.name} is ejected for ${cooldown} ms: ${policy.consecutiveFailures} connect failures in a row, last: ${code}`,
      );
    }
    this.metrics.backendFailed(route.name, backend.text, code);
    const seen = this.backendWarnings.get(backend.text);
    if (seen !== undefined && now - seen.last < 10_000) {
      seen.suppressed++;
      return;
    }
    this.deps.log.warn(
      { listener: this.name, route: route.name, backend: backend.text, code, suppressed: seen?.suppressed ?? 0 },
      last ? 'backend connect failed; no backend of the route is left to try' : 'backend connect failed; trying the next one',
    );
    this.backendWarnings.set(backend.text, { last: now, suppressed: 0 });
  }

  // ---- the single release point, called from Connection.close() only ----

  connectionClosed(conn: Connection, reason: CloseReason, before: ConnectionState): void {
    if (conn.ticket !== 0) this.leaveQueue(conn);
    if (conn.clientKey !== null) {
      this.clients.release(conn.clientKey);
      conn.clientKey = null;
    }
    if (conn.routeIndex >= 0) {
      this.counts.releaseRoute(conn.routeIndex);
      conn.routeIndex = -1;
    }
    if (conn.backendIndex >= 0) {
      this.deps.shared.backends.release(conn.backendIndex);
      conn.backendIndex = -1;
    }
    if (conn.clusterTag !== null) {
      this.deps.cluster.release(conn.clusterTag);
      conn.clusterTag = null;
    }
    if (isRejection(reason)) this.recordRejection(reason, conn.clientAddress);
    this.metrics.closed(conn, reason);
    const log = this.deps.log;
    // One line per connection: at info for a relayed one when access_log is on (the access log),
    // else at debug. Refusals are summarised by the rejection log instead.
    const access = conn.settings.accessLog && !isRejection(reason);
    if (access ? log.isLevelEnabled('info') : log.isLevelEnabled('debug')) {
      const line = { conn: conn.uniqueId, reason, ...conn.describe(), ...conn.timings() };
      if (access) log.info(line, 'connection closed');
      else log.debug(line, 'connection closed');
    }
    this.open--;
    this.counts.addOpen(this.countIndex, -1);
    if (conn.holdsSlot) {
      conn.holdsSlot = false;
      this.giveBackSlot();
    } else if (before === 'queued') {
      // This thread's oldest may have been what held another thread's queue back, or (one thread)
      // a head still waiting for the cluster store, which promotion skips over nothing for.
      this.deps.slots.handOver(this);
    }
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
      if (conn.owner === this) {
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
 * max_share: a passive ejection may leave at most that share of the route's backends ejected
 * (as Envoy's max_ejection_percent), so a network blip cannot empty a route. Always at least one
 * may be ejected. Threads can race past it by one each at the same instant. Only cooldowns count
 * (not probation), and not the backend to eject; one that fails again after an ejection is
 * ejected again whatever the share (SharedBackendStates.connectFailed).
 */
function ejectionAllowed(route: Route, states: SharedBackendStates, index: number, now: number): boolean {
  const members = route.pool.all;
  let ejected = 0;
  for (const m of members) if (m.index !== index && states.isEjected(m.index, now)) ejected++;
  const allowed = Math.max(1, Math.floor((members.length * route.config.ejection.maxSharePct) / 100));
  return ejected < allowed;
}

/** The ledger's and the store's name for a client of a listener (limits are per listener). */
function clusterTag(listener: string, key: string): string {
  return `${listener}/${key}`;
}



/**
 * The kernel accept queue: at least 4096 and at least the listener's capacity, rather than Node's
 * fixed 511. During a flood the queue fills between two event-loop turns, and a SYN the kernel
 * drops is retried by the client only after a second (measured: p99 of legitimate clients went
 * from ~1 s to ~40 ms). The kernel caps it at net.core.somaxconn, which stays the operator's knob.
 */
export function listenBacklog(workers: number, queue: number): number {
  return Math.min(65535, Math.max(4096, workers + queue));
}
