// Client of the idle scenario: opens N connections that send nothing and holds them until its
// stdin closes (or SIGTERM). Connections are spread over several loopback source addresses so
// that binding each one never exhausts the ephemeral ports of a single address.
// Prints one JSON line once every attempt has either connected or failed.
// Usage: node idle-client.mjs --port PORT --count N [--sources 127.0.0.2,127.0.0.3]
import net from 'node:net';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    port: { type: 'string' },
    count: { type: 'string' },
    sources: { type: 'string', default: '127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5' },
  },
});
const port = Number(values.port);
const count = Number(values.count);
const sources = values.sources.split(',');
/** Connects in flight at once: enough to be quick, few enough not to overflow accept backlogs. */
const IN_FLIGHT = 200;

const sockets = [];
let started = 0;
let opened = 0;
let failed = 0;
let dropped = 0;
let done = false;

function openNext() {
  if (started >= count) return;
  const source = sources[started % sources.length];
  started++;
  const socket = net.connect({ host: '127.0.0.1', port, localAddress: source });
  let connected = false;
  socket.on('connect', () => {
    connected = true;
    opened++;
    sockets.push(socket);
    settle();
  });
  socket.on('error', () => {});
  socket.on('close', () => {
    if (connected) dropped++;
    else {
      failed++;
      settle();
    }
  });
}

function settle() {
  if (opened + failed === count && !done) {
    done = true;
    process.stdout.write(JSON.stringify({ opened, failed }) + '\n');
    return;
  }
  openNext();
}

for (let i = 0; i < Math.min(IN_FLIGHT, count); i++) openNext();

function closeAll() {
  process.stdout.write(JSON.stringify({ dropped }) + '\n');
  for (const socket of sockets) socket.destroy();
  process.exit(0);
}
process.stdin.on('end', closeAll);
process.stdin.on('error', closeAll);
process.stdin.resume();
process.on('SIGTERM', closeAll);
