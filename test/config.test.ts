import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import TOML from '@iarna/toml';
import { formatIssue, loadConfig, parseConfigText } from '../src/config/load.ts';
import { formatPath, knownKeysAt } from '../src/config/issues.ts';
import { indexLines, lineOf, parsePath, statementAt } from '../src/config/locate.ts';
import { dumpConfig, formatDuration, tomlString } from '../src/config/dump.ts';
import { configJsonSchema, configJsonSchemaText } from '../src/config/json-schema.ts';
import { configFileSchema } from '../src/config/schema.ts';
import { isUnitError, parseCidr, parseDuration, parseHostPort, parseSniPattern } from '../src/config/units.ts';
import { parseCidr as firewallParseCidr } from '../src/governance/ip-address.ts';
import type { Config, ConfigIssue } from '../src/config/types.ts';

const root = resolve(import.meta.dirname, '..');

/** A valid file: one listener, one default route; `listener` and `route` add lines to each. */
function minimal(options: { top?: string; listener?: string; route?: string } = {}): string {
  return `${options.top ?? ''}
[[listeners]]
name = "tcp"
bind = "127.0.0.1:8000"
${options.listener ?? ''}
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = "127.0.0.1:9000"
${options.route ?? ''}
`;
}

function load(text: string): Config {
  const result = parseConfigText(text, 'test.toml');
  if (!result.ok) assert.fail(`expected the file to load, got:\n${result.issues.map(formatIssue).join('\n')}`);
  return result.config;
}

function issuesOf(text: string): readonly ConfigIssue[] {
  const result = parseConfigText(text, 'test.toml');
  assert.equal(result.ok, false, 'expected the file to be rejected');
  return result.ok ? [] : result.issues;
}

/** The one issue at `path`; its message must mention every string in `mentions`. */
function expectIssue(text: string, path: string, ...mentions: string[]): ConfigIssue {
  const issues = issuesOf(text);
  const matching = issues.filter((i) => i.path === path);
  assert.equal(matching.length, 1, `expected one issue at ${path}, got:\n${issues.map(formatIssue).join('\n')}`);
  const [issue] = matching;
  assert.ok(issue);
  for (const mention of mentions) assert.ok(issue.message.includes(mention), `"${issue.message}" should mention ${mention}`);
  return issue;
}

describe('shipped configuration files', () => {
  const files = [join(root, 'smartproxy.example.toml'), ...readdirSync(join(root, 'config'))
    .filter((name) => name.endsWith('.toml'))
    .map((name) => join(root, 'config', name))];

  test('the example file and every file in config/ load without issues', () => {
    assert.ok(files.length >= 4);
    for (const file of files) {
      const result = loadConfig(file);
      assert.ok(result.ok, `${file}:\n${result.ok ? '' : result.issues.map(formatIssue).join('\n')}`);
      assert.equal(result.config.file, file);
    }
  });

  test('full-reference.toml sets every key the schema knows', () => {
    const document = TOML.parse(readFileSync(join(root, 'config', 'full-reference.toml'), 'utf8'));
    const missing: string[] = [];
    // Walk the schema's tables; for arrays of tables, a key counts if any element sets it.
    const visit = (path: PropertyKey[], tables: unknown[]) => {
      for (const key of knownKeysAt(configFileSchema, path)) {
        // A list of inline tables (backends) is walked like an array of tables.
        const values = tables.flat().flatMap((t) => (t !== null && typeof t === 'object' && key in t ? [(t as Record<string, unknown>)[key]] : []));
        if (values.length === 0) {
          missing.push([...path, key].join('.'));
          continue;
        }
        if (knownKeysAt(configFileSchema, [...path, key]).length > 0) visit([...path, key], values);
        else if (knownKeysAt(configFileSchema, [...path, key, 0]).length > 0) visit([...path, key, 0], values.flat());
      }
    };
    visit([], [document]);
    assert.deepEqual(missing, []);
  });

  test('the example file describes the documented demo topology', () => {
    const config = loadConfig(join(root, 'smartproxy.example.toml'));
    assert.ok(config.ok);
    const [tls, tcp] = config.config.listeners;
    assert.deepEqual(tls?.bind.map((b) => b.text), ['127.0.0.1:8443', '[::1]:8443']);
    assert.deepEqual(tls?.routes.map((r) => [r.name, r.isDefault, r.sni, r.backends.map((b) => b.address.text)]), [
      ['api', false, ['api.example.com', '*.example.org'], ['127.0.0.1:9443', '127.0.0.1:9444']],
      ['fallback', true, [], ['127.0.0.1:9000']],
    ]);
    assert.deepEqual(tcp?.routes.map((r) => [r.isDefault, r.backends.map((b) => b.address.text)]), [[true, ['127.0.0.1:9000']]]);
    assert.deepEqual(config.config.admin, { kind: 'tcp', address: { host: '127.0.0.1', port: 9901, text: '127.0.0.1:9901' } });
  });
});

