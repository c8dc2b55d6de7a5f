// What a firewall refusal costs the daemon, per refused connection: a real `smartproxy serve`
// (threads = 1) blocks 127.0.0.2; a client opens N connections from it, 64 at a time, and the
// daemon's own CPU (user + system from /proc/PID/stat) is divided by N. Run once with
// reject = "reset" (refused in accept(), one RST) and once with reject = "close" (refused by
// net.Server's blockList before a socket exists, one FIN), alternating, in one run.
// Run: node --import tsx scripts/refusal-cost.ts [connections] [rounds]
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cpuMs, freePort } from './process-cpu.ts';

const N = Number(process.argv[2] ?? 20000);
const ROUNDS = Number(process.argv[3] ?? 3);
const CLI = fileURLToPath(new URL('../src/cli.ts', import.meta.url));

async function daemon(reject: string): Promise<{ pid: number; port: number; stop: () => Promise<void> }> {
  const dir = mkdtempSync(path.join(tmpdir(), 'refusal-cost-'));
  const port = await freePort();
  writeFileSync(path.join(dir, 'p.toml'), `
[process]
threads = 1
[[listeners]]
name = "tcp"
bind = "127.0.0.1:${port}"
reject = "${reject}"
  [listeners.firewall]
  block = ["127.0.0.2"]
  [[listeners.routes]]
  name = "r"
  default = true
  backends = "127.0.0.1:1"
`);
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'serve', '-c', path.join(dir, 'p.toml'), '--log-format', 'json', '--log-level', 'info'], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve) => child.stdout!.on('data', (c: Buffer) => { if (c.toString().includes('event-loop threads started')) resolve(); }));
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

function knock(port: number): Promise<void> {
  return new Promise((resolve) => {
    const s = net.connect({ port, host: '127.0.0.1', localAddress: '127.0.0.2' });
    s.on('error', () => {});
    s.on('close', () => resolve());
    s.resume();
  });
}

async function flood(port: number): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: 64 }, async () => {
    while (next < N) {
      next++;
      await knock(port);
    }
  }));
}

const results: Record<string, number[]> = { reset: [], close: [] };
for (let round = 0; round < ROUNDS; round++) {
  for (const reject of ['reset', 'close']) {
    const d = await daemon(reject);
    await flood(d.port); // warm-up round, not counted
    const before = cpuMs(d.pid);
    await flood(d.port);
    results[reject]!.push(((cpuMs(d.pid) - before) * 1000) / N);
    await d.stop();
  }
}
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
console.log(`reject = "reset" (accept(), RST):       ${median(results.reset!).toFixed(1)} µs daemon CPU per refused connection (median of ${ROUNDS} x ${N})`);
console.log(`reject = "close" (blockList gate, FIN): ${median(results.close!).toFixed(1)} µs`);
