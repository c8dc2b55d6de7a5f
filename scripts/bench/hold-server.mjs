// Backend of the idle and flood scenarios: accepts connections and holds them until they close.
// Prints `held N accepted M` on stdout whenever a count changed (at most every 100 ms), so the
// benchmark knows how many connections made it through the proxy, now and in total.
// With --echo it writes every byte back (the flood scenario's legitimate client reads its echo);
// without, data is unexpected and dropped so a talkative client cannot fill buffers.
// Usage: node hold-server.mjs --port PORT [--echo]
import net from 'node:net';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { port: { type: 'string' }, echo: { type: 'boolean', default: false } } });
const REPORT_INTERVAL_MS = 100;

let held = 0;
let accepted = 0;
let reported = '';

const server = net.createServer((socket) => {
  held++;
  accepted++;
  socket.on('error', () => {});
  socket.on('close', () => held--);
  if (values.echo) socket.pipe(socket);
  else socket.resume();
});
server.on('error', (err) => {
  console.error(`hold server: ${err.message}`);
  process.exit(1);
});
server.listen({ host: '127.0.0.1', port: Number(values.port), backlog: 4096 });

setInterval(() => {
  const line = `held ${held} accepted ${accepted}`;
  if (line === reported) return;
  reported = line;
  process.stdout.write(line + '\n');
}, REPORT_INTERVAL_MS);
