// THE owner of one proxied connection: both sockets, every deadline, the byte counters and the
// state. Every socket event and every deadline ends in `close(reason)`, which is idempotent and
// the only place that releases anything.
//
// States (setState rejects any other move):
//
//   queued ──> handshake ──> connecting ──> relaying ──> closing ──> closed
//      │           │             │             │                       ^
//      └───────────┴─────────────┴─────────────┴───────────────────────┘  close(reason)
//
//   queued      accepted, paused, waiting for a free worker slot (listener queue)
//   handshake   reading the PROXY header and/or the first bytes needed to route
//   connecting  route chosen, dialling backends in turn; the client is paused
//   relaying    bytes flow both ways
//   closing     one side has sent FIN; the other direction may go on for timeouts.half_close
//
// Handlers are module-level functions that find their connection through a symbol on the
// socket, so no closure is allocated per connection (memory per idle connection matters). The
// one exception is the backend's `onread` pair, two small functions made once per dial.
//
// A closed connection is inert: every handler returns at once when the state is `closed`, and
// close() detaches the data handlers, because a socket can still emit what it had buffered
// after destroy() (a queued client paused at 16 KB, resumed by start() and refused in the same
// tick, delivered its chunk to a connection with no backend: issue 13, defect 1).
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import type { HostPort, Timeouts } from '../config/types.ts';
import type { Logger } from '../logging/logger.ts';
import { ClientHelloReader, MAX_HELLO_BYTES } from '../routing/client-hello.ts';
import type { Member, NoBackend } from '../backends/backend-pool.ts';
import type { Route, RouteTable } from '../routing/route-table.ts';
import { parseProxyHeader, type ProxyHeader } from '../proxy-protocol/parse.ts';
import type { ProxyVersionAccept } from '../proxy-protocol/parse.ts';
import { V1_PREFIX, V2_SIGNATURE } from '../proxy-protocol/types.ts';
import { formatHostPort, MAX_TIMER_MS } from '../config/units.ts';
import { buildBackendProxyHeader } from './backend-proxy-header.ts';
import type { CloseReason, RejectReason } from './reasons.ts';
import type { Registry } from './registry.ts';

export type ConnectionState = 'queued' | 'handshake' | 'connecting' | 'relaying' | 'closing' | 'closed';

const allowedMoves: Readonly<Record<ConnectionState, readonly ConnectionState[]>> = {
  queued: ['handshake', 'closed'],
  handshake: ['connecting', 'closed'],
  connecting: ['relaying', 'closed'],
  relaying: ['closing', 'closed'],
  closing: ['closed'],
  closed: [],
};

/** What a connection reads from the config generation that admitted it (kept for its whole life). */
export interface ConnectionSettings {
  readonly timeouts: Timeouts;
  readonly routes: RouteTable;
  readonly rejectStyle: 'reset' | 'close';
  /** One info line when the connection ends (access_log). */
  readonly accessLog: boolean;
  /** PROXY protocol expectation for connections from trusted sources; null when off. */
  readonly proxyAccept: ProxyVersionAccept | null;
  readonly proxyRequired: boolean;
}

/**
 * The long-lived listener that admitted a connection: it decides the admission steps that come
 * after accept and takes back every count in connectionClosed.
 */
export interface ConnectionOwner {
  readonly name: string;
  readonly registry: Registry;
  readonly log: Logger;
  /**
   * Once the PROXY phase is over: firewall and per-client checks on `conn.clientAddress`, which
   * is the client a header named or, when none was named (no header with require = false,
   * UNKNOWN, LOCAL, AF_UNIX), the balancer itself. 'pending': the cluster store is asked; the
   * owner calls resumeHandshake() (or close) once it answers.
   */
  admitRealClient(conn: Connection): RejectReason | 'pending' | null;
  /** After SNI chose a route: a route removed by a reload, the route's firewall and limit. */
  admitRoute(conn: Connection, route: Route): CloseReason | null;
  /**
   * The backend for the connection's next dial, by the route's balance, with its lease taken
   * (conn.backendIndex); or why there is none.
   */
  chooseBackend(conn: Connection, route: Route, tried: readonly number[]): Member | NoBackend;
  /** The dial connected: passive ejection forgets the backend's failures. */
  backendConnected(conn: Connection): void;
  /** A dial failed: its lease is given back, the failure counted for passive ejection. `last`: none left to try. */
  backendFailed(conn: Connection, backend: HostPort, code: string, last: boolean): void;
  /** The single release point: slot, queue place, per-client count, route count, metrics, log line. */
  connectionClosed(conn: Connection, reason: CloseReason, stateBefore: ConnectionState): void;
}

