// Config file -> validated, resolved Config, or every problem in it. The pipeline:
// read -> TOML -> schema (types, leaves, unknown keys) + cross-field rules -> resolve
// (inherit global values into listeners and routes). Never throws: a daemon reloading a
// broken file keeps running on the old one and prints the issues.
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { resolve as resolvePath } from 'node:path';
import TOML from '@iarna/toml';
import { fromZodIssues, zodMessage } from './issues.ts';
import { indexLines, lineOf, statementAt } from './locate.ts';
import { checkCrossFieldRules } from './rules.ts';
import { configFileSchema, type ConfigFile } from './schema.ts';
import type { ClusterConfig, Config, ConfigIssue, HealthCheckConfig, ListenerConfig, ListenerLimits, LoadResult, OnRemoval, RouteConfig, Timeouts } from './types.ts';

/** Reads and checks a config file; an unreadable file is one issue at path `(file)`. */
export function loadConfig(file: string): LoadResult {
  const absolute = resolvePath(file);
  let text: string;
  try {
    text = readFileSync(absolute, 'utf8');
  } catch (error) {
    return { ok: false, issues: [{ path: '(file)', message: `cannot read ${absolute}: ${describeReadError(error)}` }] };
  }
  return parseConfigText(text, absolute);
}

/** Checks config text; `file` is only recorded (resolved to an absolute path) in the Config. */
export function parseConfigText(text: string, file: string): LoadResult {
  try {
    // An editor's byte-order mark is not a TOML syntax error worth reporting.
    const source = text.replace(/^\uFEFF/, '');
    const raw = parseToml(source);
    if ('issue' in raw) return { ok: false, issues: [raw.issue] };
    const parsed = configFileSchema.safeParse(raw.document, { error: zodMessage });
    const issues = [
      ...(parsed.success ? [] : fromZodIssues(parsed.error.issues, configFileSchema)),
      ...checkCrossFieldRules(raw.document),
    ];
    if (!parsed.success || issues.length > 0) return { ok: false, issues: withLines(issues, source, raw.document) };
    return { ok: true, config: deepFreeze(resolveConfig(parsed.data, resolvePath(file))) };
  } catch (error) {
    // Only a bug in this module gets here; report it instead of taking the daemon down.
    const detail = error instanceof Error ? error.message : String(error);
    return { ok: false, issues: [{ path: '(file)', message: `internal error while checking the file: ${detail}` }] };
  }
}

/**
 * One line per issue: `path (line N): message`, where the message shows the offending value.
 * `(syntax)` and `(file)` issues carry their position in the message.
 */
export function formatIssue(issue: ConfigIssue): string {
  if (issue.path.length === 0) return issue.message;
  const where = issue.line === undefined || issue.path.startsWith('(') ? '' : ` (line ${issue.line})`;
  return `${issue.path}${where}: ${issue.message}`;
}

// The line each issue's path is written on; issues whose path is nowhere in the file (a missing
// table, say) keep none.
function withLines(issues: readonly ConfigIssue[], source: string, document: Record<string, unknown>): ConfigIssue[] {
  const index = indexLines(source, document);
  return issues.map((issue) => {
    const line = lineOf(index, issue.path);
    return line === undefined ? issue : { ...issue, line };
  });
}

function describeReadError(error: unknown): string {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOENT') return 'no such file';
  if (code === 'EACCES' || code === 'EPERM') return 'permission denied';
  if (code === 'EISDIR') return 'is a directory';
  return error instanceof Error ? error.message : String(error);
}

interface TomlSyntaxError {
  readonly message: string;
  readonly line?: number;
  readonly col?: number;
}

