// check-config --explain: the path a connection would take through a config, from the config alone.
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { explain, formatExplanation, type ListenerExplanation } from '../src/explain.ts';
import { runCli, tempDir } from './support/cli.ts';
import { configFrom } from './support/harness.ts';

const CONFIG = configFrom(`
[firewall]
block = ["192.0.2.0/24"]
[[listeners]]
name = "tls"
bind = "127.0.0.1:8443"
  [listeners.firewall]
  allow = ["10.0.0.0/8", "127.0.0.0/8"]
  [listeners.limits]
  max_connections_per_ip = 20
  [listeners.proxy_protocol]
  trusted = ["10.9.0.0/16"]
  require = false
  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["10.1.0.1:443", "10.1.0.2:443"]
  [listeners.routes.firewall]
  block = ["10.66.0.0/16"]
  [listeners.routes.limits]
  max_connections = 100
  [[listeners.routes]]
  name = "wild"
  sni = ["*.example.org"]
  backends = "10.2.0.1:443"
  send_proxy_protocol = "v2"
[[listeners]]
name = "tcp"
bind = "127.0.0.1:8000"
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = "127.0.0.1:9000"
`);

function one(client: string, sni: string | null, listener = 'tls'): ListenerExplanation {
  const result = explain(CONFIG, { client, sni, listener });
  assert.ok(!('error' in result), JSON.stringify(result));
  assert.equal(result.length, 1);
  return result[0]!;
}

test('a client the global block list names is refused by the global firewall, with the deciding rule', () => {
  const e = one('192.0.2.7', 'api.example.com');
  assert.equal(e.refused, 'firewall');
  assert.match(e.steps.at(-1)!, /global firewall: block 192\.0\.2\.0\/24/);
});

test('a client outside a listener allow list is refused by the listener firewall, which names the list', () => {
  const e = one('172.16.0.1', 'api.example.com');
  assert.equal(e.refused, 'firewall');
  assert.match(e.steps.at(-1)!, /listener firewall: the allow list \(10\.0\.0\.0\/8, 127\.0\.0\.0\/8\) does not include 172\.16\.0\.1/);
});

test('an allowed client with a known SNI meets its limits, its route, the route limit and the backends, and is relayed', () => {
  const e = one('10.3.0.1', 'API.example.com');
  assert.equal(e.refused, null);
  const text = e.steps.join('\n');
  assert.match(text, /max_connections_per_ip 20/);
  assert.match(text, /route "api": SNI "api\.example\.com" matches it exactly/);
  assert.match(text, /route limit: 100 connections/);
  assert.match(text, /10\.1\.0\.1:443, 10\.1\.0\.2:443/);
  assert.equal(e.steps.at(-1), 'relayed');
});

test('a wildcard route names the pattern that matched and the PROXY header it sends', () => {
  const e = one('10.3.0.1', 'a.b.example.org');
  assert.match(e.steps.join('\n'), /route "wild": SNI "a\.b\.example\.org" matches "\*\.example\.org"/);
  assert.match(e.steps.join('\n'), /PROXY v2 header/);
});

test('an unknown SNI on a listener without a default route is no_route; a route firewall refuses after SNI', () => {
  assert.equal(one('10.3.0.1', 'other.example.net').refused, 'no_route');
  assert.equal(one('10.3.0.1', null).refused, 'no_route');
  const e = one('10.66.1.1', 'api.example.com');
  assert.equal(e.refused, 'route_firewall');
  assert.match(e.steps.at(-1)!, /route firewall: block 10\.66\.0\.0\/16/);
});

test('a trusted balancer is told its checks apply to the client it names; an untrusted client is told a PROXY header is refused', () => {
  assert.match(one('10.9.1.1', 'api.example.com').steps.join('\n'), /trusted balancer \(proxy_protocol\.trusted 10\.9\.0\.0\/16\)/);
  assert.match(one('10.3.0.1', 'api.example.com').steps.join('\n'), /not in proxy_protocol\.trusted/);
});

test('without --listener every listener is explained; an IPv4-mapped client is the IPv4 client; a plain listener routes without reading', () => {
  const all = explain(CONFIG, { client: '::ffff:127.0.0.1', sni: null, listener: null });
  assert.ok(!('error' in all));
  assert.deepEqual(all.map((e) => [e.listener, e.refused]), [['tls', 'no_route'], ['tcp', null]]);
  assert.match(all[1]!.steps.join('\n'), /default route "echo" without reading/);
  assert.match(formatExplanation({ client: '127.0.0.1', sni: null, listener: null }, all), /^a connection from 127\.0\.0\.1 without SNI:\n\nlistener "tls"/);
});

test('a query that cannot be asked says why', () => {
  assert.deepEqual(explain(CONFIG, { client: 'example.com', sni: null, listener: null }), { error: '"example.com" is not an IP address' });
  assert.match((explain(CONFIG, { client: '10.0.0.1', sni: null, listener: 'nope' }) as { error: string }).error, /no listener named "nope" \(listeners: tls, tcp\)/);
  assert.match((explain(CONFIG, { client: '10.0.0.1', sni: 'bad name!', listener: null }) as { error: string }).error, /is not a server name/);
});

test('check-config --explain prints the path from the real CLI, exits 0 for a refused connection and 2 for a query it cannot ask', { timeout: 30_000 }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'proxy.toml');
  writeFileSync(file, `
[[listeners]]
name = "tls"
bind = "127.0.0.1:8443"
  [listeners.firewall]
  block = ["203.0.113.0/24"]
  [[listeners.routes]]
  name = "api"
  sni = "api.example.com"
  backends = "127.0.0.1:9443"
`);
  const cli = (args: string[]): ReturnType<typeof runCli> => runCli(t, ['check-config', '-c', file, ...args]);
  const blocked = await cli(['--explain', '203.0.113.7', '--sni', 'api.example.com']);
  assert.equal(blocked.code, 0, blocked.stderr);
  assert.match(blocked.stdout, /REFUSED: firewall \(listener firewall: block 203\.0\.113\.0\/24\)/);
  const served = await cli(['--explain', '198.51.100.1', '--sni', 'api.example.com', '--listener', 'tls']);
  assert.match(served.stdout, /route "api": SNI "api\.example\.com" matches it exactly[\s\S]*relayed\n$/);
  const bad = await cli(['--explain', 'not-an-address']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /"not-an-address" is not an IP address/);
});
