// The open-file limit against what the config may need: two descriptors per proxied connection
// (client + backend), one per queued connection, one per listening socket, plus some headroom.
import { readFileSync } from 'node:fs';
import type { Config } from './config/types.ts';

/** Soft RLIMIT_NOFILE of this process, from /proc (null where /proc is not Linux's). */
export function openFileLimit(): number | null {
  try {
    const limits = readFileSync('/proc/self/limits', 'utf8');
    const line = limits.split('\n').find((l) => l.startsWith('Max open files'));
    const soft = line?.split(/\s{2,}/)[1];
    if (soft === undefined) return null;
    return soft === 'unlimited' ? Infinity : Number.parseInt(soft, 10);
  } catch {
    return null;
  }
}

export function descriptorsNeeded(config: Config): number {
  let slots = 0;
  let queued = 0;
  let sockets = 0;
  for (const l of config.listeners) {
    slots += l.workers;
    queued += l.queue;
    sockets += l.bind.length;
  }
  if (config.limits.maxConnections > 0) slots = Math.min(slots, config.limits.maxConnections);
  return 2 * slots + queued + sockets + 64;
}

export function fdLimitWarning(config: Config): { message: string; fields: object } | null {
  const limit = openFileLimit();
  const needed = descriptorsNeeded(config);
  if (limit === null || limit >= needed) return null;
  return {
    message: 'open-file limit is below what the configured limits need; raise LimitNOFILE (systemd) or ulimit -n',
    fields: { limit, needed },
  };
}
