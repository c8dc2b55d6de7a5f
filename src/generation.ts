// One immutable compiled config: every listener's generation (routes in maps, firewalls as sorted
// ranges, durations in ms, count indexes). The daemon swaps the whole thing on reload; state that
// must survive a reload (registry, shared counts, per-client table, metrics) lives outside it.
import type { BackendDirectory } from './backends/directory.ts';
import type { Config } from './config/types.ts';
import { compileFirewall } from './governance/firewall.ts';
import type { CountIndexes } from './governance/shared-counts.ts';
import { ListenerGeneration } from './listener/listener-generation.ts';

export interface Generation {
  readonly config: Config;
  readonly listeners: ReadonlyMap<string, ListenerGeneration>;
}

/** Compiles `config`; every listener, route and backend must already have an index in `indexes`. */
export function compileGeneration(config: Config, indexes: CountIndexes, backends: BackendDirectory): Generation {
  const globalFirewall = compileFirewall(config.firewall);
  const listeners = new Map<string, ListenerGeneration>();
  for (const listener of config.listeners) {
    listeners.set(listener.name, new ListenerGeneration(listener, config, globalFirewall, indexes, backends));
  }
  return { config, listeners };
}
