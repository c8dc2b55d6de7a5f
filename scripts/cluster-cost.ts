// What [cluster] costs, in one run, on loopback:
//  1. per admitted connection: a real `smartproxy serve` (threads = 1) with per-client limits it
//     never reaches, alone ("local") and sharing them through a redis-server ("cluster"),
//     alternating. A client opens N connections, C at a time, each sending one byte and waiting
//     for the echo; reported: the daemon's CPU (user + system from /proc/PID/stat) per connection
//     and the p50/p99 of connect-to-echo.
//  2. what one Redis carries: the admission script and the release script (one connection's
//     whole life in the store) from K clients with auto-pipelining, over 10,000 client keys, for
//     S seconds; reported: admissions per second and redis-server CPU per admission.
//  3. what renewals cost: the renewal script as the daemon sends it (128 clients a call), over
//     20,000 client keys for S seconds; reported: client renewals per second, and the CPU of
//     redis-server and of this process per client renewal.
// Run: node --import tsx scripts/cluster-cost.ts [connections=5000] [concurrency=20] [rounds=3] [seconds=5] [clients=8]
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Redis } from 'ioredis';
import { ADMIT_SCRIPT, RELEASE_SCRIPT, RENEW_SCRIPT } from '../src/cluster/store.ts';
import { cpuMs, freePort } from './process-cpu.ts';

const N = Number(process.argv[2] ?? 5000);
const C = Number(process.argv[3] ?? 20);
const ROUNDS = Number(process.argv[4] ?? 3);
const SECONDS = Number(process.argv[5] ?? 5);
const CLIENTS = Number(process.argv[6] ?? 8);
const CLI = fileURLToPath(new URL('../src/cli.ts', import.meta.url));

async function startRedis(): Promise<{ port: number; child: ChildProcess }> {
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve) => child.stdout!.on('data', (c: Buffer) => { if (c.toString().includes('Ready to accept')) resolve(); }));
  child.stdout!.resume();
  return { port, child };
}

