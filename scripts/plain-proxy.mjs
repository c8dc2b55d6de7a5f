// The naive baseline: a Node TCP proxy that is nothing but `net` and `pipe()`. No limits, no
// timeouts, no routing; it shows what the runtime alone costs per connection and per byte.
// Usage: node scripts/plain-proxy.mjs --listen PORT --backend PORT
import net from 'node:net';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { listen: { type: 'string' }, backend: { type: 'string' } } });
const backendPort = Number(values.backend);

const server = net.createServer((client) => {
  const backend = net.connect({ host: '127.0.0.1', port: backendPort });
  // pipe() forwards each end (FIN) once the data before it is written; an error on either side
  // ends both. destroy() is idempotent.
  const destroyBoth = () => {
    client.destroy();
    backend.destroy();
  };
  client.on('error', destroyBoth);
  backend.on('error', destroyBoth);
  client.pipe(backend);
  backend.pipe(client);
});
server.listen({ host: '127.0.0.1', port: Number(values.listen), backlog: 4096 }, () => {
  console.log(`plain-proxy: 127.0.0.1:${values.listen} -> 127.0.0.1:${backendPort}`);
});
