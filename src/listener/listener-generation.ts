// One listener's config compiled for one generation: route table, firewalls, limits, timeouts,
// and the indexes of its counts in the shared counts. Immutable, and it knows nothing of the
// Listener that uses it; a reload builds a new one and swaps `listener.generation`. Connections
// keep the generation that admitted them, so a reload never changes their route or backend.
import type { Config, ListenerConfig, Timeouts } from '../config/types.ts';
import type { ConnectionSettings } from '../connection/connection.ts';
import { compileFirewall, type Firewall } from '../governance/firewall.ts';
import type { BackendDirectory } from '../backends/directory.ts';
import type { CountIndexes } from '../governance/shared-counts.ts';
import type { ProxyVersionAccept } from '../proxy-protocol/parse.ts';
import { RouteTable } from '../routing/route-table.ts';

/** Generations in order of creation: a later one has a larger `seq`. */
let generations = 0;

export class ListenerGeneration implements ConnectionSettings {
  /** Its place in the order of generations (see Listener.removedRoutes). */
  readonly seq = ++generations;
  readonly name: string;
  readonly config: ListenerConfig;
  readonly timeouts: Timeouts;
  readonly routes: RouteTable;
  readonly rejectStyle: 'reset' | 'close';
  readonly accessLog: boolean;
  readonly ipv6Prefix: number;
  readonly proxyAccept: ProxyVersionAccept | null;
  readonly proxyRequired: boolean;
  /** Sources allowed to send a PROXY header; null when the listener does not accept one. */
  readonly proxyTrusted: Firewall | null;
  /** Index of the listener's counts in the shared counts. */
  readonly countIndex: number;
  /** The global `limits.max_connections` (0 = unlimited) in force for this generation. */
  readonly globalMaxConnections: number;
  private readonly globalFirewall: Firewall;
  private readonly ownFirewall: Firewall;

  constructor(config: ListenerConfig, global: Config, globalFirewall: Firewall, indexes: CountIndexes, backends: BackendDirectory) {
    this.name = config.name;
    this.config = config;
    this.timeouts = config.timeouts;
    this.countIndex = indexes.listener(config.name);
    this.routes = new RouteTable(config, (route) => indexes.route(config.name, route.name), backends);
    this.rejectStyle = config.reject;
    this.accessLog = config.accessLog;
    this.ipv6Prefix = global.limits.ipv6Prefix;
    this.globalMaxConnections = global.limits.maxConnections;
    this.globalFirewall = globalFirewall;
    this.ownFirewall = compileFirewall(config.firewall);
    const pp = config.proxyProtocol;
    this.proxyAccept = pp?.accept ?? null;
    this.proxyRequired = pp?.require ?? false;
    this.proxyTrusted = pp === null ? null : compileFirewall({ allow: pp.trusted, block: [] });
  }

  /** Global and listener firewalls (both must allow). */
  admitsAddress(address: string): boolean {
    return this.globalFirewall.allows(address) && this.ownFirewall.allows(address);
  }
}