async function daemon(backendPort: number, redisPort: number | null): Promise<{ pid: number; port: number; stop: () => Promise<void> }> {
  const dir = mkdtempSync(path.join(tmpdir(), 'cluster-cost-'));
  const port = await freePort();
  const cluster = redisPort === null ? '' : `[cluster]\nredis = "redis://127.0.0.1:${redisPort}/0"\ninstance = "bench"\n`;
  writeFileSync(path.join(dir, 'p.toml'), `
[process]
threads = 1
[limits]
max_connections_per_ip = 1000000
connection_rate_per_ip = { count = 10000000, per = "1s" }
${cluster}
[[listeners]]
name = "tcp"
bind = "127.0.0.1:${port}"
access_log = false
  [[listeners.routes]]
  name = "r"
  default = true
  backends = "127.0.0.1:${backendPort}"
`);
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'serve', '-c', path.join(dir, 'p.toml'), '--log-format', 'json', '--log-level', 'info'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const ready = redisPort === null ? 'event-loop threads started' : 'cluster store ok';
  await new Promise<void>((resolve) => child.stdout!.on('data', (c: Buffer) => { if (c.toString().includes(ready)) resolve(); }));
  child.stdout!.resume();
  return {
    pid: child.pid!,
    port,
    stop: async () => {
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Milliseconds from connect() to the echo of one byte. */
function oneConnection(port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const s = net.connect({ port, host: '127.0.0.1' });
    s.on('error', reject);
    s.once('data', () => {
      const ms = performance.now() - started;
      s.destroy();
      resolve(ms);
    });
    s.write('x');
  });
}

async function load(port: number, n: number): Promise<number[]> {
  const times: number[] = [];
  let next = 0;
  await Promise.all(Array.from({ length: C }, async () => {
    while (next < n) {
      next++;
      times.push(await oneConnection(port));
    }
  }));
  return times.sort((a, b) => a - b);
}

const pct = (xs: number[], p: number): number => xs[Math.min(xs.length - 1, Math.floor((xs.length * p) / 100))]!;
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

const redis = await startRedis();
const echo = net.createServer((s) => {
  s.on('error', () => {});
  s.pipe(s);
});
await new Promise<void>((r) => echo.listen(0, '127.0.0.1', r));
const backendPort = (echo.address() as net.AddressInfo).port;

const results: Record<string, { cpu: number[]; p50: number[]; p99: number[] }> = { local: { cpu: [], p50: [], p99: [] }, cluster: { cpu: [], p50: [], p99: [] } };
for (let round = 0; round < ROUNDS; round++) {
  for (const mode of ['local', 'cluster'] as const) {
    const d = await daemon(backendPort, mode === 'cluster' ? redis.port : null);
    await load(d.port, Math.min(N, 1000)); // warm-up, not counted
    const before = cpuMs(d.pid);
    const times = await load(d.port, N);
    const r = results[mode]!;
    r.cpu.push(((cpuMs(d.pid) - before) * 1000) / N);
    r.p50.push(pct(times, 50));
    r.p99.push(pct(times, 99));
    await d.stop();
  }
}
for (const [mode, r] of Object.entries(results)) {
  console.log(`${mode.padEnd(8)} ${median(r.cpu).toFixed(0)} µs daemon CPU per admitted connection, connect-to-echo p50 ${median(r.p50).toFixed(2)} ms, p99 ${median(r.p99).toFixed(2)} ms (medians of ${ROUNDS} x ${N}, ${C} at a time)`);
}

// 2. One Redis: admission + release per connection, over many clients.
const clients = Array.from({ length: CLIENTS }, () => {
  const c = new Redis({ port: redis.port, host: '127.0.0.1', enableAutoPipelining: true }) as Redis & {
    spAdmit(...args: Array<string | number>): Promise<number>;
    spRelease(...args: Array<string | number>): Promise<number>;
  };
  c.defineCommand('spAdmit', { numberOfKeys: 2, lua: ADMIT_SCRIPT });
  c.defineCommand('spRelease', { lua: RELEASE_SCRIPT });
  return c;
});
const redisCpuBefore = cpuMs(redis.child.pid!);
let admissions = 0;
const until = Date.now() + SECONDS * 1000;
await Promise.all(clients.map(async (c, i) => {
  while (Date.now() < until) {
    // 64 in flight per client, as event loops with many connections opening would have.
    await Promise.all(Array.from({ length: 64 }, async (_x, j) => {
      const tag = `{bench/10.${i}.${j}.${Math.floor(Math.random() * 160)}}`;
      await c.spAdmit(`cost:${tag}:c`, `cost:${tag}:r`, `inst/${i}`, 1000000, 10000000, 1000, 15000);
      await c.spRelease(1, `cost:${tag}:c`, `inst/${i}`, 1);
      admissions++;
    }));
  }
}));
const redisCpu = cpuMs(redis.child.pid!) - redisCpuBefore;
console.log(`one redis-server: ${Math.round(admissions / SECONDS).toLocaleString('en')} admissions/s (each with its release), ${((redisCpu * 1000) / admissions).toFixed(1)} µs redis CPU per admission + release, ${CLIENTS} clients x 64 in flight, ${SECONDS} s`);
for (const c of clients) c.disconnect();

// 3. Renewals: 20,000 held clients, 128 per call, 4 calls in flight.
const renewer = new Redis({ port: redis.port, host: '127.0.0.1' }) as Redis & { spRenew(...args: Array<string | number>): Promise<number> };
renewer.defineCommand('spRenew', { lua: RENEW_SCRIPT });
const held = Array.from({ length: 20_000 }, (_x, i) => `cost:{bench/10.9.${i >> 8}.${i & 255}}:c`);
const renewCpu = { redis: cpuMs(redis.child.pid!), self: process.cpuUsage() };
let renewed = 0;
const renewUntil = Date.now() + SECONDS * 1000;
while (Date.now() < renewUntil) {
  const calls = [];
  for (let i = 0; i < held.length; i += 128) {
    const keys = held.slice(i, i + 128);
    calls.push(renewer.spRenew(keys.length, ...keys, 'inst/0', 15000, ...keys.map(() => 1)));
    if (calls.length === 4) await Promise.all(calls.splice(0));
  }
  await Promise.all(calls);
  renewed += held.length;
}
const self = process.cpuUsage(renewCpu.self);
console.log(`renewals: ${Math.round(renewed / SECONDS).toLocaleString('en')} client renewals/s, ${(((cpuMs(redis.child.pid!) - renewCpu.redis) * 1000) / renewed).toFixed(2)} µs redis CPU and ${((self.user + self.system) / renewed).toFixed(2)} µs client CPU per client renewal (128 clients a call, ${SECONDS} s)`);
renewer.disconnect();
echo.close();
redis.child.kill('SIGKILL');