/** What the handshake phase is reading. */
const enum Phase {
  ProxyHeader, // from a trusted source: a PROXY header (required or optional)
  SpoofCheck, // from an untrusted source on a PROXY listener: refuse anything that looks like a header
  Route, // the first bytes that choose the route
}

const kConn = Symbol('smartproxy.connection');
const EMPTY = Buffer.alloc(0);
/** Node's own read size. */
const READ_BUFFER_BYTES = 64 * 1024;
/**
 * Backend reads land here (net.connect `onread`), skipping the stream machinery and the 64 KB
 * allocation Node makes per read. One buffer for every backend, so an idle connection holds none;
 * what is read into it is copied before it is written on (see onBackendRead).
 */
const sharedReadBuffer = Buffer.allocUnsafeSlow(READ_BUFFER_BYTES);
/** Distinguishes this process's connection ids from a previous run's. */
const bootId = randomBytes(4).toString('hex');
interface OwnedSocket extends net.Socket {
  [kConn]: Connection;
}

export class Connection {
  readonly id: number;
  readonly owner: ConnectionOwner;
  readonly settings: ConnectionSettings;
  readonly client: net.Socket;
  /** Milliseconds since the epoch at admission (the start of queue_timeout; client_hello and
   * max_lifetime count from start(), when a worker takes the connection). */
  readonly acceptedAt: number;
  state: ConnectionState = 'queued';
  closeReason: CloseReason | null = null;

  /** The real client: the socket's peer, or the source named by a trusted PROXY header. */
  clientAddress: string;
  clientPort: number;
  /** The balancer's address when a PROXY header named the real client. */
  via: string | null = null;
  // Leases: counts this connection holds, each taken once by its owner's admission and given back
  // once by connectionClosed (the owner sets and clears them; nothing else touches them).
  /** Per-client table key this connection holds a count on. */
  clientKey: string | null = null;
  /** Holds one of the listener's worker slots (and one of the global pool). */
  holdsSlot = false;
  /** Its place in the listener's queue: the FIFO ticket, 0 when not queued. */
  ticket = 0;
  /** The shared count index of the route it is counted on; -1 when none. */
  routeIndex = -1;
  /** The backend state index it is counted on (from its dial to its close); -1 when none. */
  backendIndex = -1;
  /** [cluster]: the tag (listener/client key) it holds a cluster-wide count on. */
  clusterTag: string | null = null;
  /**
   * [cluster]: the store has not answered yet. The connection holds its local leases meanwhile
   * and is not started (or promoted, or routed); any close releases them as usual, and an answer
   * that comes after the close gives back what it took.
   */
  clusterPending = false;

  route: Route | null = null;
  sni: string | null = null;
  proxyHeader: ProxyHeader | null = null;
  backend: net.Socket | null = null;
  backendAddress: HostPort | null = null;
  bytesFromClient = 0;
  bytesFromBackend = 0;