describe('resolution', () => {
  test('a minimal file gets every default filled in', () => {
    const config = load(minimal());
    const expected: Config = {
      file: resolve('test.toml'),
      limits: { maxConnections: 10_000, ipv6Prefix: 64, maxTrackedIps: 100_000 },
      firewall: { allow: [], block: [] },
      logging: { level: 'info', rejectionSummaryIntervalMs: 10_000 },
      admin: null,
      dns: { servers: null, timeoutMs: 2_000, minTtlMs: 1_000, maxTtlMs: 3_600_000, retryMs: 5_000 },
      process: { threads: 'auto' },
      shutdown: { drainTimeoutMs: 30_000, shutdownDelayMs: 0 },
      listeners: [{
        name: 'tcp',
        path: 'listeners[0]',
        bind: [{ host: '127.0.0.1', port: 8000, text: '127.0.0.1:8000' }],
        workers: 1024,
        queue: 256,
        queueTimeoutMs: 5_000,
        reject: 'reset',
        accessLog: true,
        ipv6Only: true,
        timeouts: { connectMs: 5_000, clientHelloMs: 5_000, idleMs: 600_000, halfCloseMs: 30_000, maxLifetimeMs: 0, maxLifetimeJitterPct: 0 },
        limits: { maxConnectionsPerIp: 0, connectionRatePerIp: { count: 0, perMs: 10_000 }, fairShareAbove: 80 },
        firewall: { allow: [], block: [] },
        proxyProtocol: null,
        onRemoval: 'keep',
        routes: [{
          name: 'echo',
          path: 'listeners[0].routes[0]',
          sni: [],
          isDefault: true,
          backends: [{ address: { host: '127.0.0.1', port: 9000, text: '127.0.0.1:9000' }, weight: 1, backup: false, maxConnections: 0 }],
          balance: 'round_robin',
          onAllDown: 'panic',
          slowStartMs: 0,
          healthCheck: null,
          ejection: { consecutiveFailures: 3, baseTimeMs: 30_000, maxTimeMs: 300_000, maxSharePct: 50 },
          limits: { maxConnections: 0 },
          firewall: { allow: [], block: [] },
          sendProxyProtocol: null,
          passThroughTlvs: [],
          onRemoval: 'keep',
        }],
      }],
      cluster: null,
    };
    assert.deepEqual(config, expected);
  });

  test('a listener that overrides one timeout inherits the others from [timeouts]', () => {
    const config = load(minimal({
      top: '[timeouts]\nconnect = "2s"\nidle = "1m"\nmax_lifetime_jitter = 5',
      listener: '[listeners.timeouts]\nidle = "30s"',
    }));
    assert.deepEqual(config.listeners[0]?.timeouts, {
      connectMs: 2_000, clientHelloMs: 5_000, idleMs: 30_000, halfCloseMs: 30_000, maxLifetimeMs: 0, maxLifetimeJitterPct: 5,
    });
  });

  test('listener limits inherit per key, including inside connection_rate_per_ip', () => {
    const config = load(minimal({
      top: '[limits]\nmax_connections_per_ip = 20\nconnection_rate_per_ip = { count = 10, per = "1m" }\nfair_share_above = 70',
      listener: '[listeners.limits]\nconnection_rate_per_ip = { count = 3 }',
    }));
    assert.deepEqual(config.listeners[0]?.limits, {
      maxConnectionsPerIp: 20, connectionRatePerIp: { count: 3, perMs: 60_000 }, fairShareAbove: 70,
    });
  });

  test('on_removal flows from [reload] to the listener to the route unless overridden', () => {
    const config = load(`
[reload]
on_removal = "drain"
[[listeners]]
name = "a"
bind = "127.0.0.1:8000"
  [[listeners.routes]]
  name = "inherits"
  default = true
  backends = "127.0.0.1:9000"
[[listeners]]
name = "b"
bind = "127.0.0.1:8001"
on_removal = "close"
  [[listeners.routes]]
  name = "inherits"
  default = true
  backends = "127.0.0.1:9000"
  [[listeners.routes]]
  name = "own"
  sni = "x.example.com"
  backends = "127.0.0.1:9000"
  on_removal = "keep"
`);
    assert.deepEqual(config.listeners.map((l) => [l.onRemoval, l.routes.map((r) => r.onRemoval)]), [
      ['drain', ['drain']],
      ['close', ['close', 'keep']],
    ]);
  });

  test('a listener keeps its own firewall lists, not merged with the global ones', () => {
    const config = load(minimal({
      top: '[firewall]\nblock = ["192.0.2.0/24"]',
      listener: '[listeners.firewall]\nallow = ["10.0.0.0/8"]',
      route: '[listeners.routes.firewall]\nblock = ["10.1.0.0/16"]',
    }));
    assert.deepEqual(config.firewall, { allow: [], block: ['192.0.2.0/24'] });
    assert.deepEqual(config.listeners[0]?.firewall, { allow: ['10.0.0.0/8'], block: [] });
    assert.deepEqual(config.listeners[0]?.routes[0]?.firewall, { allow: [], block: ['10.1.0.0/16'] });
  });

  test('single strings are accepted for bind, backends and sni, and SNI names are lower-cased', () => {
    const config = load(minimal({ route: 'sni = "API.Example.COM"' }));
    const route = config.listeners[0]?.routes[0];
    assert.deepEqual(route?.sni, ['api.example.com']);
    assert.equal(route?.backends.length, 1);
    assert.equal(config.listeners[0]?.bind.length, 1);
  });

  test('a proxy_protocol table gets its defaults and a unix admin socket is parsed', () => {
    const config = load(minimal({
      top: '[admin]\nlisten = "unix:/run/smartproxy/admin.sock"',
      listener: '[listeners.proxy_protocol]\ntrusted = ["10.0.0.0/8"]',
    }));
    assert.deepEqual(config.listeners[0]?.proxyProtocol, { accept: 'any', trusted: ['10.0.0.0/8'], require: true });
    assert.deepEqual(config.admin, { kind: 'unix', path: '/run/smartproxy/admin.sock' });
  });

  test('a loaded config is frozen all the way down', () => {
    const config = load(minimal());
    assert.ok(Object.isFrozen(config));
    assert.ok(Object.isFrozen(config.listeners[0]?.routes[0]?.backends[0]));
    assert.throws(() => (config.listeners as Config['listeners'][number][]).push(config.listeners[0]!));
  });
});

