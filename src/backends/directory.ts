// Where a thread finds its backends: the shared states, the state index of every backend, and the
// addresses each backend host name resolves to now. The config owner (backends/supervisor.ts)
// resolves and assigns; every thread holds a copy of the answers and builds its routes' pools
// from it (a new resolution arrives as a BackendUpdate and replaces the members in place).
import type { Config, RouteConfig } from '../config/types.ts';
import { CountIndexes } from '../governance/shared-counts.ts';
import { backendKey, hashString, routeAddresses, type Member } from './backend-pool.ts';
import type { SharedBackendStates } from './backend-states.ts';

/** A resolution (or a reload's) as plain data, for another thread. */
export interface BackendUpdate {
  readonly resolved: Array<[string, string[]]>;
  readonly indexes: ReturnType<CountIndexes['toJSON']>;
}

export class BackendDirectory {
  resolved = new Map<string, readonly string[]>();

  constructor(
    readonly states: SharedBackendStates,
    readonly indexes: CountIndexes,
  ) {}

  /** Takes the owner's answers and indexes. */
  apply(update: BackendUpdate): void {
    this.indexes.adopt(update.indexes);
    this.resolved = new Map(update.resolved);
  }

  update(): BackendUpdate {
    return { resolved: [...this.resolved].map(([host, ips]) => [host, [...ips]]), indexes: this.indexes.toJSON() };
  }

  /** The members of one route, every index already assigned. */
  membersOf(listener: string, route: RouteConfig): Member[] {
    return routeAddresses(route, (host) => this.resolved.get(host)).map(({ address, entry }) => ({
      index: this.indexes.backend(backendKey(listener, route.name, address.text)),
      address,
      configured: entry.address.text,
      weight: entry.weight,
      backup: entry.backup,
      maxConnections: entry.maxConnections,
      seed: hashString(address.text),
    }));
  }

  /** The key of every backend of `config` with the answers known now (or those given). */
  keysOf(config: Config, resolved: ReadonlyMap<string, readonly string[]> = this.resolved): string[] {
    const keys: string[] = [];
    for (const listener of config.listeners) {
      for (const route of listener.routes) {
        for (const { address } of routeAddresses(route, (host) => resolved.get(host))) keys.push(backendKey(listener.name, route.name, address.text));
      }
    }
    return keys;
  }
}