  private phase: Phase;
  /** Reads the ClientHello incrementally while routing needs it; null before and after. */
  private hello: ClientHelloReader | null = null;
  /** Bytes read during the handshake, replayed to the backend unchanged. */
  private inbound: Buffer | null = null;
  private inboundLength = 0;
  /** State indexes of the backends dialled so far: each is tried at most once. */
  private readonly tried: number[] = [];
  /** Backend dials made so far (the access log's `attempts`). */
  attempts = 0;
  // For the access log: when a worker took it, when the first dial began, when a backend answered.
  private startedAt = 0;
  private dialStartedAt = 0;
  /** performance.now() when the current dial began (the connect-time histogram is per dial, sub-ms). */
  lastDialAt = 0;
  private connectedAt = 0;
  private clientEnded = false;
  private backendEnded = false;
  private clientClosed = false;
  private backendClosed = false;

  // Deadlines, absolute ms (0 = not armed), named after their config keys. One timer serves them all.
  private queueDeadline = 0;
  private clientHelloDeadline = 0;
  private connectDeadline = 0;
  private halfCloseDeadline = 0;
  private lifetimeDeadline = 0;
  /** A reload removed this connection's route with on_removal = "drain": closed at this time. */
  private removalDeadline = 0;
  private lastActivity = 0;
  /** This connection's own backend read buffer while a burst fills whole reads; null = the shared one. */
  private backendReadBuffer: Buffer | null = null;
  private timer: NodeJS.Timeout | null = null;
  private timerAt = 0;

  /** `address` is the client's as the listener admitted it (IPv4-mapped already unmapped). */
  constructor(owner: ConnectionOwner, settings: ConnectionSettings, client: net.Socket, address: string, expectProxyHeader: boolean) {
    this.owner = owner;
    this.settings = settings;
    this.client = client;
    this.acceptedAt = Date.now();
    this.clientAddress = address;
    this.clientPort = client.remotePort ?? 0;
    this.phase = expectProxyHeader ? Phase.ProxyHeader : settings.proxyAccept !== null ? Phase.SpoofCheck : Phase.Route;
    const owned = client as OwnedSocket;
    owned[kConn] = this;
    client.on('error', onClientError);
    client.on('close', onClientClose);
    this.id = owner.registry.add(this);
  }

  /**
   * Waits for a worker slot. The socket reads (so a client that leaves is noticed at once), but
   * keeps at most what routing would read anyway and then stops reading.
   */
  enqueue(queueTimeoutMs: number): void {
    this.queueDeadline = this.acceptedAt + queueTimeoutMs;
    this.armTimer();
    this.readClient();
  }

  /** Takes a worker slot: reads what routing needs, or dials at once. */
  start(): void {
    this.setState('handshake');
    this.queueDeadline = 0;
    const now = Date.now();
    this.startedAt = now;
    const { clientHelloMs, maxLifetimeMs, maxLifetimeJitterPct } = this.settings.timeouts;
    if (maxLifetimeMs > 0) {
      // Jitter shortens each lifetime by up to N %, so connections opened together end apart.
      const jitter = maxLifetimeJitterPct > 0 ? (Math.random() * maxLifetimeJitterPct * maxLifetimeMs) / 100 : 0;
      this.lifetimeDeadline = now + Math.max(1, Math.round(maxLifetimeMs - jitter));
    }
    if (this.phase === Phase.Route && !this.settings.routes.needsPeek) {
      this.routeTo(this.settings.routes.defaultRoute);
      return;
    }
    this.clientHelloDeadline = now + clientHelloMs;
    this.armTimer();
    this.readClient();
    if (this.inboundLength > 0) this.onHandshakeData(null);
    if (this.state === 'handshake' && this.clientEnded) this.close('client_gone');
  }

  private readClient(): void {
    if (this.client.listenerCount('data') === 0) {
      this.client.on('data', onClientData);
      this.client.on('end', onClientEnd);
    }
    this.client.resume();
  }

