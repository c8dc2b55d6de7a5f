// Rules that compare values across the file: duplicates, overlapping binds, route reachability,
// settings that only make sense together. They read the raw TOML rather than the schema's output
// so that they still run when some other part of the file is invalid, and one pass reports
// everything. Values the schema rejects are skipped here: the schema has already said why.
import { formatPath, formatValue } from './issues.ts';
import { ipFamily, isLoopbackHost, isUnitError, normalizeHost, parseDuration, parseHostPort, parseSniPattern } from './units.ts';
import type { ConfigIssue, HostPort } from './types.ts';

type Table = Record<string, unknown>;
type Path = readonly PropertyKey[];

function isTable(value: unknown): value is Table {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof Date);
}

function tablesIn(value: unknown): { table: Table; index: number }[] {
  if (!Array.isArray(value)) return [];
  return value.flatMap((table, index) => (isTable(table) ? [{ table, index }] : []));
}

/** The strings of a "one or a list" key with the path of each (`bind` or `bind[2]`). */
function stringsIn(value: unknown, path: Path): { text: string; path: Path }[] {
  if (typeof value === 'string') return [{ text: value, path }];
  if (!Array.isArray(value)) return [];
  return value.flatMap((text, index) => (typeof text === 'string' ? [{ text, path: [...path, index] }] : []));
}

function describeRoute(table: Table): string {
  return typeof table.name === 'string' ? `route ${formatValue(table.name)}` : 'this route';
}

/** Every cross-field problem in a parsed TOML document. */
export function checkCrossFieldRules(raw: Table): ConfigIssue[] {
  const issues: ConfigIssue[] = [];
  const listeners = tablesIn(raw.listeners);
  issues.push(...duplicateNames(listeners.map(({ table, index }) => ({ table, path: ['listeners', index] })), 'listener'));
  issues.push(...bindConflicts(listeners.map(({ table, index }) => ({ table, path: ['listeners', index] })), raw.admin));
  for (const { table: listener, index } of listeners) {
    const routes = tablesIn(listener.routes).map(({ table, index: r }) => ({ table, path: ['listeners', index, 'routes', r] as Path }));
    issues.push(...duplicateNames(routes, 'route'), ...routeRules(routes));
  }
  issues.push(...adminExposure(raw.admin), ...dnsServers(raw.dns));
  return issues;
}

function duplicateNames(tables: { table: Table; path: Path }[], kind: string): ConfigIssue[] {
  const issues: ConfigIssue[] = [];
  const firstPath = new Map<string, Path>();
  for (const { table, path } of tables) {
    if (typeof table.name !== 'string') continue;
    const first = firstPath.get(table.name);
    if (first === undefined) firstPath.set(table.name, path);
    else {
      const scope = kind === 'route' ? ' in this listener' : '';
      issues.push({
        path: formatPath([...path, 'name']),
        message: `duplicate ${kind} name ${formatValue(table.name)}${scope} (first used at ${formatPath(first)})`,
      });
    }
  }
  return issues;
}

interface Bind {
  readonly address: HostPort;
  readonly host: string;
  readonly path: Path;
  /** `[::]` of a listener with ipv6_only = false also takes the port on every IPv4 address. */
  readonly dualStack: boolean;
}

// "0.0.0.0:X" takes port X on every IPv4 address and "[::]:X" on every IPv6 address: listeners
// bind IPv6 addresses IPv6-only (as nginx does), so the two coexist, as README promises.
// A wildcard collides with another bind of its own family on X; host names are compared as
// written (they may resolve to either family).
function overlaps(a: Bind, b: Bind): boolean {
  // Port 0 means "any free port": two of them never collide.
  if (a.address.port !== b.address.port || a.address.port === 0) return false;
  if (a.host === b.host) return true;
  return covers(a, b) || covers(b, a);
}

/**
 * True when `wildcard` is 0.0.0.0 or :: and `other` an address literal it takes too: one of its
 * own family, or (a dual-stack `[::]`) any IPv4 address, 0.0.0.0 included.
 */
function covers(wildcard: Bind, other: Bind): boolean {
  const family = ipFamily(other.host);
  if (wildcard.host === '0.0.0.0') return family === 4;
  if (wildcard.host === '::') return family === 6 || (wildcard.dualStack && family === 4);
  return false;
}

