// Helpers for the threads suite (issue 14): a real `smartproxy serve` with `[process] threads = 4`
// and an admin API on a unix socket in the test's temp dir, typed views of /stats, /metrics and
// /connections, connection attempts that report whether the proxy admitted them, and which
// event-loop thread handled which client (from the daemon's debug lines).
import { readdirSync } from 'node:fs';
import net from 'node:net';
import type { TestContext } from 'node:test';
import { adminGet, startCli, type CliProxy } from './cli.ts';
import { parseExposition, valueOf, type Exposition } from './metrics.ts';
import type { ListenerStats } from '../../src/admin/stats.ts';

export const THREADS = 4;

/** One listener of /stats, with the fields a daemon with threads always sends. */
export type ListenerView = Required<ListenerStats>;

export interface StatsView {
  readonly active: number;
  readonly slotsBusy: number;
  readonly threads: number;
  readonly listeners: ListenerView[];
}

export interface Threaded {
  readonly proxy: CliProxy;
  stats(): Promise<StatsView>;
  listener(name: string): Promise<ListenerView>;
  metrics(): Promise<Exposition>;
  connections(): Promise<{ total: number; connections: Array<Record<string, unknown>> }>;
  /** Waits (polling /stats) until `predicate` holds; fails with the last view after `ms`. */
  waitStats(predicate: (s: StatsView) => boolean, what: string, ms?: number): Promise<StatsView>;
}

/**
 * Starts `smartproxy serve` with `threads = 4`, debug logging (one line per closed connection,
 * carrying the thread) and the admin API on `<dir>/admin.sock`, on `body` (listeners, limits...;
 * it must not have [admin], [process] or [logging] tables of its own).
 */