function parseToml(text: string): { document: Record<string, unknown> } | { issue: ConfigIssue } {
  try {
    return { document: TOML.parse(text) as Record<string, unknown> };
  } catch (error) {
    const { message, line, col } = error as TomlSyntaxError;
    // @iarna/toml appends " at row R, col C, pos P:" and a code excerpt; we print our own position.
    const summary = String(message ?? error).split('\n')[0]?.replace(/ at row \d+, col \d+, pos \d+:$/, '') ?? 'invalid TOML';
    const said = `${summary.charAt(0).toLowerCase()}${summary.slice(1)}`;
    if (typeof line !== 'number' || typeof col !== 'number') return { issue: { path: '(syntax)', message: said } };
    // Its messages name no key ("can't redefine existing key"): name the key or table whose
    // statement holds the error, as nginx ends a message with "in file:12".
    const key = statementAt(text, line + 1);
    const at = key === undefined ? '' : ` (at ${key})`;
    return { issue: { path: '(syntax)', line: line + 1, message: `line ${line + 1}, column ${col + 1}: ${said}${at}` } };
  }
}

function resolveConfig(file: ConfigFile, absolutePath: string): Config {
  const timeouts: Timeouts = {
    connectMs: file.timeouts.connect,
    clientHelloMs: file.timeouts.client_hello,
    idleMs: file.timeouts.idle,
    halfCloseMs: file.timeouts.half_close,
    maxLifetimeMs: file.timeouts.max_lifetime,
    maxLifetimeJitterPct: file.timeouts.max_lifetime_jitter,
  };
  const limits: ListenerLimits = {
    maxConnectionsPerIp: file.limits.max_connections_per_ip,
    connectionRatePerIp: { count: file.limits.connection_rate_per_ip.count, perMs: file.limits.connection_rate_per_ip.per },
    fairShareAbove: file.limits.fair_share_above,
  };
  return {
    file: absolutePath,
    limits: {
      maxConnections: file.limits.max_connections,
      ipv6Prefix: file.limits.ipv6_prefix,
      maxTrackedIps: file.limits.max_tracked_ips,
    },
    firewall: { allow: file.firewall.allow, block: file.firewall.block },
    logging: { level: file.logging.level, rejectionSummaryIntervalMs: file.logging.rejection_summary_interval },
    admin: file.admin?.listen ?? null,
    dns: {
      servers: file.dns.servers ?? null,
      timeoutMs: file.dns.timeout,
      minTtlMs: file.dns.min_ttl,
      maxTtlMs: file.dns.max_ttl,
      retryMs: file.dns.retry,
    },
    process: { threads: file.process.threads },
    shutdown: { drainTimeoutMs: file.shutdown.drain_timeout, shutdownDelayMs: file.shutdown.shutdown_delay },
    listeners: file.listeners.map((listener, index) =>
      resolveListener(listener, index, { timeouts, limits, onRemoval: file.reload.on_removal })),
    cluster: file.cluster === undefined ? null : resolveCluster(file.cluster),
  };
}

function resolveCluster(cluster: NonNullable<ConfigFile['cluster']>): ClusterConfig {
  return {
    redis: cluster.redis,
    passwordFile: cluster.password_file ?? null,
    // A host name may hold characters a name may not ("_" aside, they are rare); keep what fits.
    instance: cluster.instance ?? (hostname().replace(/[^A-Za-z0-9_.-]/g, '-').slice(0, 64) || 'smartproxy'),
    timeoutMs: cluster.timeout,
    onStoreFailure: cluster.on_store_failure,
    leaseTtlMs: cluster.lease_ttl,
    keyPrefix: cluster.key_prefix,
    maxConnectionsPerIp: cluster.limits.includes('max_connections_per_ip'),
    connectionRatePerIp: cluster.limits.includes('connection_rate_per_ip'),
  };
}

type ListenerFile = ConfigFile['listeners'][number];
type RouteFile = ListenerFile['routes'][number];

interface Inherited {
  readonly timeouts: Timeouts;
  readonly limits: ListenerLimits;
  readonly onRemoval: OnRemoval;
}