  /**
   * The one exit. Idempotent: clears the timer, destroys both sockets (a refusal is a reset when
   * the listener says so), leaves the registry and hands the release work to the owner.
   */
  close(reason: CloseReason): void {
    const before = this.state;
    if (before === 'closed') return;
    this.state = 'closed';
    this.closeReason = reason;
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    this.inbound = null;
    this.hello = null;
    const client = this.client;
    client.off('data', onClientData);
    client.off('end', onClientEnd);
    client.off('drain', onClientDrain);
    const refused = before === 'queued' || before === 'handshake';
    if (refused && this.settings.rejectStyle === 'reset' && !client.destroyed) client.resetAndDestroy();
    else client.destroy();
    const backend = this.backend;
    if (backend !== null) {
      backend.off('end', onBackendEnd);
      backend.off('drain', onBackendDrain);
      backend.destroy();
    }
    this.owner.registry.remove(this);
    this.owner.connectionClosed(this, reason, before);
  }

  /** Globally unique id used in logs and sent as PROXY v2 UNIQUE_ID: `<process boot id>-<id>`. */
  get uniqueId(): string {
    return `${bootId}-${this.id}`;
  }

  /** The address the client connected to (the original destination); read on demand, it is rarely needed. */
  get localAddress(): string {
    return this.client.localAddress ?? '';
  }

  get localPort(): number {
    return this.client.localPort ?? 0;
  }

  /** Milliseconds since admission. */
  age(now = Date.now()): number {
    return now - this.acceptedAt;
  }

  private setState(next: ConnectionState): void {
    if (!allowedMoves[this.state].includes(next)) {
      throw new Error(`bug: connection ${this.id} cannot move from ${this.state} to ${next}`);
    }
    this.state = next;
  }

  // ---- handshake: PROXY header, then the bytes that choose the route ----

  /** Parses what has arrived so far; `chunk` is null when re-parsing bytes read while queued. */
  onHandshakeData(chunk: Buffer | null): void {
    if (chunk !== null) this.appendInbound(chunk);
    if (this.clusterPending) return; // kept for when the store answers
    for (;;) {
      const buf = this.inbound === null ? EMPTY : this.inbound.subarray(0, this.inboundLength);
      if (this.phase === Phase.ProxyHeader || this.phase === Phase.SpoofCheck) {
        const trusted = this.phase === Phase.ProxyHeader;
        const result = parseProxyHeader(buf, trusted ? this.settings.proxyAccept! : 'any');
        if (result.kind === 'need-more') {
          // From an untrusted source a whole signature is already a spoof: refused now, not at client_hello.
          if (!trusted && startsWithProxySignature(buf)) this.close('proxy_untrusted');
          return;
        }
        if (!trusted) {
          if (result.kind !== 'not-proxy') return this.close('proxy_untrusted');
          this.phase = Phase.Route;
          continue;
        }
        if (result.kind === 'malformed') return this.close('proxy_header_invalid');
        if (result.kind === 'not-proxy') {
          if (this.settings.proxyRequired) return this.close('proxy_header_invalid');
          // No header: the balancer is the client, with the checks accept() left to this point.
          const refusal = this.owner.admitRealClient(this);
          this.phase = Phase.Route;
          if (refusal === 'pending') return this.waitForCluster();
          if (refusal !== null) return this.close(refusal);
          continue;
        }
        this.acceptProxyHeader(result.header);
        if (this.state === 'closed') return;
        this.consumeInbound(result.consumed);
        this.phase = Phase.Route;
        if (this.clusterPending) return this.waitForCluster();
        if (this.inboundLength === 0 && this.settings.routes.needsPeek) return;
        continue;
      }
      if (!this.settings.routes.needsPeek) return this.routeTo(this.settings.routes.defaultRoute);
      this.hello ??= new ClientHelloReader();
      const hello = this.hello.read(buf);
      if (hello.kind !== 'need-more') this.hello = null;
      switch (hello.kind) {
        case 'need-more':
          return;
        case 'malformed':
          return this.close('client_hello_malformed');
        case 'not-tls':
          return this.routeTo(this.settings.routes.defaultRoute);
        case 'tls':
          this.sni = hello.sni;
          return this.routeTo(this.settings.routes.match(hello.sni));
      }
    }
  }

