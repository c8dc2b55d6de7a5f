#!/usr/bin/env node
// Demo backends for smartproxy.example.toml, all on loopback:
//   127.0.0.1:9000  TCP echo (the "fallback" route and the "tcp" listener)
//   127.0.0.1:9443  TLS server "api-1" (route "api")
//   127.0.0.1:9444  TLS server "api-2" (route "api")
// Each TLS server greets with its name, then echoes. The certificate is a fresh self-signed one
// made with openssl (falling back to the test fixture when openssl is missing).
// Usage: node scripts/demo-backends.mjs   (Ctrl-C stops it)
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';

function certificate() {
  const dir = mkdtempSync(join(tmpdir(), 'smartproxy-demo-'));
  try {
    execFileSync('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '30',
      '-subj', '/CN=api.example.com', '-addext', 'subjectAltName=DNS:api.example.com,DNS:*.example.org',
      '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
    ], { stdio: 'ignore' });
    return { cert: readFileSync(join(dir, 'cert.pem')), key: readFileSync(join(dir, 'key.pem')) };
  } catch {
    const fixtures = new URL('../test/fixtures/', import.meta.url);
    console.log('openssl not found: using the test fixture certificate');
    return { cert: readFileSync(new URL('cert.pem', fixtures)), key: readFileSync(new URL('key.pem', fixtures)) };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const { cert, key } = certificate();
const servers = [];

const echo = net.createServer({ allowHalfOpen: true }, (socket) => {
  socket.on('error', () => {});
  socket.pipe(socket);
});
servers.push([echo, 9000, 'TCP echo']);

for (const [port, name] of [[9443, 'api-1'], [9444, 'api-2']]) {
  const server = tls.createServer({ cert, key }, (socket) => {
    socket.on('error', () => {});
    socket.write(`hello from ${name} (SNI ${socket.servername ?? 'none'})\n`);
    socket.pipe(socket);
  });
  server.on('tlsClientError', () => {});
  servers.push([server, port, `TLS ${name}`]);
}

for (const [server, port, what] of servers) {
  server.on('error', (err) => {
    console.error(`${what} on 127.0.0.1:${port}: ${err.code ?? err.message}`);
    process.exit(1);
  });
  server.listen(port, '127.0.0.1', () => console.log(`${what} listening on 127.0.0.1:${port}`));
}

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    for (const [server] of servers) server.close();
    process.exit(0);
  });
}
