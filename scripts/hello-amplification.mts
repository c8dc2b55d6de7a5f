// Issue 13, defect 4: 100 clients send a ClientHello as 1-byte TLS records in 6-byte writes
// while one client measures echo round trips through the same daemon. Usage: node --import tsx scripts/hello-amplification.mts SRC_DIR (a checkout: compare two in one run)
import net from 'node:net';
const src = process.argv[2]!;
const { parseConfigText } = await import(`${src}/src/config/load.ts`);
const { Daemon } = await import(`${src}/src/daemon.ts`);
const { Metrics } = await import(`${src}/src/metrics.ts`);
const { createLogger } = await import(`${src}/src/logging/logger.ts`);
const echo = net.createServer({ allowHalfOpen: true }, (s) => { s.on('error', () => {}); s.pipe(s); });
await new Promise<void>((r) => echo.listen(0, '127.0.0.1', r));
const bp = (echo.address() as net.AddressInfo).port;
const loaded = parseConfigText(`
[[listeners]]
name = "tls"
bind = "127.0.0.1:0"
  [listeners.timeouts]
  client_hello = "60s"
  [[listeners.routes]]
  name = "api"
  sni = "api.example.com"
  backends = "127.0.0.1:${bp}"
[[listeners]]
name = "tcp"
bind = "127.0.0.1:0"
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = "127.0.0.1:${bp}"
`, 'amp.toml');
const daemon = await Daemon.start(loaded.config, createLogger({ level: 'error', format: 'json' }), { metrics: new Metrics({ defaultMetrics: false }) });
const tlsPort = daemon.portOf('tls');
const tcpPort = daemon.portOf('tcp');
// A hello of ~2,000 body bytes in 1-byte records (6 bytes each on the wire).
const body = Buffer.alloc(2000, 0);
const msg = Buffer.concat([Buffer.from([1, 0, (body.length >> 8) & 255, body.length & 255]), body]);
const records = Buffer.concat([...msg].map((b) => Buffer.from([0x16, 3, 1, 0, 1, b])));
const stop = Date.now() + 8000;
const hostile = Array.from({ length: 100 }, async () => {
  const s = net.connect({ port: tlsPort, host: '127.0.0.1', noDelay: true });
  s.on('error', () => {});
  await new Promise((r) => s.once('connect', r));
  for (let off = 0; off < records.length && Date.now() < stop; off += 6) {
    if (!s.write(records.subarray(off, off + 6))) await new Promise((r) => s.once('drain', r));
    await new Promise((r) => setTimeout(r, 1));
  }
  s.destroy();
});
const rtts: number[] = [];
const legit = (async () => {
  const s = net.connect(tcpPort, '127.0.0.1');
  await new Promise((r) => s.once('connect', r));
  while (Date.now() < stop) {
    const t0 = performance.now();
    s.write('x');
    await new Promise((r) => s.once('data', r));
    rtts.push(performance.now() - t0);
    await new Promise((r) => setTimeout(r, 5));
  }
  s.destroy();
})();
await Promise.all([...hostile, legit]);
rtts.sort((a, b) => a - b);
const q = (p: number): string => rtts[Math.floor(p * (rtts.length - 1))]!.toFixed(1);
console.log(`${src}: ${rtts.length} round trips, p50 ${q(0.5)} ms, p99 ${q(0.99)} ms`);
await daemon.shutdown({ immediate: true });
echo.close();
process.exit(0);