  private acceptProxyHeader(header: ProxyHeader): void {
    this.proxyHeader = header;
    // LOCAL, UNKNOWN and AF_UNIX name no client: the balancer stays the client.
    if (header.command === 'proxy' && header.source !== null && header.family !== 'unix') {
      this.via = this.clientAddress;
      this.clientAddress = header.source.address;
      this.clientPort = header.source.port;
    }
    const refusal = this.owner.admitRealClient(this);
    if (refusal !== null && refusal !== 'pending') this.close(refusal);
  }

  /** The real client's cluster check is with the store: read nothing more until it answers. */
  private waitForCluster(): void {
    this.clusterPending = true;
    this.client.pause();
  }

  /** The store admitted the real client: parse on from where the handshake stopped. */
  resumeHandshake(): void {
    if (this.state !== 'handshake') return;
    this.clusterPending = false;
    this.client.resume();
    // Parse on even with nothing read yet: a lone default route connects at once, as start()
    // does, for a protocol where the server speaks first (SMTP, SSH) and the client sends nothing.
    this.onHandshakeData(null);
    if (this.state === 'handshake' && this.clientEnded) this.close('client_gone');
  }

  /** A reload removed this connection's route with on_removal = "drain": close it at `at`. */
  closeAtRemovalDeadline(at: number): void {
    if (this.state === 'closed') return;
    if (this.removalDeadline === 0 || at < this.removalDeadline) this.removalDeadline = at;
    this.armTimer();
  }

  private appendInbound(chunk: Buffer): void {
    if (this.inbound === null) {
      this.inbound = chunk; // the common case: the whole hello in one segment, no copy
      this.inboundLength = chunk.length;
      return;
    }
    const needed = this.inboundLength + chunk.length;
    if (needed > this.inbound.length || this.inbound.buffer === chunk.buffer) {
      // Grow geometrically so a hello trickled byte by byte costs O(n) copies, not O(n^2).
      const grown = Buffer.allocUnsafe(Math.max(needed, Math.min(2 * needed, MAX_HELLO_BYTES + 4096), 1024));
      this.inbound.copy(grown, 0, 0, this.inboundLength);
      this.inbound = grown;
    }
    chunk.copy(this.inbound, this.inboundLength);
    this.inboundLength = needed;
  }

  private consumeInbound(n: number): void {
    if (n >= this.inboundLength) {
      this.inbound = null;
      this.inboundLength = 0;
      return;
    }
    this.inbound = Buffer.from(this.inbound!.subarray(n, this.inboundLength));
    this.inboundLength = this.inbound.length;
  }

  private routeTo(route: Route | null): void {
    if (route === null) return this.close('no_route');
    const refusal = this.owner.admitRoute(this, route);
    if (refusal !== null) return this.close(refusal);
    this.route = route;
    this.client.pause();
    this.clientHelloDeadline = 0;
    this.setState('connecting');
    this.dialStartedAt = Date.now();
    this.dial();
  }

  // ---- connecting: each backend at most once, chosen by the route's balance ----

  private dial(): void {
    const choice = this.owner.chooseBackend(this, this.route!, this.tried);
    if (typeof choice === 'string') return this.close(choice);
    const target = choice.address;
    this.tried.push(choice.index);
    this.attempts++;
    this.lastDialAt = performance.now();
    const socket = net.connect({
      host: target.host,
      port: target.port,
      allowHalfOpen: true,
      noDelay: true,
      onread: { buffer: () => this.backendReadBuffer ?? sharedReadBuffer, callback: (n, buf) => this.onBackendRead(n, buf as Buffer) },
    }) as OwnedSocket;
    socket[kConn] = this;
    socket.on('error', onBackendError);
    socket.on('close', onBackendClose);
    socket.once('connect', onBackendConnect);
    this.backend = socket;
    this.backendAddress = target;
    this.connectDeadline = Date.now() + this.settings.timeouts.connectMs;
    this.armTimer();
  }

  /** A dial failed (error or connect deadline): forget that socket and try the next backend. */
  private dialFailed(code: string): void {
    const failed = this.backend!;
    this.backend = null;
    failed.destroy();
    this.owner.backendFailed(this, this.backendAddress!, code, this.tried.length >= this.route!.pool.all.length);
    this.connectDeadline = 0;
    this.dial();
  }

