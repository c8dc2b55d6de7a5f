// A Redis of the test's own (Debian's redis-server): loopback only, no persistence, stopped (by
// its PID) after the test. It can be stopped, started again on the same port, or frozen
// (SIGSTOP: connected but silent, the case a timeout is for).
import { spawn, type ChildProcess } from 'node:child_process';
import type { TestContext } from 'node:test';
import { Redis } from 'ioredis';
import { closedPort } from './harness.ts';
import type { ClusterMode } from '../../src/cluster/cluster.ts';
import type { Daemon } from '../../src/daemon.ts';

export interface TestRedis {
  readonly port: number;
  readonly url: string;
  /** A plain client for assertions (commandstats, the hashes). */
  readonly client: Redis;
  stop(): Promise<void>;
  start(): Promise<void>;
  freeze(): void;
  thaw(): void;
  /** EVALSHA + EVAL calls the server has run so far. */
  scriptCalls(): Promise<number>;
  /** Every field of every concurrency hash, as "key field" -> value (expiry fields left out). */
  counts(): Promise<Map<string, number>>;
}

export async function startRedis(t: TestContext, opts: { password?: string } = {}): Promise<TestRedis> {
  const port = await closedPort();
  let child: ChildProcess | null = null;
  let exited: Promise<void> = Promise.resolve();

  const start = async (): Promise<void> => {
    const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--protected-mode', 'yes', '--loglevel', 'notice', ...(opts.password !== undefined ? ['--requirepass', opts.password] : [])], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    child = proc;
    exited = new Promise((resolve) => proc.once('exit', () => resolve()));
    await waitListening(port, proc);
  };
  const stop = async (): Promise<void> => {
    const proc = child;
    if (proc === null) return;
    child = null;
    if (proc.exitCode === null && proc.signalCode === null) {
      process.kill(proc.pid!, 'SIGCONT');
      process.kill(proc.pid!, 'SIGKILL');
    }
    await exited;
  };
  await start();
  const client = new Redis({ port, host: '127.0.0.1', lazyConnect: true, ...(opts.password !== undefined ? { password: opts.password } : {}), maxRetriesPerRequest: 1, retryStrategy: () => 50 });
  client.on('error', () => {});
  t.after(async () => {
    client.disconnect();
    await stop();
  });
  return {
    port,
    url: `redis://127.0.0.1:${port}/0`,
    client,
    stop,
    start,
    freeze: () => process.kill(child!.pid!, 'SIGSTOP'),
    thaw: () => {
      if (child !== null) process.kill(child.pid!, 'SIGCONT');
    },
    async scriptCalls() {
      const info = await client.info('commandstats');
      let calls = 0;
      for (const m of info.matchAll(/^cmdstat_(evalsha|eval):calls=(\d+)/gm)) calls += Number(m[2]);
      return calls;
    },
    async counts() {
      const out = new Map<string, number>();
      for (const key of await client.keys('*:c')) {
        const hash = await client.hgetall(key);
        for (const [field, value] of Object.entries(hash)) if (!field.endsWith('#e')) out.set(`${key} ${field}`, Number(value));
      }
      return out;
    },
  };
}

/** Resolves once redis-server says it accepts connections (its log, on stdout). */
function waitListening(port: number, proc: ChildProcess): Promise<void> {
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`redis-server did not start on ${port}: ${out}`)), 10_000);
    proc.stdout!.on('data', (c: Buffer) => {
      out += c.toString();
      if (out.includes('Ready to accept connections')) {
        clearTimeout(timer);
        resolve();
      }
    });
    proc.stderr!.on('data', (c: Buffer) => (out += c.toString()));
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`redis-server exited (${code}): ${out}`));
    });
  });
}

/** Resolves once the daemon's cluster store is in `mode` (the mode listeners are the event). */
export function modeIs(daemon: Daemon, mode: ClusterMode, ms = 10_000): Promise<void> {
  if (daemon.cluster.mode === mode) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      daemon.cluster.modeListeners.delete(listener);
      reject(new Error(`cluster store not ${mode} after ${ms} ms (is ${daemon.cluster.mode})`));
    }, ms);
    const listener = (now: ClusterMode): void => {
      if (now !== mode) return;
      clearTimeout(timer);
      daemon.cluster.modeListeners.delete(listener);
      resolve();
    };
    daemon.cluster.modeListeners.add(listener);
  });
}
