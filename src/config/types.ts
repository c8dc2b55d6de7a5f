// The validated configuration: what `loadConfig` returns once every check has passed.
// Every default is filled in, every inherited value resolved (global -> listener -> route),
// every duration is in milliseconds and every address parsed. Nothing here is mutated after load.

/** A parsed `host:port` (IPv6 literals are written `[::1]:8443`). */
export interface HostPort {
  /** Host name or IP literal without brackets: `127.0.0.1`, `::1`, `backend.internal`. */
  readonly host: string;
  readonly port: number;
  /** The string as written in the file, for logs and error messages. */
  readonly text: string;
}

export interface Timeouts {
  /** Backend TCP connect (host names are resolved ahead of time: backends/resolver.ts). */
  readonly connectMs: number;
  /**
   * Absolute deadline for the bytes needed to route (and the PROXY header), from the moment a
   * worker takes the connection: time waiting in the queue is bounded by queue_timeout instead.
   */
  readonly clientHelloMs: number;
  /** No bytes in either direction. 0 = off. */
  readonly idleMs: number;
  /** After one side sent FIN, how long the other direction may go on. 0 = off. */
  readonly halfCloseMs: number;
  /** 0 = unlimited. */
  readonly maxLifetimeMs: number;
  /** Percentage (0-100) by which each connection's lifetime is randomly shortened. */
  readonly maxLifetimeJitterPct: number;
}

/** New connections per sliding window from one client. `count = 0` means off. */
export interface RateLimit {
  readonly count: number;
  readonly perMs: number;
}

/** Limits a listener applies at accept, resolved from `[limits]` and `[listeners.limits]`. 0 = unlimited. */
export interface ListenerLimits {
  readonly maxConnectionsPerIp: number;
  readonly connectionRatePerIp: RateLimit;
  /** Occupancy percentage above which fair share applies; 0 = off. */
  readonly fairShareAbove: number;
}

export interface RouteLimits {
  /** 0 = unlimited. */
  readonly maxConnections: number;
}

/** Addresses and CIDRs as written (already validated); compiled into a matcher by governance/. */
export interface FirewallRules {
  readonly allow: readonly string[];
  readonly block: readonly string[];
}

export type ProxyProtocolVersion = 'v1' | 'v2';

export interface ProxyProtocolAccept {
  readonly accept: ProxyProtocolVersion | 'any';
  /** Addresses and CIDRs allowed to send a header (validated). */
  readonly trusted: readonly string[];
  readonly require: boolean;
}

export type OnRemoval = 'keep' | 'drain' | 'close';
export type RejectStyle = 'reset' | 'close';

/** One entry of a route's `backends`: a plain "host:port" string is weight 1, primary, uncapped. */
export interface BackendConfig {
  /** An IP literal, or a host name resolved through `[dns]` (every address it resolves to becomes a backend with these settings). */
  readonly address: HostPort;
  /** Share of new connections relative to the other backends (1-1000). */
  readonly weight: number;
  /** Used only while no primary backend of the route is up. */
  readonly backup: boolean;
  /** Connections to this backend at once over every thread; 0 = unlimited. */
  readonly maxConnections: number;
}

export type Balance = 'round_robin' | 'least_conn' | 'random_two' | 'source_hash';

/** `[listeners.routes.health_check]`: active checks of every backend of the route. */
export interface HealthCheckConfig {
  readonly type: 'tcp' | 'send_expect' | 'tls';
  readonly intervalMs: number;
  readonly timeoutMs: number;
  readonly rise: number;
  readonly fall: number;
  /** Each interval is randomised by up to this percentage either way. */
  readonly jitterPct: number;
  /** send_expect: bytes written after connecting (TOML escapes such as "\r\n" apply). */
  readonly send: string | null;
  /** send_expect: the reply must begin with these bytes... */
  readonly expect: string | null;
  /** ...or match this regular expression. */
  readonly expectRegex: string | null;
  /** tls: the SNI sent; null = the route's first exact server name, else none. */
  readonly tlsServerName: string | null;
  readonly tlsVerify: boolean;
  /** "local": a PROXY v2 LOCAL header first (the default when the route sends PROXY); "none": nothing. */
  readonly proxyProtocol: 'local' | 'none';
}

/** `[listeners.routes.ejection]`: passive ejection on consecutive connect failures. */
export interface EjectionConfig {
  /** 0 = passive ejection off. */
  readonly consecutiveFailures: number;
  /** Cooldown = base x times ejected in a row, capped at max. */
  readonly baseTimeMs: number;
  readonly maxTimeMs: number;
  /** At most this percentage of the route's backends ejected passively at once. */
  readonly maxSharePct: number;
}

