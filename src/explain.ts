// `check-config --explain CLIENT [--sni NAME] [--listener NAME]`: the path a connection from
// CLIENT with that SNI would take through a config, read from the config alone (nothing is
// bound): for each listener, every admission step in README's order, the rule that decides it,
// and where it would be refused. What an operator wants when a customer says "I am blocked".
import type { Config, FirewallRules, ListenerConfig } from './config/types.ts';
import { ipFamily, isUnitError, parseSniPattern } from './config/units.ts';
import { clientKey, unmappedIPv4 } from './governance/client-key.ts';
import { compileFirewall } from './governance/firewall.ts';
import { SharedBackendStates } from './backends/backend-states.ts';
import { BackendDirectory } from './backends/directory.ts';
import { CountIndexes } from './governance/shared-counts.ts';
import { RouteTable } from './routing/route-table.ts';

export interface ExplainQuery {
  /** An IPv4 or IPv6 address (IPv4-mapped IPv6 is the IPv4 client). */
  readonly client: string;
  /** The server name of the ClientHello; null = no TLS or no SNI. */
  readonly sni: string | null;
  /** Only this listener; null = every listener. */
  readonly listener: string | null;
}

/** One listener's verdict: the steps it went through and where it stopped, if it did. */
export interface ListenerExplanation {
  readonly listener: string;
  readonly steps: string[];
  /** The refusal reason, or null when the connection would be relayed. */
  readonly refused: string | null;
}

/** The explanation, or an error message for a query that cannot be asked (bad address, unknown listener). */
export function explain(config: Config, query: ExplainQuery): ListenerExplanation[] | { error: string } {
  const client = unmappedIPv4(query.client);
  if (ipFamily(client) === null) return { error: `"${query.client}" is not an IP address` };
  let sni: string | null = null;
  if (query.sni !== null) {
    const parsed = parseSniPattern(query.sni);
    if (isUnitError(parsed) || parsed.startsWith('*.')) return { error: `"${query.sni}" is not a server name` };
    sni = parsed;
  }
  const listeners = config.listeners.filter((l) => query.listener === null || l.name === query.listener);
  if (listeners.length === 0) return { error: `no listener named "${query.listener}" (listeners: ${config.listeners.map((l) => l.name).join(', ')})` };
  return listeners.map((listener) => explainListener(config, listener, client, sni));
}

