// One listener's config compiled for one generation: route table, firewalls, limits, timeouts.
// Immutable; a reload builds a new one and swaps `listener.generation`. Connections keep the
// generation that admitted them, so a reload never changes the route or backend they have.
import type { Config, HostPort, ListenerConfig, Timeouts } from '../config/types.ts';
import type { Connection, ConnectionOwner, ConnectionState } from '../connection/connection.ts';
import type { CloseReason, RejectReason } from '../connection/reasons.ts';
import type { Registry } from '../connection/registry.ts';
import { clientKey } from '../governance/client-key.ts';
import { compileFirewall, type Firewall } from '../governance/firewall.ts';
import type { Logger } from '../logging/logger.ts';
import type { ProxyVersionAccept } from '../proxy-protocol/parse.ts';
import type { Route } from '../routing/route-table.ts';
import { RouteTable } from '../routing/route-table.ts';
import type { Listener } from './listener.ts';

export class ListenerGeneration implements ConnectionOwner {
  readonly name: string;
  readonly config: ListenerConfig;
  readonly timeouts: Timeouts;
  readonly routes: RouteTable;
  readonly rejectStyle: 'reset' | 'close';
  readonly registry: Registry;
  readonly log: Logger;
  readonly ipv6Prefix: number;
  readonly proxyAccept: ProxyVersionAccept | null;
  readonly proxyRequired: boolean;
  /** Sources allowed to send a PROXY header; null when the listener does not accept one. */
  readonly proxyTrusted: Firewall | null;
  /** Set once by the Listener that owns this generation. */
  listener!: Listener;
  private readonly globalFirewall: Firewall;
  private readonly ownFirewall: Firewall;

  constructor(config: ListenerConfig, global: Config, registry: Registry, log: Logger, globalFirewall: Firewall) {
    this.name = config.name;
    this.config = config;
    this.timeouts = config.timeouts;
    this.routes = new RouteTable(config);
    this.rejectStyle = config.reject;
    this.registry = registry;
    this.log = log;
    this.ipv6Prefix = global.limits.ipv6Prefix;
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

  /**
   * ConnectionOwner: a trusted balancer's connection gets the checks it skipped at accept, on the
   * client its header named or, when it named none (no header, UNKNOWN, LOCAL, AF_UNIX), on the
   * balancer itself: a balancer that names nobody is the client, firewall and limits included.
   */
  admitRealClient(conn: Connection): RejectReason | null {
    const address = conn.clientAddress;
    if (!this.admitsAddress(address)) return 'firewall';
    const key = clientKey(address, this.ipv6Prefix);
    const refusal = this.listener.checkClient(key);
    if (refusal !== null) return refusal;
    this.listener.holdClient(conn, key);
    return null;
  }

  /**
   * ConnectionOwner: after SNI, a route a later reload removed (a connection still in its
   * handshake at that reload routes through this older generation), then the route's firewall,
   * then its connection limit.
   */
  admitRoute(conn: Connection, route: Route): CloseReason | null {
    const removal = this.listener.removedRoutes.size === 0 ? undefined : this.listener.removedRoutes.get(route.name);
    if (removal !== undefined) {
      if (removal.policy === 'close') return 'removed';
      if (removal.policy === 'drain') conn.closeAtRemovalDeadline(removal.closeAt);
    }
    if (!route.firewall.allows(conn.clientAddress)) return 'route_firewall';
    const max = route.config.limits.maxConnections;
    const active = this.listener.routeActive.get(route.name) ?? 0;
    if (max > 0 && active >= max) return 'route_limit';
    this.listener.routeActive.set(route.name, active + 1);
    conn.countedRoute = route;
    this.listener.routed(route.name);
    return null;
  }

  backendFailed(conn: Connection, backend: HostPort, code: string): void {
    this.listener.backendFailed(conn, backend, code);
  }

  connectionClosed(conn: Connection, reason: CloseReason, stateBefore: ConnectionState): void {
    this.listener.connectionClosed(conn, reason, stateBefore);
  }
}