  onBackendConnect(): void {
    this.connectDeadline = 0;
    this.connectedAt = Date.now();
    this.owner.backendConnected(this);
    this.setState('relaying');
    const backend = this.backend!;
    const client = this.client;
    const header = buildBackendProxyHeader(this);
    if (header !== null) backend.write(header);
    if (this.inboundLength > 0) {
      backend.write(this.inbound!.subarray(0, this.inboundLength));
      this.bytesFromClient += this.inboundLength;
    }
    this.inbound = null;
    this.inboundLength = 0;
    backend.on('end', onBackendEnd);
    backend.on('drain', onBackendDrain);
    client.on('drain', onClientDrain);
    this.lastActivity = Date.now();
    this.armTimer();
    if (this.clientEnded) {
      backend.end(); // the client finished sending before the backend answered
      this.halfClosed();
    }
    this.readClient();
  }

  // ---- relaying: backpressure both ways, half-close propagated ----

  onClientData(chunk: Buffer): void {
    if (this.state === 'handshake') return this.onHandshakeData(chunk);
    if (this.state === 'queued' || this.state === 'connecting') {
      // Not ours to parse yet: keep it for replay, and stop reading once routing has enough.
      this.appendInbound(chunk);
      if (this.inboundLength >= MAX_HELLO_BYTES) this.client.pause();
      return;
    }
    this.bytesFromClient += chunk.length;
    this.lastActivity = Date.now();
    // Written at once, not corked until the tick ends: batching reads into one writev measured
    // slower per byte (README, "Performance").
    if (!this.backend!.write(chunk)) this.client.pause();
  }

  /**
   * `n` bytes from the backend are in `buf`. Small reads (the receive queue drained) go through
   * the shared buffer and are copied; a read that fills its buffer means a burst, which gets a
   * buffer of its own, reused while each write flushes at once. A buffer a pending write still
   * holds is never read into again.
   */
  onBackendRead(n: number, buf: Buffer): boolean {
    if (this.state === 'closed') return false;
    this.bytesFromBackend += n;
    this.lastActivity = Date.now();
    const shared = buf === sharedReadBuffer;
    const written = this.client.write(shared ? Buffer.from(buf.subarray(0, n)) : buf.subarray(0, n));
    if (n < buf.length) this.backendReadBuffer = null;
    else if (shared || this.client.writableLength > 0) this.backendReadBuffer = Buffer.allocUnsafeSlow(READ_BUFFER_BYTES);
    if (!written) this.backend!.pause();
    return true;
  }

  onClientEnd(): void {
    this.clientEnded = true;
    // A client may send its whole request and FIN while queued: serve it once a worker is free.
    if (this.state === 'queued') return this.inboundLength > 0 ? undefined : this.close('client_gone');
    // Still short of what routing needs, and nothing more can come.
    if (this.state === 'handshake') return this.close('client_gone');
    if (this.state === 'connecting') return; // ended once the backend is connected
    if (this.bothDirectionsFinished()) return this.close('done');
    this.backend!.end();
    this.halfClosed();
  }

  onBackendEnd(): void {
    this.backendEnded = true;
    if (this.bothDirectionsFinished()) return this.close('done');
    this.client.end();
    this.halfClosed();
  }

  /**
   * Both peers have sent FIN and every byte is with the kernel: closing now sends each peer its
   * FIN (nothing is left unread, so no RST) and saves the shutdown(2) and its round of stream
   * events that end() would cost, per connection, on the common close path.
   */
  private bothDirectionsFinished(): boolean {
    return this.clientEnded && this.backendEnded && this.client.writableLength === 0 && this.backend!.writableLength === 0;
  }

  private halfClosed(): void {
    if (this.state === 'relaying') this.setState('closing');
    const { halfCloseMs } = this.settings.timeouts;
    if (this.halfCloseDeadline === 0 && halfCloseMs > 0) {
      this.halfCloseDeadline = Date.now() + halfCloseMs;
      this.armTimer();
    }
  }