/** Binds that collide with an earlier one; the admin API's TCP address takes part too. */
function bindConflicts(listeners: { table: Table; path: Path }[], admin: unknown): ConfigIssue[] {
  const issues: ConfigIssue[] = [];
  const seen: Bind[] = [];
  const entries = listeners.flatMap(({ table, path }) =>
    stringsIn(table.bind, [...path, 'bind']).map((entry) => ({ ...entry, dualStack: table.ipv6_only === false })));
  if (isTable(admin)) entries.push(...stringsIn(admin.listen, ['admin', 'listen']).map((entry) => ({ ...entry, dualStack: false })));
  for (const entry of entries) {
    const address = parseHostPort(entry.text, { allowPortZero: true });
    if (isUnitError(address)) continue;
    const bind: Bind = { address, host: normalizeHost(address.host), path: entry.path, dualStack: entry.dualStack };
    const earlier = seen.find((other) => overlaps(other, bind));
    if (earlier !== undefined) {
      const message = earlier.host === bind.host
        ? `${formatValue(entry.text)} is already bound at ${formatPath(earlier.path)}`
        : `${formatValue(entry.text)} overlaps ${formatValue(earlier.address.text)} bound at ${formatPath(earlier.path)}`;
      issues.push({ path: formatPath(entry.path), message });
    }
    seen.push(bind);
  }
  return issues;
}

function routeRules(routes: { table: Table; path: Path }[]): ConfigIssue[] {
  const issues: ConfigIssue[] = [];
  let defaultRoute: Path | undefined;
  const sniOwner = new Map<string, Path>();
  for (const { table, path } of routes) {
    if (table.default === true) {
      if (defaultRoute === undefined) defaultRoute = path;
      else {
        issues.push({
          path: formatPath([...path, 'default']),
          message: `${describeRoute(table)} is a second route with default = true (${formatPath(defaultRoute)} is already the default)`,
        });
      }
    }

    const names = stringsIn(table.sni, [...path, 'sni']);
    for (const { text, path: sniPath } of names) {
      const pattern = parseSniPattern(text);
      if (isUnitError(pattern)) continue;
      const owner = sniOwner.get(pattern);
      if (owner === undefined) sniOwner.set(pattern, path);
      else {
        const where = owner === path ? 'listed twice in this route' : `already routed by ${formatPath(owner)}`;
        issues.push({ path: formatPath(sniPath), message: `${formatValue(text)} is ${where}` });
      }
    }

    const sniIsAbsentOrEmpty = table.sni === undefined || (Array.isArray(table.sni) && table.sni.length === 0);
    const defaultIsValid = table.default === undefined || typeof table.default === 'boolean';
    if (sniIsAbsentOrEmpty && defaultIsValid && table.default !== true) {
      issues.push({
        path: formatPath(path),
        message: `${describeRoute(table)} has no sni and is not default = true, so no connection can reach it`,
      });
    }

    issues.push(...backendRules(table, path), ...slowStartRules(table, path), ...healthCheckRules(table.health_check, [...path, 'health_check']), ...ejectionRules(table.ejection, [...path, 'ejection']));

    if (table.pass_through_tlvs !== undefined && table.send_proxy_protocol !== 'v2') {
      const sending = table.send_proxy_protocol === undefined
        ? 'send_proxy_protocol is not set'
        : `got send_proxy_protocol = ${formatValue(table.send_proxy_protocol)}`;
      issues.push({
        path: formatPath([...path, 'pass_through_tlvs']),
        message: `${formatValue(table.pass_through_tlvs)} needs send_proxy_protocol = "v2" (${sending})`,
      });
    }
  }
  return issues;
}

function adminExposure(admin: unknown): ConfigIssue[] {
  if (!isTable(admin) || typeof admin.listen !== 'string' || admin.allow_public === true) return [];
  if (admin.listen.startsWith('unix:')) return [];
  const address = parseHostPort(admin.listen);
  if (isUnitError(address) || isLoopbackHost(address.host)) return [];
  return [{
    path: 'admin.listen',
    message: `${formatValue(admin.listen)} is not a loopback address, and the admin API has no authentication (set admin.allow_public = true to expose it anyway)`,
  }];
}

