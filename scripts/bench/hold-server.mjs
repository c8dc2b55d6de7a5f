// Backend of the idle scenario: accepts connections and holds them, silent, until they close.
// Prints `held N` on stdout whenever the count changed (at most every 100 ms) so the benchmark
// knows when every idle connection has made it through the proxy.
// Usage: node hold-server.mjs --port PORT
import net from 'node:net';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { port: { type: 'string' } } });
const REPORT_INTERVAL_MS = 100;

let held = 0;
let reported = -1;

const server = net.createServer((socket) => {
  held++;
  socket.on('error', () => {});
  socket.on('close', () => held--);
  // Data is unexpected; read and drop it so a talkative client cannot fill buffers.
  socket.resume();
});
server.on('error', (err) => {
  console.error(`hold server: ${err.message}`);
  process.exit(1);
});
server.listen({ host: '127.0.0.1', port: Number(values.port), backlog: 4096 });

setInterval(() => {
  if (held === reported) return;
  reported = held;
  process.stdout.write(`held ${held}\n`);
}, REPORT_INTERVAL_MS);