export interface RouteConfig {
  readonly name: string;
  /** TOML path of this route, e.g. `listeners[0].routes[1]`, for messages. */
  readonly path: string;
  /** Lower-cased; exact names and `*.suffix` wildcards. */
  readonly sni: readonly string[];
  readonly isDefault: boolean;
  readonly backends: readonly BackendConfig[];
  readonly balance: Balance;
  /** Every backend down (checks, ejection): "panic" tries them all anyway, "refuse" closes with no_healthy_backend. */
  readonly onAllDown: 'panic' | 'refuse';
  /**
   * A backend back in rotation (checks up again, an ejection over, ready again, or added) ramps
   * its weight from 10 % to 100 % over this long. 0 = off. Not for source_hash.
   */
  readonly slowStartMs: number;
  readonly healthCheck: HealthCheckConfig | null;
  readonly ejection: EjectionConfig;
  readonly limits: RouteLimits;
  readonly firewall: FirewallRules;
  readonly sendProxyProtocol: ProxyProtocolVersion | null;
  /** TLV types copied from a received v2 header into the one we send. */
  readonly passThroughTlvs: readonly number[];
  readonly onRemoval: OnRemoval;
}

export interface ListenerConfig {
  readonly name: string;
  readonly path: string;
  readonly bind: readonly HostPort[];
  /** Connection slots: the most connections this listener proxies at once. */
  readonly workers: number;
  /** Accepted connections waiting for a slot; 0 = reject when every worker is busy. */
  readonly queue: number;
  readonly queueTimeoutMs: number;
  readonly reject: RejectStyle;
  /** One info line per finished connection (refusals stay in the de-duplicated summaries). */
  readonly accessLog: boolean;
  /** IPv6 binds take IPv6 only (default, as nginx); false: `[::]` takes IPv4 too, as ::ffff:a.b.c.d. */
  readonly ipv6Only: boolean;
  readonly timeouts: Timeouts;
  readonly limits: ListenerLimits;
  readonly firewall: FirewallRules;
  readonly proxyProtocol: ProxyProtocolAccept | null;
  readonly onRemoval: OnRemoval;
  readonly routes: readonly RouteConfig[];
}

export type AdminListen =
  | { readonly kind: 'tcp'; readonly address: HostPort }
  | { readonly kind: 'unix'; readonly path: string };

export type OnStoreFailure = 'local' | 'open' | 'closed';

/**
 * `[cluster]`: per-client limits shared by several instances through Redis (src/cluster/).
 * Never holds a secret read from a file: `passwordFile` is read when the store connects.
 */
export interface ClusterConfig {
  /** As written: redis://, rediss:// or unix:/path; may carry credentials (logged only redacted). */
  readonly redis: string;
  readonly passwordFile: string | null;
  /** This instance's name in the shared counts (default: the host name). */
  readonly instance: string;
  /** Longest wait for one Redis call. */
  readonly timeoutMs: number;
  readonly onStoreFailure: OnStoreFailure;
  /** An instance's concurrency counts expire this long after it stopped renewing them. */
  readonly leaseTtlMs: number;
  readonly keyPrefix: string;
  /** Which per-client limits are cluster-wide. */
  readonly maxConnectionsPerIp: boolean;
  readonly connectionRatePerIp: boolean;
}

export interface Config {
  /** Absolute path of the file this was loaded from. */
  readonly file: string;
  readonly limits: {
    /** All listeners together; 0 = unlimited. */
    readonly maxConnections: number;
    /** IPv6 clients are grouped by this prefix length. */
    readonly ipv6Prefix: number;
    readonly maxTrackedIps: number;
  };
  readonly firewall: FirewallRules;
  readonly logging: {
    readonly level: 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'fatal';
    readonly rejectionSummaryIntervalMs: number;
  };
  readonly admin: AdminListen | null;
  /** How backend host names are resolved. */
  readonly dns: {
    /** IP:port of the name servers; null = the system's (resolv.conf). */
    readonly servers: readonly HostPort[] | null;
    readonly timeoutMs: number;
    /** Answers are re-resolved when their TTL runs out, clamped to [min, max]. */
    readonly minTtlMs: number;
    readonly maxTtlMs: number;
    /** After a failed resolution (the last good answer is kept), try again this soon. */
    readonly retryMs: number;
  };
  readonly process: {
    /** Event-loop threads running listeners; "auto" = os.availableParallelism(). Start-only. */
    readonly threads: number | 'auto';
  };
  readonly shutdown: {
    readonly drainTimeoutMs: number;
    readonly shutdownDelayMs: number;
  };
  readonly listeners: readonly ListenerConfig[];
  /** null = no [cluster]: limits are this instance's own. */
  readonly cluster: ClusterConfig | null;
}

/** One problem found in a config file. `path` is a TOML path such as `listeners[1].routes[0].backends[2]`. */
export interface ConfigIssue {
  readonly path: string;
  readonly message: string;
  /** 1-based line of the file where `path` (or its closest enclosing key or table) is written. */
  readonly line?: number;
}

export type LoadResult =
  | { readonly ok: true; readonly config: Config }
  | { readonly ok: false; readonly issues: readonly ConfigIssue[] };