describe('rejection rules', () => {
  test('a second listener with the same name is reported at its name', () => {
    const text = `${minimal()}
[[listeners]]
name = "tcp"
bind = "127.0.0.1:8001"
  [[listeners.routes]]
  name = "r"
  default = true
  backends = "127.0.0.1:9000"
`;
    expectIssue(text, 'listeners[1].name', '"tcp"', 'listeners[0]');
  });

  test('two routes with the same name in one listener are reported at the second', () => {
    expectIssue(minimal({ route: '[[listeners.routes]]\nname = "echo"\nsni = "a.example.com"\nbackends = "127.0.0.1:9000"' }),
      'listeners[0].routes[1].name', '"echo"');
  });

  test('the same bind address on two listeners is a conflict', () => {
    const text = `${minimal()}
[[listeners]]
name = "other"
bind = ["127.0.0.1:8001", "127.0.0.1:8000"]
  [[listeners.routes]]
  name = "r"
  default = true
  backends = "127.0.0.1:9000"
`;
    expectIssue(text, 'listeners[1].bind[1]', '"127.0.0.1:8000"', 'listeners[0].bind');
  });

  test('the same bind address twice in one listener is a conflict, however IPv6 is spelled', () => {
    expectIssue(minimal({ listener: 'bind = ["[::1]:8000", "[0:0::1]:8000"]' }).replace('bind = "127.0.0.1:8000"\n', ''),
      'listeners[0].bind[1]', '"[0:0::1]:8000"', 'listeners[0].bind[0]');
  });

  test('0.0.0.0 overlaps any IPv4 address on the same port', () => {
    expectIssue(minimal({ listener: 'bind = ["127.0.0.1:8000", "0.0.0.0:8000"]' }).replace('bind = "127.0.0.1:8000"\n', ''),
      'listeners[0].bind[1]', '"0.0.0.0:8000"', '"127.0.0.1:8000"');
  });

  test('[::] overlaps every IPv6 address on the same port', () => {
    expectIssue(minimal({ listener: 'bind = ["[::]:8000", "[::1]:8000", "127.0.0.1:8000"]' }).replace('bind = "127.0.0.1:8000"\n', ''),
      'listeners[0].bind[1]', '"[::1]:8000"', '"[::]:8000"');
    const result = parseConfigText(minimal({ listener: 'bind = ["[::]:8000", "[::1]:8000", "127.0.0.1:8000"]' }).replace('bind = "127.0.0.1:8000"\n', ''), 'test.toml');
    assert.equal(result.ok ? 0 : result.issues.length, 1, 'only the IPv6 bind overlaps: listeners bind IPv6 addresses IPv6-only');
  });

  test('[::] and 0.0.0.0 on one port do not conflict: IPv6 binds are IPv6-only', () => {
    load(minimal({ listener: 'bind = ["[::]:8000", "0.0.0.0:8000"]' }).replace('bind = "127.0.0.1:8000"\n', ''));
  });

  test('different ports, and IPv4 next to IPv6 loopback on one port, do not conflict', () => {
    load(minimal({ listener: 'bind = ["127.0.0.1:8000", "[::1]:8000", "0.0.0.0:8001", "127.0.0.2:8002"]' }).replace('bind = "127.0.0.1:8000"\n', ''));
  });

  test('port 0 in a bind asks the kernel for a free port, so two of them never conflict', () => {
    const config = load(minimal({ listener: 'bind = ["127.0.0.1:0", "127.0.0.1:0"]' }).replace('bind = "127.0.0.1:8000"\n', ''));
    assert.deepEqual(config.listeners[0]?.bind.map((b) => b.port), [0, 0]);
    expectIssue(minimal({ route: 'backends = "127.0.0.1:0"' }).replace('backends = "127.0.0.1:9000"\n', ''),
      'listeners[0].routes[0].backends', '"127.0.0.1:0"', '1-65535');
  });

  test('the admin address may not collide with a listener bind', () => {
    expectIssue(minimal({ top: '[admin]\nlisten = "127.0.0.1:8000"' }), 'admin.listen', '"127.0.0.1:8000"', 'listeners[0].bind');
  });

  test('a second default route on a listener is reported at its default key', () => {
    expectIssue(minimal({ route: '[[listeners.routes]]\nname = "second"\ndefault = true\nbackends = "127.0.0.1:9000"' }),
      'listeners[0].routes[1].default', '"second"', 'default = true', 'listeners[0].routes[0]');
  });

  test('the same SNI name on two routes of a listener is reported after lower-casing', () => {
    const text = minimal({
      route: 'sni = "api.example.com"\n[[listeners.routes]]\nname = "b"\nsni = ["x.example.com", "API.example.com"]\nbackends = "127.0.0.1:9000"',
    });
    expectIssue(text, 'listeners[0].routes[1].sni[1]', '"API.example.com"', 'listeners[0].routes[0]');
  });

  test('a route with neither sni nor default = true is unreachable', () => {
    expectIssue(minimal({ route: '[[listeners.routes]]\nname = "lost"\nbackends = "127.0.0.1:9000"' }),
      'listeners[0].routes[1]', '"lost"', 'no sni');
  });

  test('empty backends are rejected', () => {
    expectIssue(minimal({ route: '[[listeners.routes]]\nname = "b"\nsni = "b.example.com"\nbackends = []' }),
      'listeners[0].routes[1].backends', 'empty', '[]');
  });

  test('an empty bind list is rejected', () => {
    expectIssue(minimal({ listener: 'bind = []' }).replace('bind = "127.0.0.1:8000"\n', ''), 'listeners[0].bind', 'empty', '[]');
  });

  test('a backend port out of range names the address', () => {
    const issue = expectIssue(minimal({ route: '[[listeners.routes]]\nname = "b"\nsni = "b.example.com"\nbackends = ["127.0.0.1:1", "127.0.0.1:2", "10.0.0.1:99999"]' }),
      'listeners[0].routes[1].backends[2]', '"10.0.0.1:99999"', '1-65535');
    assert.equal(formatIssue(issue), 'listeners[0].routes[1].backends[2] (line 13): "10.0.0.1:99999" is not host:port (port must be 1-65535)');
  });

  test('a malformed duration names the value and the problem', () => {
    expectIssue(minimal({ top: '[timeouts]\nidle = "10 minutes"' }), 'timeouts.idle', '"10 minutes"', 'not a duration');
    expectIssue(minimal({ listener: 'queue_timeout = "0s"' }), 'listeners[0].queue_timeout', '"0s"', 'greater than 0');
  });

  test('a malformed CIDR names the value', () => {
    expectIssue(minimal({ top: '[firewall]\nallow = ["10.0.0.0/8", "10.0.0.0/33"]' }), 'firewall.allow[1]', '"10.0.0.0/33"', '0-32');
    expectIssue(minimal({ listener: '[listeners.firewall]\nblock = ["not-an-ip"]' }), 'listeners[0].firewall.block[0]', '"not-an-ip"');
  });

  for (const pattern of ['api.*.com', '*foo.com', '*', '*.*.example.com']) {
    test(`an SNI wildcard outside the leading label is rejected: ${pattern}`, () => {
      expectIssue(minimal({ route: `sni = ["ok.example.com", "${pattern}"]` }), 'listeners[0].routes[0].sni[1]', JSON.stringify(pattern), 'wildcard');
    });
  }

  test('pass_through_tlvs without send_proxy_protocol = "v2" is rejected', () => {
    expectIssue(minimal({ route: 'send_proxy_protocol = "v1"\npass_through_tlvs = [0xEA]' }),
      'listeners[0].routes[0].pass_through_tlvs', '[234]', '"v1"');
    expectIssue(minimal({ route: 'pass_through_tlvs = [1]' }), 'listeners[0].routes[0].pass_through_tlvs', '[1]', 'not set');
    load(minimal({ route: 'send_proxy_protocol = "v2"\npass_through_tlvs = [0xEA]' }));
  });

  test('slow_start is a duration per route, and not for balance = "source_hash"', () => {
    assert.equal(load(minimal({ route: 'slow_start = "30s"' })).listeners[0]!.routes[0]!.slowStartMs, 30_000);
    assert.equal(load(minimal({})).listeners[0]!.routes[0]!.slowStartMs, 0);
    expectIssue(minimal({ route: 'balance = "source_hash"\nslow_start = "30s"' }), 'listeners[0].routes[0].slow_start', 'source_hash');
    load(minimal({ route: 'balance = "source_hash"\nslow_start = "0s"' }));
    expectIssue(minimal({ route: 'slow_start = "soon"' }), 'listeners[0].routes[0].slow_start', '"soon"');
  });

  test('a listener with no routes is rejected', () => {
    expectIssue('[[listeners]]\nname = "a"\nbind = "127.0.0.1:8000"\n', 'listeners[0].routes', 'at least one [[listeners.routes]]');
  });

  test('a file with no listeners is rejected', () => {
    expectIssue('[logging]\nlevel = "debug"\n', 'listeners', 'at least one [[listeners]]');
    expectIssue('listeners = []\n', 'listeners', 'at least one [[listeners]]', '[]');
  });

  test('a non-loopback admin address needs admin.allow_public = true', () => {
    expectIssue(minimal({ top: '[admin]\nlisten = "0.0.0.0:9901"' }), 'admin.listen', '"0.0.0.0:9901"', 'allow_public');
    expectIssue(minimal({ top: '[admin]\nlisten = "admin.example.com:9901"' }), 'admin.listen', '"admin.example.com:9901"');
    load(minimal({ top: '[admin]\nlisten = "0.0.0.0:9901"\nallow_public = true' }));
    for (const listen of ['127.0.0.1:9901', '127.8.9.10:9901', '[::1]:9901', 'localhost:9901', 'unix:/tmp/admin.sock']) {
      load(minimal({ top: `[admin]\nlisten = "${listen}"` }));
    }
  });

  test('an admin unix socket path must be absolute and short enough to bind', () => {
    expectIssue(minimal({ top: '[admin]\nlisten = "unix:admin.sock"' }), 'admin.listen', '"unix:admin.sock"', 'absolute');
    expectIssue(minimal({ top: `[admin]\nlisten = "unix:/${'a'.repeat(120)}"` }), 'admin.listen', 'longer than 107 bytes');
  });

  test('a proxy_protocol table without trusted addresses is rejected', () => {
    expectIssue(minimal({ listener: '[listeners.proxy_protocol]\naccept = "v2"' }), 'listeners[0].proxy_protocol.trusted', 'missing');
    expectIssue(minimal({ listener: '[listeners.proxy_protocol]\ntrusted = []' }), 'listeners[0].proxy_protocol.trusted', 'empty');
  });

  test('a wrong type says what was expected and shows the value received', () => {
    expectIssue(minimal({ listener: 'workers = "many"' }), 'listeners[0].workers', 'expected a whole number', '"many"');
    expectIssue(minimal({ top: '[timeouts]\nconnect = 5' }), 'timeouts.connect', 'expected a duration', 'got 5');
    expectIssue(minimal({ route: 'default = "yes"' }).replace('default = true\n', ''), 'listeners[0].routes[0].default', 'true or false', '"yes"');
    expectIssue(minimal({ listener: 'bind = 8000' }).replace('bind = "127.0.0.1:8000"\n', ''), 'listeners[0].bind', 'expected host:port', '8000');
    expectIssue(minimal({ top: '[limits]\nmax_connections = 1.5' }), 'limits.max_connections', 'expected a whole number', '1.5');
    expectIssue(minimal({ top: 'timeouts = "5s"' }), 'timeouts', 'expected a table', '"5s"');
  });

  test('out-of-range numbers and unknown choices name the value', () => {
    expectIssue(minimal({ top: '[limits]\nfair_share_above = 101' }), 'limits.fair_share_above', 'at most 100', '101');
    expectIssue(minimal({ top: '[limits]\nipv6_prefix = 0' }), 'limits.ipv6_prefix', 'at least 1', '0');
    expectIssue(minimal({ listener: 'reject = "rst"' }), 'listeners[0].reject', '"rst"', '"reset"');
    expectIssue(minimal({ top: '[logging]\nlevel = "infoo"' }), 'logging.level', '"infoo"', 'did you mean "info"');
    expectIssue(minimal({ route: 'send_proxy_protocol = "v2"\npass_through_tlvs = [256]' }), 'listeners[0].routes[0].pass_through_tlvs[0]', '256');
    expectIssue(minimal({ top: '[limits]\nmax_connections = 99999999999999999999' }), 'limits.max_connections', 'too large');
  });

  test('a name with characters outside [A-Za-z0-9_.-] is rejected', () => {
    expectIssue(minimal().replace('name = "tcp"', 'name = "my listener"'), 'listeners[0].name', '"my listener"');
    expectIssue(minimal().replace('name = "echo"', `name = "${'r'.repeat(65)}"`), 'listeners[0].routes[0].name', 'rrrr');
  });
});