function resolveListener(listener: ListenerFile, index: number, global: Inherited): ListenerConfig {
  const path = `listeners[${index}]`;
  const own = listener.timeouts;
  const rate = listener.limits?.connection_rate_per_ip;
  const onRemoval = listener.on_removal ?? global.onRemoval;
  const proxy = listener.proxy_protocol;
  return {
    name: listener.name,
    path,
    bind: listener.bind,
    workers: listener.workers,
    queue: listener.queue,
    queueTimeoutMs: listener.queue_timeout,
    reject: listener.reject,
    accessLog: listener.access_log,
    ipv6Only: listener.ipv6_only,
    timeouts: {
      connectMs: own?.connect ?? global.timeouts.connectMs,
      clientHelloMs: own?.client_hello ?? global.timeouts.clientHelloMs,
      idleMs: own?.idle ?? global.timeouts.idleMs,
      halfCloseMs: own?.half_close ?? global.timeouts.halfCloseMs,
      maxLifetimeMs: own?.max_lifetime ?? global.timeouts.maxLifetimeMs,
      maxLifetimeJitterPct: own?.max_lifetime_jitter ?? global.timeouts.maxLifetimeJitterPct,
    },
    limits: {
      maxConnectionsPerIp: listener.limits?.max_connections_per_ip ?? global.limits.maxConnectionsPerIp,
      connectionRatePerIp: {
        count: rate?.count ?? global.limits.connectionRatePerIp.count,
        perMs: rate?.per ?? global.limits.connectionRatePerIp.perMs,
      },
      fairShareAbove: listener.limits?.fair_share_above ?? global.limits.fairShareAbove,
    },
    // The listener's own lists only: the global firewall is checked separately, before it.
    firewall: { allow: listener.firewall.allow, block: listener.firewall.block },
    proxyProtocol: proxy === undefined ? null : { accept: proxy.accept, trusted: proxy.trusted, require: proxy.require },
    onRemoval,
    routes: listener.routes.map((route, routeIndex) => resolveRoute(route, `${path}.routes[${routeIndex}]`, onRemoval)),
  };
}

function resolveRoute(route: RouteFile, path: string, listenerOnRemoval: OnRemoval): RouteConfig {
  return {
    name: route.name,
    path,
    sni: route.sni ?? [],
    isDefault: route.default,
    backends: route.backends.map((b) =>
      'address' in b
        ? { address: b.address, weight: b.weight, backup: b.backup, maxConnections: b.max_connections }
        : { address: b, weight: 1, backup: false, maxConnections: 0 },
    ),
    balance: route.balance,
    onAllDown: route.on_all_down,
    slowStartMs: route.slow_start,
    healthCheck: resolveHealthCheck(route.health_check, route.send_proxy_protocol !== undefined),
    ejection: {
      consecutiveFailures: route.ejection.consecutive_failures,
      baseTimeMs: route.ejection.base_time,
      maxTimeMs: route.ejection.max_time,
      maxSharePct: route.ejection.max_share,
    },
    limits: { maxConnections: route.limits.max_connections },
    firewall: { allow: route.firewall.allow, block: route.firewall.block },
    sendProxyProtocol: route.send_proxy_protocol ?? null,
    passThroughTlvs: route.pass_through_tlvs,
    onRemoval: route.on_removal ?? listenerOnRemoval,
  };
}

function resolveHealthCheck(check: RouteFile['health_check'], routeSendsProxy: boolean): HealthCheckConfig | null {
  if (check === undefined) return null;
  return {
    type: check.type,
    intervalMs: check.interval,
    timeoutMs: check.timeout,
    rise: check.rise,
    fall: check.fall,
    jitterPct: check.jitter,
    send: check.send ?? null,
    expect: check.expect ?? null,
    expectRegex: check.expect_regex ?? null,
    tlsServerName: check.tls_server_name ?? null,
    tlsVerify: check.tls_verify,
    proxyProtocol: check.proxy_protocol ?? (routeSendsProxy ? 'local' : 'none'),
  };
}

function deepFreeze<T>(value: T): T {
  if (typeof value === 'object' && value !== null && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const child of Object.values(value)) deepFreeze(child);
  }
  return value;
}
