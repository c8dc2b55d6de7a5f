// What the access log costs per connection: the same daemon relays N short connections with
// access_log on and off, alternating, in one process; the log goes to /dev/null through the
// daemon's own logger. Reports CPU per connection (user + system, whole process) for each.
// Run: node --import tsx scripts/access-log-cost.ts [connections per round] [rounds]
import net from 'node:net';
import { pino } from 'pino';
import { parseConfigText } from '../src/config/load.ts';
import { Daemon } from '../src/daemon.ts';
import { Metrics } from '../src/metrics.ts';

const perRound = Number(process.argv[2] ?? 3000);
const rounds = Number(process.argv[3] ?? 4);

const backend = net.createServer({ allowHalfOpen: true }, (s) => {
  s.on('error', () => {});
  s.pipe(s);
});
await new Promise<void>((r) => backend.listen(0, '127.0.0.1', r));
const backendPort = (backend.address() as net.AddressInfo).port;

async function daemonWith(accessLog: boolean): Promise<Daemon> {
  const loaded = parseConfigText(`
[[listeners]]
name = "tcp"
bind = "127.0.0.1:0"
access_log = ${accessLog}
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = "127.0.0.1:${backendPort}"
`, 'bench.toml');
  if (!loaded.ok) throw new Error('bad config');
  const log = pino({ level: 'info', formatters: { level: (label) => ({ level: label }) } }, pino.destination({ dest: '/dev/null', sync: true }));
  return Daemon.start(loaded.config, log, { metrics: new Metrics({ defaultMetrics: false }) });
}

function oneConnection(port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
    s.on('error', reject);
    s.on('data', () => {});
    s.on('end', () => s.end());
    s.on('close', () => resolve());
    s.end('ping');
  });
}

async function round(daemon: Daemon): Promise<number> {
  const port = daemon.portOf('tcp');
  const before = process.cpuUsage();
  for (let i = 0; i < perRound; i++) await oneConnection(port);
  await daemon.registry.whenEmpty();
  const used = process.cpuUsage(before);
  return (used.user + used.system) / perRound;
}

const on = await daemonWith(true);
const off = await daemonWith(false);
await round(on); // warm up both
await round(off);
const results: Record<string, number[]> = { on: [], off: [] };
for (let i = 0; i < rounds; i++) {
  results.on!.push(await round(on));
  results.off!.push(await round(off));
}
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
console.log(`access_log on : ${median(results.on!).toFixed(1)} µs CPU per connection (median of ${rounds} rounds of ${perRound}; client, proxy and backend in one process)`);
console.log(`access_log off: ${median(results.off!).toFixed(1)} µs`);
console.log(`difference    : ${(median(results.on!) - median(results.off!)).toFixed(1)} µs per connection`);
await on.shutdown({ immediate: true });
await off.shutdown({ immediate: true });
backend.close();
