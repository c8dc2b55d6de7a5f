// [cluster] admission paths found in review: a server-speaks-first protocol behind a PROXY
// balancer, a queue whose head waits for the store with one thread, and the password in messages.
import assert from 'node:assert/strict';
import net from 'node:net';
import { test, type TestContext } from 'node:test';
import { redactRedisUrl } from '../src/cluster/redis-url.ts';
import { formatIssue, parseConfigText } from '../src/config/load.ts';
import { connect, startProxy } from './support/harness.ts';
import { eventually, startTrackedServer } from './support/backends.ts';
import { modeIs, startRedis } from './support/redis.ts';

/** A backend that greets first ("220 hello"), as SMTP does, and echoes after. */
async function startGreeter(t: TestContext): Promise<number> {
  const { port } = await startTrackedServer(t, (socket) => {
    socket.write('220 hello\r\n');
    socket.pipe(socket);
  });
  return port;
}

test('behind a trusted PROXY balancer, a server-speaks-first backend greets the client once the store admits it (the client sends nothing)', { timeout: 20_000 }, async (t) => {
  const redis = await startRedis(t);
  const greeter = await startGreeter(t);
  const proxy = await startProxy(t, `
[limits]
max_connections_per_ip = 5

[cluster]
redis = "${redis.url}"
instance = "a"
timeout = "1s"

[[listeners]]
name = "smtp"
bind = "127.0.0.1:0"
  [listeners.proxy_protocol]
  trusted = ["127.0.0.0/8"]
  [[listeners.routes]]
  name = "mail"
  default = true
  backends = "127.0.0.1:${greeter}"
`);
  await modeIs(proxy.daemon, 'ok');
  const socket = await connect(proxy.port('smtp'));
  t.after(() => socket.destroy());
  const greeting = new Promise<string>((resolve, reject) => {
    socket.once('data', (chunk: Buffer) => resolve(chunk.toString('latin1')));
    socket.once('close', () => reject(new Error('closed without a greeting')));
  });
  socket.write('PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n');
  assert.equal(await greeting, '220 hello\r\n');
  assert.equal(proxy.daemon.cluster.leases, 1, 'admitted by the store (the path that paused the handshake)');
  socket.destroy();
  await eventually(() => proxy.daemon.registry.size === 0 && proxy.daemon.cluster.leases === 0, 'every connection and lease released');
});

test('with one thread, a queued connection behind a head the store refuses is promoted at once, not at queue_timeout', { timeout: 20_000 }, async (t) => {
  const redis = await startRedis(t);
  const greeter = await startGreeter(t);
  const proxy = await startProxy(t, `
[limits]
max_connections_per_ip = 1

[cluster]
redis = "${redis.url}"
instance = "a"
timeout = "1s"

[[listeners]]
name = "tcp"
bind = "127.0.0.1:0"
workers = 1
queue = 10
queue_timeout = "5s"
  [listeners.proxy_protocol]
  trusted = ["127.0.0.0/8"]
  [[listeners.routes]]
  name = "r"
  default = true
  backends = "127.0.0.1:${greeter}"
`);
  await modeIs(proxy.daemon, 'ok');
  const port = proxy.port('tcp');
  const greeted = (socket: net.Socket): Promise<boolean> =>
    new Promise((resolve) => {
      socket.on('error', () => {}); // a refusal is a reset
      socket.once('data', () => resolve(true));
      socket.once('close', () => resolve(false));
    });
  // The worker is busy with client .1.
  const busy = await connect(port);
  t.after(() => busy.destroy());
  const busyGreeted = greeted(busy);
  busy.write('PROXY TCP4 192.0.2.1 127.0.0.1 40000 25\r\n');
  assert.ok(await busyGreeted);
  // Another instance holds client .9's only place in the store: the next .9 is refused by it.
  await redis.client.hset('smartproxy:{tcp/192.0.2.9}:c', 'other/0', 1, 'other/0#e', '99999999999999');
  const refusedSocket = await connect(port);
  const refused = greeted(refusedSocket);
  const waiting = await connect(port);
  t.after(() => waiting.destroy());
  const waitingGreeted = greeted(waiting);
  // Queued in that order behind the busy worker; then the worker frees.
  refusedSocket.write('PROXY TCP4 192.0.2.9 127.0.0.1 40000 25\r\n');
  waiting.write('PROXY TCP4 192.0.2.2 127.0.0.1 40000 25\r\n');
  await new Promise((resolve) => setTimeout(resolve, 100)); // both queued (no event to await from outside)
  const freedAt = Date.now();
  busy.destroy();
  assert.equal(await refused, false, 'refused by the store');
  assert.ok(await waitingGreeted, 'the next one is served');
  assert.ok(Date.now() - freedAt < 2000, `served ${Date.now() - freedAt} ms after the worker freed, not at queue_timeout`);
  waiting.destroy();
  await eventually(() => proxy.daemon.registry.size === 0, 'every connection closed');
});

test('a Redis password never appears in check-config messages, whatever characters it holds', () => {
  for (const password of ['p@ss', 'Pa/ss#word', 'a@b/c?d', 'plain']) {
    const text = `[cluster]\nredis = "redis://admin:${password}@10.0.0.9:6379/0"\n[[listeners]]\nname = "x"\nbind = "127.0.0.1:0"\n  [[listeners.routes]]\n  name = "r"\n  default = true\n  backends = "127.0.0.1:1"\n`;
    const loaded = parseConfigText(text, '/tmp/x.toml');
    const messages = loaded.ok ? [] : loaded.issues.map(formatIssue);
    for (const m of messages) assert.ok(!m.includes(password), `${password} leaked: ${m}`);
    assert.ok(!redactRedisUrl(`redis://admin:${password}@10.0.0.9:6379/0`).includes(password));
    assert.equal(redactRedisUrl(`redis://admin:${password}@10.0.0.9:6379/0`), 'redis://admin:redacted@10.0.0.9:6379/0');
  }
});