function explainListener(config: Config, listener: ListenerConfig, client: string, sni: string | null): ListenerExplanation {
  const steps: string[] = [];
  const refuse = (reason: string, why: string): ListenerExplanation => {
    steps.push(`REFUSED: ${reason} (${why})`);
    return { listener: listener.name, steps, refused: reason };
  };
  steps.push(`listener "${listener.name}" on ${listener.bind.map((b) => b.text).join(', ')}`);

  const trusted = listener.proxyProtocol !== null && compileFirewall({ allow: listener.proxyProtocol.trusted, block: [] }).allows(client);
  if (trusted) {
    steps.push(
      `${client} is a trusted balancer (proxy_protocol.trusted ${matching(listener.proxyProtocol!.trusted, client).join(', ')}): the checks below apply to the client its PROXY header names, or to ${client} itself when it names none`,
    );
  } else if (listener.proxyProtocol !== null) {
    steps.push(`${client} is not in proxy_protocol.trusted: a PROXY header from it is refused (proxy_untrusted)`);
  }
  for (const [scope, rules] of [['global', config.firewall], ['listener', listener.firewall]] as const) {
    const verdict = firewallVerdict(rules, client);
    if (verdict !== null) return refuse('firewall', `${scope} firewall: ${verdict}`);
  }
  steps.push('firewall: allowed (global and listener)');

  const limits = listener.limits;
  const rate = limits.connectionRatePerIp;
  steps.push(
    `per-client limits for ${clientKey(client, config.limits.ipv6Prefix)}: ` +
      `max_connections_per_ip ${limits.maxConnectionsPerIp || 'unlimited'}, ` +
      `connection_rate_per_ip ${rate.count > 0 ? `${rate.count} per ${rate.perMs} ms` : 'off'}, ` +
      `fair share ${limits.fairShareAbove > 0 ? `above ${limits.fairShareAbove}% of workers + queue` : 'off'} (ip_limit, ip_rate, fair_share when exceeded)`,
  );
  steps.push(
    `capacity: ${listener.workers} workers, queue ${listener.queue} for ${listener.queueTimeoutMs} ms (queue_full, queue_timeout), ` +
      `global max_connections ${config.limits.maxConnections || 'unlimited'}`,
  );
  const cluster = config.cluster;
  if (cluster !== null) {
    const shared = [
      ...(cluster.maxConnectionsPerIp && limits.maxConnectionsPerIp > 0 ? ['max_connections_per_ip'] : []),
      ...(cluster.connectionRatePerIp && rate.count > 0 ? ['connection_rate_per_ip'] : []),
    ];
    steps.push(
      shared.length === 0
        ? '[cluster]: no per-client limit of this listener is cluster-wide: the store is not asked'
        : `[cluster]: ${shared.join(' and ')} also over every instance together, once the local checks and the worker slot or queue place passed ` +
            `(cluster_ip_limit, cluster_ip_rate; store unavailable: on_store_failure = "${cluster.onStoreFailure}"${cluster.onStoreFailure === 'closed' ? ', cluster_unavailable' : ''})`,
    );
  }

  const indexes = new CountIndexes();
  const directory = new BackendDirectory(new SharedBackendStates(), indexes);
  indexes.assign(config.listeners);
  indexes.assignBackends(directory.keysOf(config), Number.MAX_SAFE_INTEGER);
  const routes = new RouteTable(listener, () => 0, directory);
  let route = routes.defaultRoute;
  if (!routes.needsPeek) {
    steps.push(`routing: no SNI route, every connection goes to the default route "${route?.name}" without reading`);
  } else {
    steps.push(`routing: the first bytes are read within ${listener.timeouts.clientHelloMs} ms (client_hello_timeout)`);
    route = routes.match(sni);
    if (route === null) return refuse('no_route', sni === null ? 'no SNI and no default route' : `no route for "${sni}" and no default route`);
    const wildcard = sni === null ? undefined : route.config.sni.find((p) => p.startsWith('*.') && sni.endsWith(p.slice(1)));
    const how =
      sni === null ? 'no SNI (or not TLS): the default route'
      : route.config.sni.includes(sni) ? `SNI "${sni}" matches it exactly`
      : wildcard !== undefined ? `SNI "${sni}" matches "${wildcard}"`
      : `SNI "${sni}" matches no route name: the default route`;
    steps.push(`route "${route.name}": ${how}`);
  }
  if (route === null) return refuse('no_route', 'the listener has no route for it');
  const routeVerdict = firewallVerdict(route.config.firewall, client);
  if (routeVerdict !== null) return refuse('route_firewall', `route firewall: ${routeVerdict}`);
  const max = route.config.limits.maxConnections;
  steps.push(`route limit: ${max > 0 ? `${max} connections (route_limit when reached)` : 'unlimited'}`);
  const proxy = route.config.sendProxyProtocol === null ? '' : `, with a PROXY ${route.config.sendProxyProtocol} header`;
  const backends = route.config.backends.map((b) => `${b.address.text}${b.weight !== 1 ? ` weight ${b.weight}` : ''}${b.backup ? ' (backup)' : ''}${b.maxConnections > 0 ? ` max ${b.maxConnections}` : ''}`);
  const health = route.config.healthCheck === null ? 'no active checks' : `${route.config.healthCheck.type} checks every ${route.config.healthCheck.intervalMs} ms`;
  steps.push(
    `backends by ${route.config.balance}, up ones only (${health}; passive ejection ${route.config.ejection.consecutiveFailures > 0 ? `after ${route.config.ejection.consecutiveFailures} connect failures` : 'off'}), ` +
      `each tried at most once within ${listener.timeouts.connectMs} ms: ${backends.join(', ')}${proxy} ` +
      `(backend_unavailable when all fail, backend_full when all are at max_connections, ${route.config.onAllDown === 'refuse' ? 'no_healthy_backend' : 'all tried anyway (panic)'} when none is up)`,
  );
  steps.push('relayed');
  return { listener: listener.name, steps, refused: null };
}

/** Why a firewall refuses `client` (the deciding rule), or null when it allows it. */
function firewallVerdict(rules: FirewallRules, client: string): string | null {
  if (compileFirewall(rules).allows(client)) return null;
  const blocks = matching(rules.block, client);
  if (blocks.length > 0) return `block ${blocks.join(', ')}`;
  return `the allow list (${rules.allow.join(', ')}) does not include ${client}`;
}

/** The CIDRs of `list` that contain `client`. */
function matching(list: readonly string[], client: string): string[] {
  return list.filter((cidr) => compileFirewall({ allow: [cidr], block: [] }).allows(client));
}

/** The explanation as the text check-config prints. */
export function formatExplanation(query: ExplainQuery, explained: ListenerExplanation[]): string {
  const lines = [`a connection from ${query.client}${query.sni === null ? ' without SNI' : ` with SNI "${query.sni}"`}:`];
  for (const listener of explained) {
    lines.push('');
    for (const [i, step] of listener.steps.entries()) lines.push(`${i === 0 ? '' : '  '}${step}`);
  }
  return `${lines.join('\n')}\n`;
}
