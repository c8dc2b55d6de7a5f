// Fallback request backend when nginx is not installed: answers every request with 200 "ok".
// Usage: node http-server.mjs --port PORT
import http from 'node:http';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { port: { type: 'string' } } });
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': 3 });
  res.end('ok\n');
});
server.keepAliveTimeout = 600_000;
server.listen({ host: '127.0.0.1', port: Number(values.port), backlog: 4096 });
