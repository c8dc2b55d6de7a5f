// A listener's routes compiled once per config generation: SNI lookups are map hits, never scans.
import type { ListenerConfig, RouteConfig } from '../config/types.ts';
import { BackendPool } from '../backends/backend-pool.ts';
import type { BackendDirectory } from '../backends/directory.ts';
import { compileFirewall, type Firewall } from '../governance/firewall.ts';

/** One route as the hot path sees it. Its pool's balancing state lives here, so a reload starts it afresh. */
export class Route {
  readonly name: string;
  readonly config: RouteConfig;
  readonly pool: BackendPool;
  readonly firewall: Firewall;
  /** Index of this route's connection count in the shared counts (stable across reloads). */
  readonly countIndex: number;

  constructor(config: RouteConfig, countIndex: number, pool: BackendPool) {
    this.countIndex = countIndex;
    this.name = config.name;
    this.config = config;
    this.pool = pool;
    this.firewall = compileFirewall(config.firewall);
  }
}

/**
 * A probe's window beyond the connect timeout: a connection's timers round delays over 2 s up to
 * whole seconds (connection.ts quantize), so a timeout may be seen up to a second late, and the
 * event loop may add to that.
 */
const PROBE_SLACK_MS = 2000;

export class RouteTable {
  readonly routes: readonly Route[];
  readonly defaultRoute: Route | null;
  /** True when routing needs the client's first bytes; a lone default route connects at once. */
  readonly needsPeek: boolean;
  private readonly exact = new Map<string, Route>();
  /** Keyed by the suffix after "*." (`example.org` for `*.example.org`). */
  private readonly wildcard = new Map<string, Route>();

  /** `countIndex` gives each route's index in the shared counts; `backends` its members. */
  constructor(listener: ListenerConfig, countIndex: (route: RouteConfig) => number, backends: BackendDirectory) {
    this.routes = listener.routes.map((r) => {
      const pool = new BackendPool(backends.states, backends.membersOf(listener.name, r), {
        balance: r.balance,
        onAllDown: r.onAllDown,
        probeWindowMs: listener.timeouts.connectMs + PROBE_SLACK_MS,
        slowStartMs: r.slowStartMs,
      });
      return new Route(r, countIndex(r), pool);
    });
    let fallback: Route | null = null;
    for (const route of this.routes) {
      if (route.config.isDefault) fallback = route;
      for (const name of route.config.sni) {
        if (name.startsWith('*.')) this.wildcard.set(name.slice(2), route);
        else this.exact.set(name, route);
      }
    }
    this.defaultRoute = fallback;
    this.needsPeek = this.exact.size > 0 || this.wildcard.size > 0;
  }

  /**
   * The route for a ClientHello's server name (already lower-cased), or for no name at all.
   * Exact beats wildcard; the longest wildcard suffix wins. `*.example.org` matches names at any
   * depth below example.org (as nginx's server_name does) but not `example.org` itself.
   */
  match(sni: string | null): Route | null {
    if (sni === null) return this.defaultRoute;
    const exact = this.exact.get(sni);
    if (exact !== undefined) return exact;
    if (this.wildcard.size > 0) {
      for (let dot = sni.indexOf('.'); dot !== -1; dot = sni.indexOf('.', dot + 1)) {
        const route = this.wildcard.get(sni.slice(dot + 1));
        if (route !== undefined) return route;
      }
    }
    return this.defaultRoute;
  }
}