/** The address of one `backends` entry as written, whichever form it has. */
function backendAddress(entry: unknown): string | undefined {
  if (typeof entry === 'string') return entry;
  if (isTable(entry) && typeof entry.address === 'string') return entry.address;
  return undefined;
}

/** The same address twice in one route, and a route whose backends are all backups. */
function backendRules(route: Table, path: Path): ConfigIssue[] {
  const entries = Array.isArray(route.backends) ? route.backends : [route.backends];
  const issues: ConfigIssue[] = [];
  const first = new Map<string, number>();
  entries.forEach((entry, index) => {
    const text = backendAddress(entry);
    if (text === undefined) return;
    const address = parseHostPort(text);
    if (isUnitError(address)) return;
    const key = `${normalizeHost(address.host)}:${address.port}`;
    const earlier = first.get(key);
    const at: Path = Array.isArray(route.backends) ? [...path, 'backends', index] : [...path, 'backends'];
    if (earlier === undefined) first.set(key, index);
    else issues.push({ path: formatPath(at), message: `${formatValue(text)} is listed twice in this route (first at backends[${earlier}])` });
  });
  if (entries.length > 0 && entries.every((entry) => isTable(entry) && entry.backup === true)) {
    issues.push({ path: formatPath([...path, 'backends']), message: `every backend of ${describeRoute(route)} is a backup; at least one must be a primary (backup = false)` });
  }
  return issues;
}

/** slow_start ramps weights; source_hash's weights place clients, so a ramp would move them back and forth. */
function slowStartRules(route: Table, path: Path): ConfigIssue[] {
  if (route.balance !== 'source_hash' || typeof route.slow_start !== 'string') return [];
  const ms = parseDuration(route.slow_start);
  if (isUnitError(ms) || ms === 0) return [];
  return [{ path: formatPath([...path, 'slow_start']), message: `slow_start does not apply to balance = "source_hash" (a ramping weight would move clients between backends and back); remove it or use another balance` }];
}

/** Keys of a health check that belong to another check type, and a send_expect with nothing to expect. */
function healthCheckRules(check: unknown, path: Path): ConfigIssue[] {
  if (!isTable(check)) return [];
  const type = check.type ?? 'tcp';
  if (typeof type !== 'string') return [];
  const issues: ConfigIssue[] = [];
  const only = (key: string, needed: string): void => {
    if (check[key] !== undefined && type !== needed) {
      issues.push({ path: formatPath([...path, key]), message: `${key} applies only to type = ${formatValue(needed)} (got type = ${formatValue(type)})` });
    }
  };
  for (const key of ['send', 'expect', 'expect_regex']) only(key, 'send_expect');
  for (const key of ['tls_server_name', 'tls_verify']) only(key, 'tls');
  if (type === 'send_expect') {
    if (check.expect !== undefined && check.expect_regex !== undefined) {
      issues.push({ path: formatPath([...path, 'expect_regex']), message: 'set expect (a prefix) or expect_regex, not both' });
    } else if (check.expect === undefined && check.expect_regex === undefined) {
      issues.push({ path: formatPath(path), message: 'type = "send_expect" needs expect (a prefix of the reply) or expect_regex' });
    }
  }
  return issues;
}

function ejectionRules(ejection: unknown, path: Path): ConfigIssue[] {
  if (!isTable(ejection) || typeof ejection.base_time !== 'string' || typeof ejection.max_time !== 'string') return [];
  const base = parseDuration(ejection.base_time);
  const max = parseDuration(ejection.max_time);
  if (isUnitError(base) || isUnitError(max) || base <= max) return [];
  return [{ path: formatPath([...path, 'max_time']), message: `${formatValue(ejection.max_time)} is shorter than base_time = ${formatValue(ejection.base_time)}` }];
}

/** Name servers are addresses: resolving their own names would need a resolver. */
function dnsServers(dns: unknown): ConfigIssue[] {
  if (!isTable(dns) || !Array.isArray(dns.servers)) return [];
  return dns.servers.flatMap((text, index) => {
    if (typeof text !== 'string') return [];
    const address = parseHostPort(text);
    if (isUnitError(address) || ipFamily(address.host) !== null) return [];
    return [{ path: formatPath(['dns', 'servers', index]), message: `${formatValue(text)} is a host name; name servers must be IP addresses` }];
  });
}
