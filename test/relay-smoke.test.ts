import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import tls from 'node:tls';
import { connect, readAll, sha256, startBackend, startProxy, startTlsBackend } from './support/harness.ts';

test('1 MB of random bytes each way arrives intact through a plain TCP listener', async (t) => {
  const backend = await startBackend(t);
  const proxy = await startProxy(t, `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`);
  const payload = randomBytes(1 << 20);
  const client = await connect(proxy.port('tcp'));
  const received = readAll(client);
  client.end(payload);
  const { data, error } = await received;
  assert.equal(error, null);
  assert.equal(sha256(data), sha256(payload));
  await proxy.daemon.registry.whenEmpty();
});

test('a TLS client is routed by SNI to its backend', async (t) => {
  const api = await startTlsBackend(t, 'api');
  const other = await startTlsBackend(t, 'other');
  const proxy = await startProxy(t, `
[[listeners]]
name = "tls"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["127.0.0.1:${api.port}"]
  [[listeners.routes]]
  name = "other"
  sni = ["*.example.org"]
  backends = ["127.0.0.1:${other.port}"]
`);
  for (const [servername, expected] of [['api.example.com', 'api'], ['www.example.org', 'other']] as const) {
    const socket = tls.connect({ port: proxy.port('tls'), host: '127.0.0.1', servername, rejectUnauthorized: false });
    const line = await new Promise<string>((resolve, reject) => {
      socket.once('data', (d: Buffer) => resolve(d.toString()));
      socket.once('error', reject);
    });
    assert.equal(line, `${expected}\n`);
    socket.destroy();
  }
  await proxy.daemon.registry.whenEmpty();
});