  onClientClose(): void {
    this.clientClosed = true;
    if (this.state === 'closed') return;
    if (this.state !== 'relaying' && this.state !== 'closing') return this.close('client_gone');
    if (!this.clientEnded) return this.close('client_reset');
    if (this.backendClosed) this.close('done');
  }

  onBackendClose(socket: net.Socket): void {
    if (socket !== this.backend || this.state === 'closed') return;
    this.backendClosed = true;
    if (this.state === 'connecting') return this.dialFailed('ECONNRESET');
    if (!this.backendEnded) return this.close('backend_reset');
    if (this.clientClosed) this.close('done');
  }

  onBackendError(socket: net.Socket, err: NodeJS.ErrnoException): void {
    if (socket !== this.backend || this.state === 'closed') return;
    if (this.state === 'connecting') return this.dialFailed(err.code ?? 'ERROR');
    this.close('backend_reset');
  }

  // ---- deadlines: one timer, armed for the earliest; data only moves a timestamp ----

  private nextDeadline(): number {
    let next = Infinity;
    if (this.queueDeadline > 0) next = this.queueDeadline;
    if (this.clientHelloDeadline > 0 && this.clientHelloDeadline < next) next = this.clientHelloDeadline;
    if (this.connectDeadline > 0 && this.connectDeadline < next) next = this.connectDeadline;
    if (this.halfCloseDeadline > 0 && this.halfCloseDeadline < next) next = this.halfCloseDeadline;
    if (this.lifetimeDeadline > 0 && this.lifetimeDeadline < next) next = this.lifetimeDeadline;
    if (this.removalDeadline > 0 && this.removalDeadline < next) next = this.removalDeadline;
    const { idleMs } = this.settings.timeouts;
    if (idleMs > 0 && this.lastActivity > 0) {
      const idleAt = this.lastActivity + idleMs;
      if (idleAt < next) next = idleAt;
    }
    return next;
  }

  /** Arms the timer for the earliest deadline unless it already fires sooner. */
  private armTimer(): void {
    const next = this.nextDeadline();
    if (next === Infinity) return;
    if (this.timer !== null) {
      if (this.timerAt <= next) return; // fires early or on time, re-checks, re-arms
      clearTimeout(this.timer);
    }
    const now = Date.now();
    const delay = quantize(Math.max(0, next - now));
    this.timerAt = now + delay;
    this.timer = setTimeout(onDeadline, delay, this);
  }

  onTimer(): void {
    this.timer = null;
    if (this.state === 'closed') return;
    const now = Date.now();
    if (this.queueDeadline > 0 && now >= this.queueDeadline) return this.close('queue_timeout');
    if (this.clientHelloDeadline > 0 && now >= this.clientHelloDeadline) return this.close('client_hello_timeout');
    if (this.lifetimeDeadline > 0 && now >= this.lifetimeDeadline) return this.close('max_lifetime');
    if (this.removalDeadline > 0 && now >= this.removalDeadline) return this.close('removed');
    if (this.halfCloseDeadline > 0 && now >= this.halfCloseDeadline) return this.close('half_close_timeout');
    if (this.connectDeadline > 0 && now >= this.connectDeadline) {
      this.dialFailed('ETIMEDOUT');
      if ((this.state as ConnectionState) === 'closed') return;
    }
    const { idleMs } = this.settings.timeouts;
    if (idleMs > 0 && this.lastActivity > 0 && now - this.lastActivity >= idleMs) return this.close('idle_timeout');
    this.armTimer();
  }

  /**
   * The access log's timings, in ms: waiting in the queue, dialling until a backend answered
   * (failed attempts included), and the whole life from admission; -1 for a phase never reached.
   */
  timings(now = Date.now()): { queueMs: number; connectMs: number; durationMs: number; attempts: number } {
    return {
      queueMs: this.startedAt > 0 ? this.startedAt - this.acceptedAt : -1,
      connectMs: this.connectedAt > 0 ? this.connectedAt - this.dialStartedAt : -1,
      durationMs: now - this.acceptedAt,
      attempts: this.attempts,
    };
  }