describe('reporting', () => {
  test('a file with five different mistakes reports all five at five distinct paths', () => {
    const text = `
[timeouts]
idle = "forever"
[[listeners]]
name = "tcp"
bind = "127.0.0.1:8000"
rotues = 1
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = "127.0.0.1:0"
  [[listeners.routes]]
  name = "echo"
  sni = "a.*.example.com"
  backends = "127.0.0.1:9000"
`;
    const issues = issuesOf(text);
    const paths = issues.map((i) => i.path).sort();
    assert.deepEqual(paths, [
      'listeners[0].rotues',
      'listeners[0].routes[0].backends',
      'listeners[0].routes[1].name',
      'listeners[0].routes[1].sni',
      'timeouts.idle',
    ], issues.map(formatIssue).join('\n'));
  });

  test('a TOML syntax error reports its line and column', () => {
    const issues = issuesOf('[limits]\nmax_connections = 10\nfair_share_above = = 3\n');
    assert.equal(issues.length, 1);
    assert.match(issues[0]?.message ?? '', /^line 3, column 20: /);
    assert.equal(issues[0]?.path, '(syntax)');
  });

  test('a key defined twice is a syntax error with its position', () => {
    const issues = issuesOf('[logging]\nlevel = "info"\nlevel = "debug"\n');
    assert.match(issues[0]?.message ?? '', /^line 3, column \d+: /);
  });

  test('an unknown key suggests the closest known key', () => {
    expectIssue(minimal({ listener: 'rotues = []' }), 'listeners[0].rotues', 'unknown key', 'did you mean "routes"?');
    expectIssue(minimal({ top: '[timeouts]\nidel = "5s"' }), 'timeouts.idel', 'did you mean "idle"?');
    expectIssue(minimal({ route: '[listeners.routes.limits]\nmax-connections = 5' }), 'listeners[0].routes[0].limits.max-connections', 'did you mean "max_connections"?');
    expectIssue(minimal({ top: 'listners = 1' }), 'listners', 'did you mean "listeners"?');
  });

  test('an unknown key with no close match lists the keys that are allowed', () => {
    expectIssue(minimal({ top: '[shutdown]\nbanana = 1' }), 'shutdown.banana', 'expected one of: drain_timeout, shutdown_delay');
  });

  test('a missing file is an issue at (file), not an exception', () => {
    const result = loadConfig(join(tmpdir(), 'smartproxy-no-such-dir', 'missing.toml'));
    assert.equal(result.ok, false);
    assert.deepEqual(result.ok ? [] : result.issues.map((i) => i.path), ['(file)']);
    assert.match(result.ok ? '' : result.issues[0]?.message ?? '', /no such file/);
  });

  test('loadConfig reads a file from disk and records its absolute path', (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'smartproxy-config-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const file = join(dir, 'proxy.toml');
    writeFileSync(file, `\uFEFF${minimal()}`);
    const result = loadConfig(file);
    assert.ok(result.ok);
    assert.equal(result.config.file, file);
    const asDirectory = loadConfig(dir);
    assert.match(asDirectory.ok ? '' : asDirectory.issues[0]?.message ?? '', /is a directory/);
  });

  test('formatIssue prints path, colon, message', () => {
    assert.equal(formatIssue({ path: 'a.b[2].c', message: 'expected an integer, got "x"' }), 'a.b[2].c: expected an integer, got "x"');
  });

  test('parseConfigText never throws on junk input', () => {
    let seed = 0x5eed;
    const random = () => {
      seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    const example = readFileSync(join(root, 'smartproxy.example.toml'), 'utf8');
    const pieces = ['[', ']', '[[listeners]]', '[[listeners.routes]]', '=', '"', '\n', 'name', ' = ', '0', '-1', '"x"', '{', '}', ',', '1e999', 'nan', '[]', '0x', '1979-05-27', '"*"', '\\u0000', "'''"];
    for (let i = 0; i < 400; i++) {
      let text: string;
      if (i % 4 === 0) {
        text = Array.from({ length: Math.floor(random() * 200) }, () => String.fromCharCode(Math.floor(random() * 0x3000))).join('');
      } else if (i % 4 === 1) {
        text = Array.from({ length: Math.floor(random() * 40) }, () => pieces[Math.floor(random() * pieces.length)]).join('');
      } else {
        // Mutations of a valid file reach deep into the schema and the cross-field rules.
        text = example;
        for (let k = 0; k < 1 + Math.floor(random() * 4); k++) {
          const at = Math.floor(random() * text.length);
          const piece = pieces[Math.floor(random() * pieces.length)] ?? '';
          text = random() < 0.5 ? text.slice(0, at) + piece + text.slice(at) : text.slice(0, at) + text.slice(at + 1 + Math.floor(random() * 20));
        }
      }
      const result = parseConfigText(text, 'fuzz.toml');
      if (!result.ok) {
        assert.ok(result.issues.length > 0);
        for (const issue of result.issues) {
          assert.equal(typeof issue.path, 'string');
          assert.ok(issue.message.length > 0);
          assert.doesNotMatch(issue.message, /internal error/, `${formatIssue(issue)}\n--- input ---\n${text}`);
        }
      }
    }
  });
});

describe('caps that keep a valid config from crashing or bloating the daemon', () => {
  test('connection_rate_per_ip.count = 4294967296 is refused at its path (it once passed and crashed the first connection)', () => {
    expectIssue(minimal({ top: '[limits]\nconnection_rate_per_ip = { count = 4294967296, per = "1s" }' }),
      'limits.connection_rate_per_ip.count', 'at most 10000000', '4294967296');
    load(minimal({ top: '[limits]\nconnection_rate_per_ip = { count = 10000000, per = "1s" }' }));
  });

  test('workers, queue and the per-client limits have the same ceiling', () => {
    expectIssue(minimal({ listener: 'workers = 10000001' }), 'listeners[0].workers', 'at most 10000000');
    expectIssue(minimal({ listener: 'queue = 10000001' }), 'listeners[0].queue', 'at most 10000000');
    expectIssue(minimal({ listener: '[listeners.limits]\nmax_connections_per_ip = 10000001' }), 'listeners[0].limits.max_connections_per_ip', 'at most 10000000');
    expectIssue(minimal({ top: '[limits]\nmax_tracked_ips = 10000001' }), 'limits.max_tracked_ips', 'at most 10000000');
  });

  test('a duration that would round up past setTimeout\'s maximum is refused (2,147,483,001 ms once fired after 1 ms)', () => {
    expectIssue(minimal({ top: '[timeouts]\nidle = "2147483001ms"' }), 'timeouts.idle', '576h');
    expectIssue(minimal({ listener: '[listeners.timeouts]\nmax_lifetime = "596h"' }), 'listeners[0].timeouts.max_lifetime', '576h');
    load(minimal({ top: '[timeouts]\nidle = "576h"\nmax_lifetime = "576h"' }));
  });
});

describe('units', () => {
  test('parseDuration accepts whole numbers with ms, s, m, h, compound largest first', () => {
    const valid: Array<[string, number]> = [
      ['250ms', 250], ['5s', 5_000], ['10m', 600_000], ['2h', 7_200_000], ['0s', 0], ['0ms', 0],
      ['1m30s', 90_000], ['1h2m3s4ms', 3_723_004], ['576h', 2_073_600_000],
    ];
    for (const [text, ms] of valid) assert.equal(parseDuration(text), ms, text);
  });

  test('parseDuration rejects negatives, missing units, bare numbers, empty and odd spellings', () => {
    const invalid: Array<[string, RegExp]> = [
      ['-5s', /negative/], ['5', /missing unit/], ['0', /missing unit/], ['', /empty/], ['1m30', /missing unit after "30"/],
      ['1.5s', /whole numbers/], ['5 s', /expected/], ['5S', /expected/], ['5d', /expected/], ['30s1m', /largest first/],
      ['1s1s', /largest first/], ['s', /expected/], ['577h', /maximum/], ['576h1ms', /maximum/], [' 5s', /expected/],
    ];
    for (const [text, reason] of invalid) {
      const result = parseDuration(text);
      assert.ok(isUnitError(result), `${JSON.stringify(text)} should be rejected`);
      assert.match(result.error, reason, text);
    }
  });

  test('parseHostPort accepts IPv4, bracketed IPv6 and DNS names', () => {
    const valid: Array<[string, string, number]> = [
      ['127.0.0.1:8443', '127.0.0.1', 8443], ['[::1]:8443', '::1', 8443], ['backend.internal:443', 'backend.internal', 443],
      ['[2001:db8::1]:1', '2001:db8::1', 1], ['localhost:65535', 'localhost', 65535], ['db_1:5432', 'db_1', 5432],
      ['[::ffff:10.0.0.1]:80', '::ffff:10.0.0.1', 80],
    ];
    for (const [text, host, port] of valid) assert.deepEqual(parseHostPort(text), { host, port, text });
  });

  test('parseHostPort rejects bad ports, unbracketed IPv6 and garbage', () => {
    const invalid: Array<[string, RegExp]> = [
      ['127.0.0.1:0', /1-65535/], ['127.0.0.1:65536', /1-65535/], ['127.0.0.1:0443', /leading zeros/],
      ['127.0.0.1', /missing port/], ['127.0.0.1:', /missing port/], ['[::1]', /missing port/], ['[::1]8443', /":port"/],
      ['::1:8443', /brackets|missing port/], ['2001:db8::1:8443', /brackets|missing port/], ['fe80::zz:80', /brackets/],
      ['[1.2.3.4]:80', /only for IPv6/], ['[nope]:80', /not an IPv6/], ['[::1:80', /"\]"/], [':80', /missing host/],
      ['', /empty/], ['host name:80', /whitespace/], ['-bad.example:80', /label/], ['a..b:80', /empty label/],
      ['10.0.0:80', /IPv4/], ['256.1.1.1:80', /IPv4/], ['127.0.0.1:80a', /decimal/], ['127.0.0.1:+80', /decimal/],
      ['%%%:80', /label/],
    ];
    for (const [text, reason] of invalid) {
      const result = parseHostPort(text);
      assert.ok(isUnitError(result), `${JSON.stringify(text)} should be rejected`);
      assert.match(result.error, reason, text);
    }
  });

  test('parseCidr accepts addresses and networks and rejects bad prefixes and garbage', () => {
    for (const [text, prefix] of [['10.0.0.0/8', 8], ['::1', 128], ['2001:db8::/32', 32], ['192.0.2.7', 32], ['0.0.0.0/0', 0], ['::/0', 0]] as const) {
      const result = parseCidr(text);
      assert.ok(!isUnitError(result), text);
      assert.equal(result.prefix, prefix);
    }
    const invalid: Array<[string, RegExp]> = [
      ['10.0.0.0/33', /0-32/], ['2001:db8::/129', /0-128/], ['10.0.0.0/', /0-32/], ['10.0.0.0/08', /0-32/], ['10.0.0.0/-1', /0-32/],
      ['10.0.0.1/8', /did you mean "10.0.0.0\/8"/], ['garbage', /expected an IP/], ['10.1', /expected an IP/], ['0x0a.0.0.1', /expected an IP/],
      ['fe80::1%eth0', /expected an IP/], ['010.0.0.1', /expected an IP/], ['', /empty/],
    ];
    for (const [text, reason] of invalid) {
      const result = parseCidr(text);
      assert.ok(isUnitError(result), `${JSON.stringify(text)} should be rejected`);
      assert.match(result.error, reason, text);
    }
  });

  test('every address the config accepts, the firewall compiler accepts too', () => {
    const accepted = ['10.0.0.0/8', '::1', '2001:db8::/32', '::ffff:10.0.0.0/104', '0.0.0.0/0', '::/0', '1:2:3:4:5:6:1.2.3.4', 'FE80::/10'];
    for (const text of accepted) {
      assert.ok(!isUnitError(parseCidr(text)), text);
      assert.notEqual(firewallParseCidr(text), null, text);
    }
    assert.ok(isUnitError(parseCidr('::ffff:010.0.0.1')), 'leading zeros in an embedded IPv4 are refused like the firewall does');
  });

  test('parseSniPattern lower-cases names and allows only a leading "*." wildcard', () => {
    assert.equal(parseSniPattern('API.Example.com'), 'api.example.com');
    assert.equal(parseSniPattern('*.Example.ORG'), '*.example.org');
    for (const text of ['*', '*foo.com', 'api.*.com', '*.*.com', 'foo*.com', '', '1.2.3.4', 'a..b', 'example.com.']) {
      assert.ok(isUnitError(parseSniPattern(text)), `${JSON.stringify(text)} should be rejected`);
    }
  });
});

describe('dual-stack binds', () => {
  test('with ipv6_only = false, [::]:P takes IPv4 too, so 0.0.0.0:P and 127.0.0.1:P overlap it', () => {
    const text = minimal({ listener: 'ipv6_only = false\nbind = ["[::]:8000", "0.0.0.0:8000", "127.0.0.1:8001"]' }).replace('bind = "127.0.0.1:8000"\n', '');
    expectIssue(text, 'listeners[0].bind[1]', '"0.0.0.0:8000"', '"[::]:8000"');
    load(minimal({ listener: 'bind = ["[::]:8000", "0.0.0.0:8000"]' }).replace('bind = "127.0.0.1:8000"\n', ''));
  });
});

describe('positions', () => {
  // Every construct the locator follows, with the expected line of each path in a comment.
  const tricky = `# a comment with [brackets], [[listeners]] and key = "value"
title = "a # is text here, and so are [x] and = y"      # 2
[limits]                                                # 3
connection_rate_per_ip = { count = 0, per = "10s" }     # 4
"quoted.key" = 1                                        # 5
a . b.'c d' = 2                                         # 6
[[listeners]]                                           # 7
name = 'lit # [=' # 8 ] a comment after a literal string
bind = [                                                # 9
  "127.0.0.1:1",  # 10, a comment holding a "quote and a ]
  # 11: a comment line inside the array: [[listeners]]
  "127.0.0.1:2",                                        # 12
]
multi = """
line 15 [x] = "in a string"
\\"""still the string: [[listeners]]
"""
after = 1                                               # 18
  [[listeners.routes]]                                  # 19
  name = "r0"                                           # 20
  [listeners.routes.limits]                             # 21
  max_connections = 1                                   # 22
  [[listeners.routes]]                                  # 23
  name = "r1"                                           # 24
  nested = [ { x = 1 }, { x = [1, 2] } ]                # 25
  literal = '''
[[listeners]] in a literal string, line 27
'''
[[listeners]]                                           # 29
when = 1979-05-27 07:32:00Z                             # 30
  [[listeners.routes]]                                  # 31
  backends = [[1, 2], [               # 32
    3,                                # 33
  ]]
`;

  test('the locator finds tables, arrays of tables, dotted and quoted keys, inline tables and multi-line array elements', () => {
    const index = indexLines(tricky, TOML.parse(tricky));
    const expected: Array<[string, number]> = [
      ['title', 2], ['limits', 3], ['limits.connection_rate_per_ip', 4], ['limits.connection_rate_per_ip.per', 4],
      ['limits."quoted.key"', 5], ['limits.a', 6], ['limits.a.b."c d"', 6],
      ['listeners', 7], ['listeners[0]', 7], ['listeners[0].name', 8], ['listeners[0].bind', 9],
      ['listeners[0].bind[0]', 10], ['listeners[0].bind[1]', 12], ['listeners[0].multi', 14], ['listeners[0].after', 18],
      ['listeners[0].routes', 19], ['listeners[0].routes[0]', 19], ['listeners[0].routes[0].name', 20],
      ['listeners[0].routes[0].limits', 21], ['listeners[0].routes[0].limits.max_connections', 22],
      ['listeners[0].routes[1]', 23], ['listeners[0].routes[1].name', 24], ['listeners[0].routes[1].nested[1].x[1]', 25],
      ['listeners[0].routes[1].literal', 26], ['listeners[1]', 29], ['listeners[1].when', 30], ['listeners[1].routes[0]', 31],
      ['listeners[1].routes[0].backends[0][1]', 32], ['listeners[1].routes[0].backends[1]', 32], ['listeners[1].routes[0].backends[1][0]', 33],
    ];
    for (const [path, line] of expected) assert.equal(lineOf(index, path), line, path);
  });

  test('a path not written in the file falls back to the closest enclosing key or table, or to no line at all', () => {
    const index = indexLines(tricky, TOML.parse(tricky));
    assert.equal(lineOf(index, 'listeners[0].routes[1].backends'), 23, 'a missing key: its table');
    assert.equal(lineOf(index, 'listeners[0].bind[7]'), 9, 'an element past the end: the array');
    assert.equal(lineOf(index, 'listeners[0].routes[0].limits.max_connections.x'), 22);
    assert.equal(lineOf(index, 'timeouts.idle'), undefined, 'nothing of it is in the file');
    assert.equal(lineOf(index, '(syntax)'), undefined);
    assert.equal(lineOf(index, ''), undefined);
  });

  test('only paths that exist in the parsed document get a line, and text the scanner cannot follow gives none', () => {
    assert.deepEqual([...indexLines('a = 1\nb = 2\n', { a: 1 }).keys()], ['a']);
    assert.equal(indexLines('a = 1\n= 2\n', { a: 1 }).size, 0);
    assert.equal(indexLines('a = [1, 2', { a: [1, 2] }).size, 0);
    assert.equal(indexLines('a = "open\n', { a: 'open' }).size, 0);
  });

  test('formatted paths parse back into their segments, quoted keys included', () => {
    for (const segments of [['listeners', 0, 'routes', 12, 'backends', 3], ['a', 'b.c', 'd "e"', 0], ['x-y_z']]) {
      assert.deepEqual(parsePath(formatPath(segments)), segments);
    }
    for (const text of ['(syntax)', '', 'a..b', '[0]a', 'a[x]']) assert.equal(parsePath(text), undefined, text);
  });

  /** Each located key is on a line that writes that key; each located array element on a line with a value. */
  function assertLinesWriteTheirKeys(text: string, label: string): number {
    const lines = text.split('\n');
    const index = indexLines(text, TOML.parse(text));
    for (const [path, line] of index) {
      const segments = parsePath(path)!;
      const last = segments[segments.length - 1]!;
      const written = lines[line - 1] ?? '';
      if (typeof last === 'string') assert.ok(written.includes(last), `${label}:${line} should write ${path}: ${written}`);
      else assert.match(written, /[[\]"0-9]/, `${label}:${line} should hold ${path}`);
    }
    return index.size;
  }

  test('every line the locator gives in the shipped files is the line that writes that key or element', () => {
    const files = ['smartproxy.example.toml', ...readdirSync(join(root, 'config')).filter((f) => f.endsWith('.toml')).map((f) => `config/${f}`)];
    for (const file of files) assert.ok(assertLinesWriteTheirKeys(readFileSync(join(root, file), 'utf8'), file) > 10, file);
  });

  test('a semantic error names the line of its path: the value, the table of a missing key, the route of a rule', () => {
    const text = `[timeouts]
idle = "forever"
[[listeners]]
name = "tcp"
bind = [
  "127.0.0.1:8000",
  "127.0.0.1:99999",
]
  [[listeners.routes]]
  name = "echo"
  default = true
  [[listeners.routes]]
  name = "lost"
  backends = "127.0.0.1:9000"
`;
    const lines = Object.fromEntries(issuesOf(text).map((i) => [i.path, i.line]));
    assert.deepEqual(lines, {
      'timeouts.idle': 2,
      'listeners[0].bind[1]': 7,
      'listeners[0].routes[0].backends': 9,
      'listeners[0].routes[1]': 12,
    });
    const missing = issuesOf('[logging]\nlevel = "info"\n');
    assert.deepEqual(missing.map((i) => [i.path, i.line]), [['listeners', undefined]], 'a missing [[listeners]] is nowhere in the file');
  });

  test('formatIssue puts the line after the path, and leaves (syntax) and (file) issues as they are', () => {
    assert.equal(formatIssue({ path: 'listeners[0].routes[1].backends[0]', line: 23, message: 'x' }), 'listeners[0].routes[1].backends[0] (line 23): x');
    assert.equal(formatIssue({ path: '(syntax)', line: 3, message: 'line 3, column 1: y' }), '(syntax): line 3, column 1: y');
  });

  test('a syntax error names the line and the key or table whose statement holds it', () => {
    const cases: Array<[string, number, string | undefined]> = [
      ['[limits]\nmax_connections = 10\nfair_share_above = = 3\n', 3, 'limits.fair_share_above'],
      ['[logging]\nlevel = "info"\nlevel = "debug"\n', 3, 'logging.level'],
      ['[limits]\nmax_connections = 10\n[limits]\n', 3, 'limits'],
      ['[[listeners]]\nname = "a"\n[[listeners]]\nbind = [\n  "127.0.0.1:1",\n  127.0.0.1:2,\n]\n', 6, 'listeners[1].bind'],
      ['a = [1,\n2,\n\n', 4, 'a'],
      ['[limits]\nmax_connections = 10\n?? = 1\n', 3, undefined],
    ];
    for (const [text, line, key] of cases) {
      const [issue] = issuesOf(text);
      assert.equal(issue?.path, '(syntax)');
      assert.equal(issue?.line, line, text);
      assert.match(issue?.message ?? '', new RegExp(`^line ${line}, column \\d+: `));
      if (key === undefined) assert.doesNotMatch(issue?.message ?? '', /\(at /, text);
      else assert.ok(issue?.message.endsWith(` (at ${key})`), `${issue?.message} should name ${key}`);
      assert.equal(statementAt(text, line), key);
    }
  });

  test('in mutated files, a located key is on a line that writes it, and no line is past the end of the file', () => {
    const example = readFileSync(join(root, 'smartproxy.example.toml'), 'utf8');
    let seed = 0xc0ffee;
    const random = () => {
      seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    const pieces = ['"', '[', ']', '=', '#', '\n', '{', '}', ',', '0', '"x"', "'''", '"""', '.', '-1'];
    for (let i = 0; i < 300; i++) {
      let text = example;
      for (let k = 0; k < 1 + Math.floor(random() * 3); k++) {
        const at = Math.floor(random() * text.length);
        text = text.slice(0, at) + (pieces[Math.floor(random() * pieces.length)] ?? '') + text.slice(at + Math.floor(random() * 3));
      }
      let document: unknown;
      try {
        document = TOML.parse(text);
      } catch {
        document = undefined;
      }
      if (document !== undefined) assertLinesWriteTheirKeys(text, `mutation ${i}`);
      const result = parseConfigText(text, 'fuzz.toml');
      if (result.ok) continue;
      const lineCount = text.split('\n').length;
      for (const issue of result.issues) {
        if (issue.line === undefined) continue;
        assert.ok(issue.line >= 1 && issue.line <= lineCount, `${formatIssue(issue)}\n--- input ---\n${text}`);
      }
    }
  });
});

describe('check-config --dump', () => {
  const shipped = ['smartproxy.example.toml', ...readdirSync(join(root, 'config')).filter((f) => f.endsWith('.toml')).map((f) => `config/${f}`)];

  /** Dumps `config`, loads the dump as if it were the same file, and returns what it loaded to. */
  function roundTrip(config: Config): Config {
    const dumped = parseConfigText(dumpConfig(config), config.file);
    if (!dumped.ok) assert.fail(`the dump of ${config.file} is rejected:\n${dumped.issues.map(formatIssue).join('\n')}\n${dumpConfig(config)}`);
    return dumped.config;
  }

  test('the dump of every shipped file loads to the same resolved config', () => {
    for (const file of shipped) {
      const loaded = loadConfig(join(root, file));
      assert.ok(loaded.ok, file);
      assert.deepEqual(roundTrip(loaded.config), loaded.config, file);
    }
  });

  test('the dump writes every default out, and what listeners inherit in each listener and route', () => {
    const config = load(minimal({ top: '[timeouts]\nidle = "1m30s"\n[reload]\non_removal = "drain"' }));
    const document = TOML.parse(dumpConfig(config)) as Record<string, any>;
    assert.equal(document.listeners[0].workers, 1024);
    assert.equal(document.listeners[0].queue_timeout, '5s');
    assert.equal(document.listeners[0].timeouts.idle, '1m30s', 'the global idle, written in the listener');
    assert.equal(document.listeners[0].on_removal, 'drain');
    assert.equal(document.listeners[0].routes[0].on_removal, 'drain');
    assert.deepEqual(document.listeners[0].limits.connection_rate_per_ip, { count: 0, per: '10s' });
    assert.equal(document.logging.rejection_summary_interval, '10s');
    assert.equal(document.process.threads, 'auto');
    assert.deepEqual(roundTrip(config), config);
  });

  test('the dump sets every key the schema knows except those written out per listener and route', () => {
    const loaded = loadConfig(join(root, 'config', 'full-reference.toml'));
    assert.ok(loaded.ok);
    const document = TOML.parse(dumpConfig(loaded.config));
    const missing: string[] = [];
    const visit = (path: PropertyKey[], tables: unknown[]) => {
      for (const key of knownKeysAt(configFileSchema, path)) {
        // A list of inline tables (backends) is walked like an array of tables.
        const values = tables.flat().flatMap((t) => (t !== null && typeof t === 'object' && key in t ? [(t as Record<string, unknown>)[key]] : []));
        if (values.length === 0) missing.push([...path, key].join('.'));
        else if (knownKeysAt(configFileSchema, [...path, key]).length > 0) visit([...path, key], values);
        else if (knownKeysAt(configFileSchema, [...path, key, 0]).length > 0) visit([...path, key, 0], values.flat());
      }
    };
    visit([], [document]);
    assert.deepEqual(missing.sort(), [
      'limits.connection_rate_per_ip', 'limits.fair_share_above', 'limits.max_connections_per_ip', 'reload', 'timeouts',
    ]);
  });

  test('a unix admin socket, a public admin address, threads, PROXY protocol and odd strings survive the round trip', () => {
    const config = load(minimal({
      top: '[admin]\nlisten = "unix:/tmp/a \\"quoted\\" \\u007f\\t.sock"\n[process]\nthreads = 3',
      listener: '[listeners.proxy_protocol]\naccept = "v1"\ntrusted = ["10.0.0.0/8", "::1"]\nrequire = false',
      route: 'send_proxy_protocol = "v2"\npass_through_tlvs = [0xEA, 1]\nsni = ["API.example.com", "*.example.org"]',
    }));
    assert.deepEqual(roundTrip(config), config);
    const exposed = load(minimal({ top: '[admin]\nlisten = "0.0.0.0:9901"\nallow_public = true' }));
    assert.deepEqual(roundTrip(exposed), exposed);
    assert.match(dumpConfig(exposed), /^allow_public = true$/m);
  });

  test('formatDuration writes what parseDuration reads back, largest unit first', () => {
    const cases: Array<[number, string]> = [[0, '0s'], [250, '250ms'], [5_000, '5s'], [90_000, '1m30s'], [600_000, '10m'], [3_723_004, '1h2m3s4ms'], [2_073_600_000, '576h']];
    for (const [ms, text] of cases) {
      assert.equal(formatDuration(ms), text);
      assert.equal(parseDuration(text), ms);
    }
  });

  test('tomlString escapes what a TOML basic string cannot hold', () => {
    for (const text of ['plain', 'a "quote" and a \\ backslash', 'tab\there, newline\nthere', '\u0000\u001f\u007f', 'é ✓ 😀']) {
      assert.equal((TOML.parse(`x = ${tomlString(text)}`) as { x: string }).x, text);
    }
  });
});

// The subset of JSON Schema Draft 4 that `smartproxy schema` uses, checked the way Taplo's
// validator does. A keyword outside it is itself an error, so the schema cannot grow a keyword
// these tests would silently ignore.
type Schema = Record<string, any>;
const ANNOTATIONS = new Set(['$schema', 'title', 'description', 'default']);
const ASSERTIONS = new Set(['type', 'properties', 'additionalProperties', 'required', 'items', 'anyOf', 'enum', 'minimum', 'maximum', 'minItems', 'maxItems', 'minLength', 'maxLength', 'pattern']);

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function hasType(value: unknown, type: string): boolean {
  switch (type) {
    case 'object': return isPlainObject(value);
    case 'array': return Array.isArray(value);
    case 'integer': return Number.isInteger(value);
    case 'number': return typeof value === 'number';
    case 'string': return typeof value === 'string';
    case 'boolean': return typeof value === 'boolean';
    default: throw new Error(`unknown type ${type}`);
  }
}

function validate(schema: Schema, value: unknown, path = '$'): string[] {
  const errors: string[] = [];
  for (const keyword of Object.keys(schema)) {
    if (!ANNOTATIONS.has(keyword) && !ASSERTIONS.has(keyword)) errors.push(`${path}: the schema uses "${keyword}", which this validator does not know`);
  }
  if (schema.anyOf !== undefined && !(schema.anyOf as Schema[]).some((branch) => validate(branch, value, path).length === 0)) {
    errors.push(`${path}: matches none of ${schema.anyOf.length} alternatives`);
  }
  if (schema.type !== undefined && !hasType(value, schema.type)) return [...errors, `${path}: expected ${schema.type}, got ${JSON.stringify(value)}`];
  if (schema.enum !== undefined && !(schema.enum as unknown[]).includes(value)) errors.push(`${path}: ${JSON.stringify(value)} is not one of ${JSON.stringify(schema.enum)}`);
  if (typeof value === 'number') {
    if (schema.minimum !== undefined && value < schema.minimum) errors.push(`${path}: below ${schema.minimum}`);
    if (schema.maximum !== undefined && value > schema.maximum) errors.push(`${path}: above ${schema.maximum}`);
  }
  if (typeof value === 'string') {
    if (schema.pattern !== undefined && !new RegExp(schema.pattern, 'u').test(value)) errors.push(`${path}: ${JSON.stringify(value)} does not match ${schema.pattern}`);
    if (schema.minLength !== undefined && value.length < schema.minLength) errors.push(`${path}: shorter than ${schema.minLength}`);
    if (schema.maxLength !== undefined && value.length > schema.maxLength) errors.push(`${path}: longer than ${schema.maxLength}`);
  }
  if (Array.isArray(value)) {
    if (schema.minItems !== undefined && value.length < schema.minItems) errors.push(`${path}: fewer than ${schema.minItems} items`);
    if (schema.maxItems !== undefined && value.length > schema.maxItems) errors.push(`${path}: more than ${schema.maxItems} items`);
    if (schema.items !== undefined) value.forEach((item, i) => errors.push(...validate(schema.items, item, `${path}[${i}]`)));
  }
  if (isPlainObject(value)) {
    for (const key of (schema.required ?? []) as string[]) if (!(key in value)) errors.push(`${path}: missing ${key}`);
    const properties = (schema.properties ?? {}) as Record<string, Schema>;
    for (const [key, child] of Object.entries(value)) {
      if (properties[key] !== undefined) errors.push(...validate(properties[key], child, `${path}.${key}`));
      else if (schema.additionalProperties === false) errors.push(`${path}: unknown key ${key}`);
    }
  }
  return errors;
}

/** A TOML file as an editor's validator sees it: the JSON of its parsed document. */
function tomlAsJson(text: string): unknown {
  return JSON.parse(JSON.stringify(TOML.parse(text)));
}

describe('JSON Schema for editors', () => {
  const schema = configJsonSchema() as Schema;

  test('config/smartproxy.schema.json is what the schema command prints (regenerate: smartproxy schema > config/smartproxy.schema.json)', () => {
    assert.equal(readFileSync(join(root, 'config', 'smartproxy.schema.json'), 'utf8'), configJsonSchemaText());
  });

  test('the example file, every file in config/ and their dumps validate against it', () => {
    const files = ['smartproxy.example.toml', ...readdirSync(join(root, 'config')).filter((f) => f.endsWith('.toml')).map((f) => `config/${f}`)];
    for (const file of files) {
      const text = readFileSync(join(root, file), 'utf8');
      assert.deepEqual(validate(schema, tomlAsJson(text)), [], file);
      const loaded = loadConfig(join(root, file));
      assert.ok(loaded.ok);
      assert.deepEqual(validate(schema, tomlAsJson(dumpConfig(loaded.config))), [], `the dump of ${file}`);
    }
  });

  test('it describes the file as written: durations and addresses are strings, defaults as in the file', () => {
    const listener = schema.properties.listeners.items.properties;
    assert.equal(schema.properties.timeouts.properties.idle.default, '10m');
    assert.equal(schema.properties.limits.properties.connection_rate_per_ip.properties.per.default, '10s');
    assert.equal(listener.queue_timeout.type, 'string');
    assert.match(listener.queue_timeout.description, /duration.*greater than 0/);
    assert.deepEqual(listener.bind.anyOf.map((branch: Schema) => branch.type), ['string', 'array'], 'one address or a list');
    assert.deepEqual(schema.required, ['listeners']);
    const defaults: Array<[string, Schema]> = [];
    const collect = (node: unknown, path: string): void => {
      if (Array.isArray(node)) node.forEach((child, i) => collect(child, `${path}[${i}]`));
      else if (isPlainObject(node)) {
        if ('default' in node && 'type' in node) defaults.push([path, node]);
        for (const [key, child] of Object.entries(node)) if (key !== 'default') collect(child, `${path}.${key}`);
      }
    };
    collect(schema, '$');
    assert.ok(defaults.length > 30);
    for (const [path, node] of defaults) assert.deepEqual(validate(node, node.default), [], `the default at ${path} is valid input`);
  });

  test('the patterns an editor checks while typing accept every value check-config accepts', () => {
    const listener = schema.properties.listeners.items.properties;
    const route = listener.routes.items.properties;
    const accepted: Array<[Schema, string[]]> = [
      [schema.properties.timeouts.properties.idle, ['0s', '250ms', '5s', '10m', '2h', '1m30s', '1h2m3s4ms', '576h']],
      [listener.bind.anyOf[0], ['127.0.0.1:0', '[::1]:8443', '[::ffff:10.0.0.1]:80', '[2001:db8::1]:1', 'backend.internal:443', 'db_1:5432', 'localhost:65535']],
      [route.backends.anyOf[0], ['10.0.2.10:443', 'api-spare.internal:443', '[fd00::20]:5432']],
      [schema.properties.admin.properties.listen, ['127.0.0.1:9901', '[::1]:9901', 'unix:/run/smartproxy/admin.sock']],
      [schema.properties.firewall.properties.block.items, ['10.0.0.0/8', '::1', '2001:db8::/32', '192.0.2.7', '::ffff:10.0.0.0/104', '1:2:3:4:5:6:1.2.3.4', 'FE80::/10', '0.0.0.0/0']],
      [route.sni.anyOf[0], ['api.example.com', '*.example.org', 'API.Example.COM', 'a_b.example']],
    ];
    for (const [node, values] of accepted) {
      for (const value of values) assert.deepEqual(validate(node, value), [], `${value} against ${node.description}`);
    }
    for (const value of ['5', '', '1.5s', '5 s']) assert.notDeepEqual(validate(schema.properties.timeouts.properties.idle, value), [], value);
  });

  test('it flags what check-config refuses: unknown keys, wrong types, malformed durations and addresses, no listeners', () => {
    const valid = tomlAsJson(minimal()) as Record<string, any>;
    assert.deepEqual(validate(schema, valid), []);
    const broken: Array<[string, string, RegExp]> = [
      ['an unknown key', minimal({ top: '[limits]\nmax_conections = 1' }), /unknown key max_conections/],
      ['a malformed duration', minimal({ top: '[timeouts]\nidle = "10 minutes"' }), /\$\.timeouts\.idle: .* does not match/],
      ['a bare number as a duration', minimal({ listener: 'queue_timeout = 5' }), /queue_timeout: expected string/],
      ['a bind without a port', minimal().replace('bind = "127.0.0.1:8000"', 'bind = "127.0.0.1"'), /bind: matches none/],
      ['threads as a word', minimal({ top: '[process]\nthreads = "many"' }), /threads: matches none/],
      ['a level not in the list', minimal({ top: '[logging]\nlevel = "loud"' }), /level: "loud" is not one of/],
      ['a count out of range', minimal({ listener: 'workers = 0' }), /workers: below 1/],
      ['a route without backends', minimal().replace('backends = "127.0.0.1:9000"', ''), /routes\[0\]: missing backends/],
      ['no listeners', '[logging]\nlevel = "info"\n', /\$: missing listeners/],
    ];
    for (const [what, text, error] of broken) {
      const errors = validate(schema, tomlAsJson(text));
      assert.ok(errors.some((e) => error.test(e)), `${what}: ${errors.join('; ') || 'no error'}`);
      assert.equal(parseConfigText(text, 'test.toml').ok, false, `check-config refuses ${what} too`);
    }
  });
});
