// One immutable compiled config: every listener's generation (routes in maps, firewalls as sorted
// ranges, durations in ms). The daemon swaps the whole thing on reload; state that must survive
// a reload (registry, per-client tables, metrics) lives in the daemon and the listeners instead.
import type { Config } from './config/types.ts';
import type { Registry } from './connection/registry.ts';
import { compileFirewall } from './governance/firewall.ts';
import { ListenerGeneration } from './listener/listener-generation.ts';
import type { Logger } from './logging/logger.ts';

export interface Generation {
  readonly config: Config;
  readonly listeners: ReadonlyMap<string, ListenerGeneration>;
}

export function compileGeneration(config: Config, registry: Registry, log: Logger): Generation {
  const globalFirewall = compileFirewall(config.firewall);
  const listeners = new Map<string, ListenerGeneration>();
  for (const listener of config.listeners) {
    listeners.set(listener.name, new ListenerGeneration(listener, config, registry, log, globalFirewall));
  }
  return { config, listeners };
}
