// `check-config --dump`: a loaded Config written back as TOML with every default filled in (as
// `nginx -T` prints what nginx runs). What a listener inherits ([timeouts], the per-client
// [limits], [reload] on_removal) is written out in each listener and route, because that is what
// each one runs with; the file `check-config` accepts again and loads to the same Config.
import { isLoopbackHost } from './units.ts';
import { redactRedisUrl } from '../cluster/redis-url.ts';
import type { AdminListen, BackendConfig, ClusterConfig, Config, FirewallRules, HealthCheckConfig, HostPort, ListenerConfig, RouteConfig, Timeouts } from './types.ts';

const DURATION_UNITS: ReadonlyArray<readonly [string, number]> = [['h', 3_600_000], ['m', 60_000], ['s', 1_000], ['ms', 1]];

/** Milliseconds -> the duration string parseDuration reads back: 90000 -> "1m30s", 0 -> "0s". */
export function formatDuration(ms: number): string {
  let rest = ms;
  let text = '';
  for (const [unit, size] of DURATION_UNITS) {
    const count = Math.floor(rest / size);
    if (count > 0) text += `${count}${unit}`;
    rest -= count * size;
  }
  return text.length === 0 ? '0s' : text;
}

const ESCAPES: Record<string, string> = { '"': '\\"', '\\': '\\\\', '\b': '\\b', '\t': '\\t', '\n': '\\n', '\f': '\\f', '\r': '\\r' };