  /** For the admin API and tests: the connection as plain data. */
  describe(now = Date.now()): ConnectionInfo {
    return {
      id: this.id,
      listener: this.owner.name,
      route: this.route?.name ?? null,
      client: formatHostPort(this.clientAddress, this.clientPort),
      via: this.via,
      sni: this.sni,
      backend: this.backendAddress?.text ?? null,
      state: this.state,
      ageMs: this.age(now),
      bytesFromClient: this.bytesFromClient,
      bytesFromBackend: this.bytesFromBackend,
    };
  }
}

export interface ConnectionInfo {
  readonly id: number;
  readonly listener: string;
  readonly route: string | null;
  readonly client: string;
  readonly via: string | null;
  readonly sni: string | null;
  readonly backend: string | null;
  readonly state: ConnectionState;
  readonly ageMs: number;
  readonly bytesFromClient: number;
  readonly bytesFromBackend: number;
}

/** True when `buf` begins with a complete v1 ("PROXY ") or v2 signature. */
function startsWithProxySignature(buf: Buffer): boolean {
  const starts = (signature: Buffer): boolean =>
    buf.length >= signature.length && buf.compare(signature, 0, signature.length, 0, signature.length) === 0;
  return starts(V1_PREFIX) || starts(V2_SIGNATURE);
}

/**
 * Node keeps one timer list per distinct duration; arbitrary millisecond delays would give each
 * connection a list of its own. Long delays are rounded up to whole seconds (the timer re-checks
 * and re-arms when it fires, so a deadline is never missed, at most a second late); short ones,
 * where precision matters, are kept as they are. Never past setTimeout's maximum, which Node
 * would turn into 1 ms (a busy loop of re-arms).
 */
function quantize(delay: number): number {
  return delay <= 2000 ? delay : Math.min(MAX_TIMER_MS, Math.ceil(delay / 1000) * 1000);
}


// Module-level handlers: `this` is the socket; the connection hangs off it.
// Each returns at once on a closed connection (see the header: a closed connection is inert).
function onClientData(this: OwnedSocket, chunk: Buffer): void {
  const conn = this[kConn];
  if (conn.state !== 'closed') conn.onClientData(chunk);
}
function onClientEnd(this: OwnedSocket): void {
  const conn = this[kConn];
  if (conn.state !== 'closed') conn.onClientEnd();
}
function onClientError(this: OwnedSocket): void {
  // Ordinary network endings (ECONNRESET, EPIPE, ETIMEDOUT): a reason, not a stack trace.
  const conn = this[kConn];
  if (conn.state === 'closed') return;
  conn.close(conn.state === 'relaying' || conn.state === 'closing' ? 'client_reset' : 'client_gone');
}
function onClientClose(this: OwnedSocket): void {
  this[kConn].onClientClose();
}
function onClientDrain(this: OwnedSocket): void {
  const conn = this[kConn];
  if (conn.state !== 'closed') conn.backend?.resume();
}
function onBackendConnect(this: OwnedSocket): void {
  const conn = this[kConn];
  if (conn.backend === this && conn.state === 'connecting') conn.onBackendConnect();
}
function onBackendEnd(this: OwnedSocket): void {
  const conn = this[kConn];
  if (conn.backend === this && conn.state !== 'closed') conn.onBackendEnd();
}
function onBackendDrain(this: OwnedSocket): void {
  const conn = this[kConn];
  if (conn.state !== 'closed') conn.client.resume();
}
function onBackendError(this: OwnedSocket, err: NodeJS.ErrnoException): void {
  this[kConn].onBackendError(this, err);
}
function onBackendClose(this: OwnedSocket): void {
  this[kConn].onBackendClose(this);
}
function onDeadline(conn: Connection): void {
  conn.onTimer();
}
