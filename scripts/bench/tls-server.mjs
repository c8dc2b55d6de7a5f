// Fallback TLS backend when nginx is not installed: completes the handshake, writes "ok", ends.
// Session tickets are off so every client handshake is a full one.
// Usage: node tls-server.mjs --port PORT --cert FILE --key FILE
import tls from 'node:tls';
import { constants } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { port: { type: 'string' }, cert: { type: 'string' }, key: { type: 'string' } } });
const server = tls.createServer(
  { cert: readFileSync(values.cert), key: readFileSync(values.key), secureOptions: constants.SSL_OP_NO_TICKET },
  (socket) => {
    socket.on('error', () => {});
    socket.end('ok\n');
  },
);
server.on('tlsClientError', () => {});
server.listen({ host: '127.0.0.1', port: Number(values.port), backlog: 4096 });