/** A TOML basic string: quotes, backslashes and control characters (DEL too) escaped. */
export function tomlString(text: string): string {
  const escaped = text.replace(/["\\\u0000-\u001f\u007f]/g, (c) => ESCAPES[c] ?? `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  return `"${escaped}"`;
}

function list(items: readonly string[]): string {
  return `[${items.join(', ')}]`;
}

function strings(items: readonly string[]): string {
  return list(items.map(tomlString));
}

function addresses(items: readonly HostPort[]): string {
  return strings(items.map((address) => address.text));
}

/** A plain string for a backend with the defaults, else an inline table. */
function backendList(items: readonly BackendConfig[]): string {
  return list(items.map((b) => {
    const { address, weight, backup, maxConnections, ...rest } = b;
    allWritten(rest);
    if (weight === 1 && !backup && maxConnections === 0) return tomlString(address.text);
    return `{ address = ${tomlString(address.text)}, weight = ${weight}, backup = ${backup}, max_connections = ${maxConnections} }`;
  }));
}

function healthCheckLines(check: HealthCheckConfig): string[] {
  const { type, intervalMs, timeoutMs, rise, fall, jitterPct, send, expect, expectRegex, tlsServerName, tlsVerify, proxyProtocol, ...rest } = check;
  allWritten(rest);
  const lines = [
    '',
    '    [listeners.routes.health_check]',
    `    type = ${tomlString(type)}`,
    `    interval = ${tomlString(formatDuration(intervalMs))}`,
    `    timeout = ${tomlString(formatDuration(timeoutMs))}`,
    `    rise = ${rise}`,
    `    fall = ${fall}`,
    `    jitter = ${jitterPct}`,
  ];
  if (send !== null) lines.push(`    send = ${tomlString(send)}`);
  if (expect !== null) lines.push(`    expect = ${tomlString(expect)}`);
  if (expectRegex !== null) lines.push(`    expect_regex = ${tomlString(expectRegex)}`);
  if (type === 'tls') {
    if (tlsServerName !== null) lines.push(`    tls_server_name = ${tomlString(tlsServerName)}`);
    lines.push(`    tls_verify = ${tlsVerify}`);
  }
  lines.push(`    proxy_protocol = ${tomlString(proxyProtocol)}`);
  return lines;
}

function adminListen(admin: AdminListen): string {
  return tomlString(admin.kind === 'unix' ? `unix:${admin.path}` : admin.address.text);
}

// A compile-time check: `rest` is what a destructuring left over, so a field added to a config
// type and not written here fails `npm run typecheck` instead of vanishing from the dump.
function allWritten(rest: Record<string, never>): void {
  void rest;
}

function firewallLines(table: string, rules: FirewallRules, indent: string): string[] {
  const { allow, block, ...rest } = rules;
  allWritten(rest);
  return ['', `${indent}[${table}]`, `${indent}allow = ${strings(allow)}`, `${indent}block = ${strings(block)}`];
}

function timeoutLines(timeouts: Timeouts, indent: string): string[] {
  const { connectMs, clientHelloMs, idleMs, halfCloseMs, maxLifetimeMs, maxLifetimeJitterPct, ...rest } = timeouts;
  allWritten(rest);
  return [
    `${indent}connect = ${tomlString(formatDuration(connectMs))}`,
    `${indent}client_hello = ${tomlString(formatDuration(clientHelloMs))}`,
    `${indent}idle = ${tomlString(formatDuration(idleMs))}`,
    `${indent}half_close = ${tomlString(formatDuration(halfCloseMs))}`,
    `${indent}max_lifetime = ${tomlString(formatDuration(maxLifetimeMs))}`,
    `${indent}max_lifetime_jitter = ${maxLifetimeJitterPct}`,
  ];
}

function listenerLines(listener: ListenerConfig): string[] {
  const {
    name, path, bind, workers, queue, queueTimeoutMs, reject, accessLog, ipv6Only,
    timeouts, limits, firewall, proxyProtocol, onRemoval, routes, ...rest
  } = listener;
  allWritten(rest);
  const { maxConnectionsPerIp, connectionRatePerIp, fairShareAbove, ...restOfLimits } = limits;
  allWritten(restOfLimits);
  const lines = [
    '',
    `# ${path}`,
    '[[listeners]]',
    `name = ${tomlString(name)}`,
    `bind = ${addresses(bind)}`,
    `workers = ${workers}`,
    `queue = ${queue}`,
    `queue_timeout = ${tomlString(formatDuration(queueTimeoutMs))}`,
    `reject = ${tomlString(reject)}`,
    `access_log = ${accessLog}`,
    `ipv6_only = ${ipv6Only}`,
    `on_removal = ${tomlString(onRemoval)}`,
    '',
    '  [listeners.timeouts]',
    ...timeoutLines(timeouts, '  '),
    '',
    '  [listeners.limits]',
    `  max_connections_per_ip = ${maxConnectionsPerIp}`,
    `  connection_rate_per_ip = { count = ${connectionRatePerIp.count}, per = ${tomlString(formatDuration(connectionRatePerIp.perMs))} }`,
    `  fair_share_above = ${fairShareAbove}`,
    ...firewallLines('listeners.firewall', firewall, '  '),
  ];
  if (proxyProtocol === null) lines.push('', '  # [listeners.proxy_protocol]: off');
  else {
    const { accept, trusted, require, ...restOfProxy } = proxyProtocol;
    allWritten(restOfProxy);
    lines.push('', '  [listeners.proxy_protocol]', `  accept = ${tomlString(accept)}`, `  trusted = ${strings(trusted)}`, `  require = ${require}`);
  }
  for (const route of routes) lines.push(...routeLines(route));
  return lines;
}

function routeLines(route: RouteConfig): string[] {
  const { name, path, sni, isDefault, backends, balance, onAllDown, slowStartMs, healthCheck, ejection, limits, firewall, sendProxyProtocol, passThroughTlvs, onRemoval, ...rest } = route;
  allWritten(rest);
  const { consecutiveFailures, baseTimeMs, maxTimeMs, maxSharePct, ...restOfEjection } = ejection;
  allWritten(restOfEjection);
  const lines = [
    '',
    `  # ${path}`,
    '  [[listeners.routes]]',
    `  name = ${tomlString(name)}`,
    `  sni = ${strings(sni)}`,
    `  default = ${isDefault}`,
    `  backends = ${backendList(backends)}`,
    `  balance = ${tomlString(balance)}`,
    `  on_all_down = ${tomlString(onAllDown)}`,
    `  slow_start = ${tomlString(formatDuration(slowStartMs))}`,
  ];
  // pass_through_tlvs is only allowed next to send_proxy_protocol = "v2".
  if (sendProxyProtocol === null) lines.push('  # send_proxy_protocol: off');
  else lines.push(`  send_proxy_protocol = ${tomlString(sendProxyProtocol)}`);
  if (sendProxyProtocol === 'v2') lines.push(`  pass_through_tlvs = ${list(passThroughTlvs.map(String))}`);
  lines.push(
    `  on_removal = ${tomlString(onRemoval)}`,
    '',
    '    [listeners.routes.limits]',
    `    max_connections = ${limits.maxConnections}`,
    '',
    '    [listeners.routes.ejection]',
    `    consecutive_failures = ${consecutiveFailures}`,
    `    base_time = ${tomlString(formatDuration(baseTimeMs))}`,
    `    max_time = ${tomlString(formatDuration(maxTimeMs))}`,
    `    max_share = ${maxSharePct}`,
    ...firewallLines('listeners.routes.firewall', firewall, '    '),
  );
  if (healthCheck === null) lines.push('', '    # [listeners.routes.health_check]: off');
  else lines.push(...healthCheckLines(healthCheck));
  return lines;
}

/** `[cluster]`; a password in the URL is written "redacted" (a dump is shared; use password_file). */
function clusterLines(cluster: ClusterConfig | null): string[] {
  if (cluster === null) return ['# [cluster]: off (limits are this instance\'s own)'];
  const { redis, passwordFile, instance, timeoutMs, onStoreFailure, leaseTtlMs, keyPrefix, maxConnectionsPerIp, connectionRatePerIp, ...rest } = cluster;
  allWritten(rest);
  const limits = [...(maxConnectionsPerIp ? ['max_connections_per_ip'] : []), ...(connectionRatePerIp ? ['connection_rate_per_ip'] : [])];
  return [
    '[cluster]',
    `redis = ${tomlString(redactRedisUrl(redis))}`,
    passwordFile === null ? '# password_file: none' : `password_file = ${tomlString(passwordFile)}`,
    `instance = ${tomlString(instance)}`,
    `timeout = ${tomlString(formatDuration(timeoutMs))}`,
    `on_store_failure = ${tomlString(onStoreFailure)}`,
    `lease_ttl = ${tomlString(formatDuration(leaseTtlMs))}`,
    `key_prefix = ${tomlString(keyPrefix)}`,
    `limits = ${strings(limits)}`,
  ];
}

/** The effective configuration as TOML that check-config accepts and that loads to `config` again. */
export function dumpConfig(config: Config): string {
  const { file, limits, firewall, logging, admin, dns, process, shutdown, listeners, cluster, ...rest } = config;
  allWritten(rest);
  const { maxConnections, ipv6Prefix, maxTrackedIps, ...restOfLimits } = limits;
  const { level, rejectionSummaryIntervalMs, ...restOfLogging } = logging;
  const { drainTimeoutMs, shutdownDelayMs, ...restOfShutdown } = shutdown;
  const { threads, ...restOfProcess } = process;
  const { servers, timeoutMs, minTtlMs, maxTtlMs, retryMs, ...restOfDns } = dns;
  for (const leftOver of [restOfLimits, restOfLogging, restOfShutdown, restOfProcess, restOfDns]) allWritten(leftOver);
  const lines = [
    `# smartproxy check-config --dump of ${file.replace(/[\r\n]/g, ' ')}`,
    '# Every default is filled in; what listeners and routes inherit ([timeouts], the per-client',
    '# [limits], [reload] on_removal) is written out in each of them.',
    '',
    '[process]',
    `threads = ${threads === 'auto' ? tomlString('auto') : threads}`,
    '',
    '[limits]',
    `max_connections = ${maxConnections}`,
    `ipv6_prefix = ${ipv6Prefix}`,
    `max_tracked_ips = ${maxTrackedIps}`,
    ...firewallLines('firewall', firewall, ''),
    '',
    '[logging]',
    `level = ${tomlString(level)}`,
    `rejection_summary_interval = ${tomlString(formatDuration(rejectionSummaryIntervalMs))}`,
    '',
  ];
  if (admin === null) lines.push('# [admin]: off');
  else {
    // A loaded config with a non-loopback TCP address had allow_public = true.
    const isPublic = admin.kind === 'tcp' && !isLoopbackHost(admin.address.host);
    lines.push('[admin]', `listen = ${adminListen(admin)}`, `allow_public = ${isPublic}`);
  }
  lines.push(
    '',
    '[dns]',
    ...(servers === null ? ['# servers: the system\'s (/etc/resolv.conf)'] : [`servers = ${addresses(servers)}`]),
    `timeout = ${tomlString(formatDuration(timeoutMs))}`,
    `min_ttl = ${tomlString(formatDuration(minTtlMs))}`,
    `max_ttl = ${tomlString(formatDuration(maxTtlMs))}`,
    `retry = ${tomlString(formatDuration(retryMs))}`,
    '',
    '[shutdown]',
    `drain_timeout = ${tomlString(formatDuration(drainTimeoutMs))}`,
    `shutdown_delay = ${tomlString(formatDuration(shutdownDelayMs))}`,
  );
  lines.push('', ...clusterLines(cluster));
  for (const listener of listeners) lines.push(...listenerLines(listener));
  return `${lines.join('\n')}\n`;
}