export async function startThreaded(t: TestContext, body: string, ready: string[], opts: { level?: string } = {}): Promise<Threaded> {
  const toml = `
[admin]
listen = "unix:{{dir}}/admin.sock"
[process]
threads = ${THREADS}
[logging]
level = "${opts.level ?? 'debug'}"
${body}`;
  const proxy = await startCli(t, toml, { ready, admin: true });
  const admin = { socketPath: `${proxy.dir}/admin.sock` };
  const get = async (path: string): Promise<string> => {
    const { status, body: text } = await adminGet(admin, path);
    if (status !== 200) throw new Error(`GET ${path}: ${status} ${text}`);
    return text;
  };
  const stats = async (): Promise<StatsView> => JSON.parse(await get('/stats')) as StatsView;
  const threaded: Threaded = {
    proxy,
    stats,
    listener: async (name) => {
      const found = (await stats()).listeners.find((l) => l.name === name && !l.draining);
      if (found === undefined) throw new Error(`no listener ${name} in /stats`);
      return found;
    },
    metrics: async () => parseExposition(await get('/metrics')),
    connections: async () => JSON.parse(await get('/connections?limit=1000')) as { total: number; connections: Array<Record<string, unknown>> },
    waitStats: async (predicate, what, ms = 10_000) => {
      const deadline = Date.now() + ms;
      for (;;) {
        const s = await stats();
        if (predicate(s)) return s;
        if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}; last /stats: ${JSON.stringify(s)}`);
        await new Promise((r) => setTimeout(r, 10));
      }
    },
  };
  return threaded;
}

/** What one connection attempt came to. */
export interface Attempt {
  /** admitted: its bytes came back through the proxy; refused: reset or closed before that. */
  readonly outcome: 'admitted' | 'refused';
  readonly socket: net.Socket;
  /** The error code (or "closed") of a refused attempt. */
  readonly code: string | null;
  /** "address:port" of the client side, as the proxy's logs write it. */
  readonly client: string;
  /** When the outcome was known (Date.now()). */
  readonly at: number;
}

/**
 * Connects (from `localAddress`), sends `payload` and resolves once the echo backend's copy of it
 * came back (admitted; the socket stays open) or the connection was reset or closed (refused).
 */
export function attempt(port: number, localAddress: string, payload: Buffer | string): Promise<Attempt> {
  const expected = Buffer.from(payload);
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1', localAddress, allowHalfOpen: true });
    let client = `${localAddress}:?`;
    let got = Buffer.alloc(0);
    let done = false;
    const finish = (outcome: Attempt['outcome'], code: string | null): void => {
      if (done) return;
      done = true;
      resolve({ outcome, socket, code, client, at: Date.now() });
    };
    socket.on('connect', () => {
      client = `${socket.localAddress}:${socket.localPort}`;
      socket.write(expected);
    });
    socket.on('data', (chunk: Buffer) => {
      got = Buffer.concat([got, chunk]);
      if (got.length < expected.length) return;
      finish(got.equals(expected) ? 'admitted' : 'refused', got.equals(expected) ? null : 'garbled');
    });
    socket.on('error', (err: NodeJS.ErrnoException) => finish('refused', err.code ?? 'error'));
    socket.on('close', () => finish('refused', 'closed'));
    // Answer the proxy's FIN, so an ending started on the far side completes (allowHalfOpen).
    socket.on('end', () => socket.end());
  });
}

/** Ends every socket (FIN) and resolves once all are closed. */
export async function endAll(sockets: readonly net.Socket[]): Promise<void> {
  await Promise.all(
    sockets.map(
      (s) =>
        new Promise<void>((resolve) => {
          if (s.destroyed) return resolve();
          s.once('close', () => resolve());
          s.resume();
          s.end();
        }),
    ),
  );
}

/** Counts of outcomes, and the refusal codes seen. */
export function tally(attempts: readonly Attempt[]): { admitted: number; refused: number; codes: Record<string, number> } {
  const codes: Record<string, number> = {};
  let admitted = 0;
  for (const a of attempts) {
    if (a.outcome === 'admitted') admitted++;
    else codes[a.code ?? '?'] = (codes[a.code ?? '?'] ?? 0) + 1;
  }
  return { admitted, refused: attempts.length - admitted, codes };
}

/**
 * The thread that closed each client's connection ("address:port" -> thread), from the debug
 * lines "connection closed" logged from `from` on.
 */
export function threadsByClient(lines: ReadonlyArray<Record<string, unknown>>, from = 0): Map<string, number> {
  const map = new Map<string, number>();
  for (const line of lines.slice(from)) {
    if (line.msg === 'connection closed' && typeof line.client === 'string' && typeof line.thread === 'number') map.set(line.client, line.thread);
  }
  return map;
}

/** How many of `clients` each thread handled, e.g. { 0: 12, 1: 13, 2: 12, 3: 13 }. */
export function spread(byClient: Map<string, number>, clients: readonly string[]): Record<number, number> {
  const out: Record<number, number> = {};
  for (const c of clients) {
    const thread = byClient.get(c);
    if (thread !== undefined) out[thread] = (out[thread] ?? 0) + 1;
  }
  return out;
}

/** The connection gauges of /metrics, summed over their series: all 0 once nothing is open. */
export function gauges(metrics: Exposition): Record<string, number> {
  const out: Record<string, number> = {};
  for (const name of ['smartproxy_connections_active', 'smartproxy_workers_busy', 'smartproxy_queue_depth', 'smartproxy_tracked_clients']) {
    out[name] = metrics.samples.filter((s) => s.name === name).reduce((n, s) => n + s.value, 0);
  }
  return out;
}

/** One series of a scrape (0 when absent). */
export function metric(metrics: Exposition, name: string, labels: Record<string, string> = {}): number {
  return valueOf(metrics.samples, name, labels);
}

/** Descriptors the process holds now (entries of /proc/PID/fd). */
export function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

/** Every count /stats reports about open connections, as one object that should be all zeros. */
export function openCounts(s: StatsView): Record<string, number> {
  const out: Record<string, number> = { active: s.active, slotsBusy: s.slotsBusy };
  for (const l of s.listeners) {
    out[`${l.name}.busy`] = l.busy;
    out[`${l.name}.queued`] = l.queued;
    out[`${l.name}.active`] = l.active;
    out[`${l.name}.activeClients`] = l.activeClients;
    out[`${l.name}.routedActive`] = l.routedActive;
    out[`${l.name}.topClients`] = l.topClients.length;
    for (const r of l.routes) out[`${l.name}.routes.${r.name}`] = r.active;
  }
  return out;
}

/** True when every value of `counts` is 0. */
export function allZero(counts: Record<string, number>): boolean {
  return Object.values(counts).every((n) => n === 0);
}
