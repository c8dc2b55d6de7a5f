// The `smartproxy` command as an operator runs it: a real process (`node --import tsx src/cli.ts`),
// its exit code, what it prints, and one relayed connection.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, test, type TestContext } from 'node:test';
import { loadConfig } from '../src/config/load.ts';
import { VERSION } from '../src/metrics.ts';
import { CLI, ROOT, TEST_THREADS, listeningPorts, runCli, startCli, tempDir, assertCleanExit } from './support/cli.ts';
import { connect, readAll, sha256, startBackend } from './support/harness.ts';

const PACKAGE_VERSION = (JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

/**
 * For processes whose coverage must not count: the bundle's source map leads c8 back into src/,
 * and with that second mapping of each file merged in, the lines the suite covers read 88.6 %
 * instead of 95.7 %. An older node is not the runtime being measured either.
 */
const WITHOUT_COVERAGE: NodeJS.ProcessEnv = { ...process.env, NODE_V8_COVERAGE: undefined };

let shipped: Promise<string> | undefined;
let shippedDir: string | undefined;
after(() => {
  if (shippedDir !== undefined) rmSync(shippedDir, { recursive: true, force: true });
});
/**
 * The shipped file, built by `esbuild.mjs` (as `npm run build` does) once for this file's tests,
 * into a temp directory with no node_modules/ beside it: the bundle must need none.
 */
function shippedBundle(t: TestContext): Promise<string> {
  shipped ??= (async () => {
    const dir = (shippedDir = mkdtempSync(path.join(tmpdir(), 'smartproxy-bundle-')));
    const outfile = path.join(dir, 'dist', 'smartproxy.js');
    const result = await runCli(t, ['--outfile', outfile], { entry: [path.join(ROOT, 'esbuild.mjs')], ms: 60_000 });
    assert.equal(result.code, 0, `esbuild.mjs: ${result.stderr}`);
    return outfile;
  })();
  return shipped;
}

/** The first node installed on the machine by path (not PATH) that is older than 24, if any. */
function olderSystemNode(): { path: string; version: string } | undefined {
  for (const candidate of ['/usr/bin/node', '/usr/local/bin/node', '/bin/node']) {
    if (!existsSync(candidate)) continue;
    const version = execFileSync(candidate, ['--version'], { encoding: 'utf8' }).trim();
    if (Number.parseInt(version.replace(/^v/, ''), 10) < 24) return { path: candidate, version };
  }
  return undefined;
}

test('the tests run on Node.js 24 or newer (npm scripts put the node the project carries first on PATH)', () => {
  const major = Number.parseInt(process.versions.node, 10);
  assert.ok(major >= 24, `running on ${process.version}; run the tests with npm test, or with node_modules/.bin/node`);
});

test('on a Node.js older than 24 the daemon exits 1 with one line saying how to run it', { timeout: 60_000 }, async (t) => {
  const old = olderSystemNode();
  if (old === undefined) return t.skip('no node older than 24 at /usr/bin, /usr/local/bin or /bin to run it with');
  const bundle = await shippedBundle(t);
  // The shipped file, and the sources (tsx still loads on an old node: the check must come first).
  for (const entry of [[bundle], ['--import', 'tsx', CLI]]) {
    const result = await runCli(t, ['check-config', '-c', 'smartproxy.example.toml'], { command: old.path, entry, env: WITHOUT_COVERAGE });
    assert.equal(result.code, 1, `${entry.join(' ')}: ${result.stderr}`);
    assert.equal(result.stdout, '');
    const lines = result.stderr.trimEnd().split('\n');
    assert.equal(lines.length, 1, `stderr: ${result.stderr}`);
    assert.match(lines[0]!, new RegExp(`^smartproxy: needs Node\\.js 24 or newer \\(this is ${old.version.replaceAll('.', '\\.')}\\); run it with the node the project carries .*node_modules/\\.bin/node .*, or npm start$`));
  }
});

test('the shipped file checks a config under a 96-descriptor limit (it opens no file of node_modules/)', { timeout: 60_000 }, async (t) => {
  const bundle = await shippedBundle(t);
  // `ulimit -n` sets the hard limit too, or node would raise its soft limit to the hard one.
  const result = await runCli(t, ['check-config', '-c', 'smartproxy.example.toml'], {
    command: '/bin/sh',
    entry: ['-c', 'ulimit -n 96 && exec "$0" "$@"', process.execPath, bundle],
    env: WITHOUT_COVERAGE,
  });
  assert.equal(result.stderr, '');
  assert.equal(result.code, 0);
  assert.match(result.stdout, /configuration ok \(2 listeners, 3 routes\)/);
});

test('check-config accepts smartproxy.example.toml and exits 0', { timeout: 30_000 }, async (t) => {
  const result = await runCli(t, ['check-config', '-c', 'smartproxy.example.toml']);
  assert.equal(result.stderr, '');
  assert.equal(result.code, 0);
  assert.match(result.stdout, /^smartproxy\.example\.toml: configuration ok \(2 listeners, 3 routes\)\n$/);
});

test('check-config accepts every file in config/ and exits 0', { timeout: 30_000 }, async (t) => {
  const files = readdirSync(path.join(ROOT, 'config')).filter((f) => f.endsWith('.toml'));
  assert.ok(files.length >= 3, `config/ holds ${files.join(', ')}`);
  const results = await Promise.all(files.map((f) => runCli(t, ['check-config', '-c', `config/${f}`])));
  results.forEach((result, i) => {
    assert.equal(result.stderr, '', files[i]);
    assert.equal(result.code, 0, files[i]);
    assert.match(result.stdout, /configuration ok/, files[i]);
  });
});

test('check-config on a file with several mistakes exits 1 and names the path of every one', { timeout: 30_000 }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'broken.toml');
  writeFileSync(
    file,
    `
[limits]
max_conections = 10

[timeouts]
idle = "10 parsecs"

[[listeners]]
name = "tls"
bind = ["127.0.0.1:99999"]
workers = -1

  [[listeners.routes]]
  name = "api"
  sni = ["api.example.com"]
  backends = ["nohost"]
`,
  );
  const result = await runCli(t, ['check-config', '-c', file]);
  assert.equal(result.code, 1);
  assert.equal(result.stdout, '');
  const lines = result.stderr.trimEnd().split('\n');
  assert.equal(lines[0], `${file}: 5 problems`);
  // Each problem names its TOML path and the line of the file that path is written on.
  const places = [
    'limits.max_conections (line 3)',
    'timeouts.idle (line 6)',
    'listeners[0].bind[0] (line 10)',
    'listeners[0].workers (line 11)',
    'listeners[0].routes[0].backends[0] (line 16)',
  ];
  assert.deepEqual(
    lines.slice(1).map((l) => l.trim().split(': ')[0]),
    places,
  );
  assert.match(result.stderr, /"10 parsecs"/, 'the offending value is shown');
});

test('check-config names the line and the key of a TOML syntax error', { timeout: 30_000 }, async (t) => {
  const file = path.join(tempDir(t), 'syntax.toml');
  writeFileSync(file, '[logging]\nlevel = "info"\nlevel = "debug"\n');
  const result = await runCli(t, ['check-config', '-c', file]);
  assert.equal(result.code, 1);
  assert.equal(result.stderr, `${file}: 1 problem\n  (syntax): line 3, column 16: can't redefine existing key (at logging.level)\n`);
});

test('check-config --dump prints the effective config, which check-config accepts and which loads to the same config', { timeout: 30_000 }, async (t) => {
  const dumped = await runCli(t, ['check-config', '-c', 'smartproxy.example.toml', '--dump']);
  assert.equal(dumped.stderr, '');
  assert.equal(dumped.code, 0);
  assert.match(dumped.stdout, /^# smartproxy check-config --dump of .*smartproxy\.example\.toml$/m);
  assert.match(dumped.stdout, /^ {2}\[listeners\.timeouts\]\n {2}connect = "5s"$/m, 'inherited timeouts written in the listener');
  const file = path.join(tempDir(t), 'effective.toml');
  writeFileSync(file, dumped.stdout);
  const checked = await runCli(t, ['check-config', '-c', file]);
  assert.equal(checked.stderr, '');
  assert.equal(checked.code, 0);
  assert.match(checked.stdout, /configuration ok \(2 listeners, 3 routes\)/);
  const original = loadConfig(path.join(ROOT, 'smartproxy.example.toml'));
  const reloaded = loadConfig(file);
  assert.ok(original.ok && reloaded.ok);
  assert.deepEqual({ ...reloaded.config, file: '' }, { ...original.config, file: '' });
});

test('check-config --dump of an invalid file prints nothing on stdout and the problems on stderr', { timeout: 30_000 }, async (t) => {
  const file = path.join(tempDir(t), 'broken.toml');
  writeFileSync(file, '[[listeners]]\nname = "a"\nbind = "127.0.0.1:1"\n  [[listeners.routes]]\n  name = "r"\n  default = true\n  backends = "nohost"\n');
  const result = await runCli(t, ['check-config', '-c', file, '--dump']);
  assert.equal(result.code, 1);
  assert.equal(result.stdout, '');
  assert.match(result.stderr, /^ {2}listeners\[0\]\.routes\[0\]\.backends \(line 7\): "nohost" is not host:port/m);
});

test('schema prints the JSON Schema committed as config/smartproxy.schema.json', { timeout: 30_000 }, async (t) => {
  const result = await runCli(t, ['schema']);
  assert.equal(result.stderr, '');
  assert.equal(result.code, 0);
  assert.equal(result.stdout, readFileSync(path.join(ROOT, 'config', 'smartproxy.schema.json'), 'utf8'));
  assert.equal((JSON.parse(result.stdout) as { $schema: string }).$schema, 'http://json-schema.org/draft-04/schema#');
});

test('--help of every command shows its defaults and an example', { timeout: 30_000 }, async (t) => {
  const commands = ['serve', 'check-config', 'schema', 'status'];
  const results = await Promise.all([runCli(t, ['--help']), ...commands.map((command) => runCli(t, [command, '--help']))]);
  const [top, ...perCommand] = results;
  assert.equal(top!.code, 0);
  for (const command of commands) assert.match(top!.stdout, new RegExp(`\\$ smartproxy ${command} `), `the top-level help shows ${command}`);
  perCommand.forEach((result, i) => {
    const command = commands[i]!;
    assert.equal(result.code, 0, command);
    assert.match(result.stdout, /\nDefaults:\n/, `${command} --help shows its defaults`);
    assert.match(result.stdout, new RegExp(`\\nExamples:\\n {2}\\$ smartproxy ${command}\\b`), `${command} --help shows an example`);
  });
  assert.match(perCommand[0]!.stdout, /--log-format +pretty when stdout is a terminal, else json/);
  assert.match(perCommand[3]!.stdout, /\/etc\/smartproxy\/proxy\.toml/);
});

test('a reload rejected for an invalid file logs each problem with its path and its line as fields', { timeout: 30_000 }, async (t) => {
  const toml = `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:9"]
`;
  const proxy = await startCli(t, toml, { ready: ['tcp'] });
  proxy.writeConfig(toml.replace('default = true', 'default = true\n  workers = 4'));
  const from = proxy.lines.length;
  proxy.child.kill('SIGHUP');
  const rejected = await proxy.waitForLine((l) => typeof l.msg === 'string' && l.msg.startsWith('reload rejected: '), { from, what: 'the rejection' });
  assert.equal(rejected.path, 'listeners[0].routes[0].workers');
  assert.equal(rejected.line, 8);
  assert.match(String(rejected.msg), /^reload rejected: listeners\[0\]\.routes\[0\]\.workers \(line 8\): unknown key/);
  process.kill(proxy.pid, 'SIGTERM');
  await assertCleanExit(proxy);
});

test('serve on an address already in use exits non-zero with one line naming the listener and the address', { timeout: 30_000 }, async (t) => {
  const squatter = net.createServer();
  await new Promise<void>((resolve) => squatter.listen(0, '127.0.0.1', resolve));
  t.after(() => squatter.close());
  const port = (squatter.address() as net.AddressInfo).port;
  const dir = tempDir(t);
  const file = path.join(dir, 'proxy.toml');
  writeFileSync(
    file,
    `
[[listeners]]
name = "busy"
bind = ["127.0.0.1:${port}"]
  [[listeners.routes]]
  name = "main"
  default = true
  backends = ["127.0.0.1:9"]
`,
  );
  const result = await runCli(t, ['serve', '-c', file, '--log-format', 'json']);
  assert.notEqual(result.code, 0);
  assert.notEqual(result.code, null, `ended by ${result.signal}`);
  const lines = result.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `stderr: ${result.stderr}`);
  assert.match(lines[0]!, new RegExp(`listener "busy".*127\\.0\\.0\\.1:${port}.*EADDRINUSE`));
});

test('serve starts, relays a connection, and exits 0 on SIGTERM', { timeout: 30_000 }, async (t) => {
  const backend = await startBackend(t);
  const proxy = await startCli(
    t,
    `
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:0"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backend.port}"]
`,
    { ready: ['tcp'] },
  );
  // One listening socket per event-loop thread (SO_REUSEPORT), all on the one port.
  const ports = listeningPorts(proxy.pid);
  assert.equal(ports.length, TEST_THREADS, `listening on ${ports.join(', ')}`);
  assert.equal(new Set(ports).size, 1, `listening on ${ports.join(', ')}`);
  const payload = randomBytes(256 * 1024);
  const client = await connect(ports[0]!);
  const received = readAll(client);
  client.end(payload);
  const { data, error } = await received;
  assert.equal(error, null);
  assert.equal(sha256(data), sha256(payload));
  assert.equal(backend.accepted, 1);

  process.kill(proxy.pid, 'SIGTERM');
  const exit = await proxy.exited;
  assert.deepEqual(exit, { code: 0, signal: null }, `stderr: ${proxy.stderr()}`);
  assert.ok(
    proxy.lines.some((l) => l.msg === 'stopped'),
    'logs that it stopped',
  );
  assert.equal(proxy.stderr(), '');
});

test('--version prints the version', { timeout: 30_000 }, async (t) => {
  // From source it is read from package.json; the bundle has it defined at build time.
  const fromSource = await runCli(t, ['--version']);
  assert.equal(fromSource.code, 0);
  assert.equal(fromSource.stdout, `${PACKAGE_VERSION}\n`);
  assert.equal(VERSION, PACKAGE_VERSION);

  // The shipped file (the version is defined at build time).
  const bundled = await runCli(t, ['--version'], { entry: [await shippedBundle(t)], env: WITHOUT_COVERAGE });
  assert.equal(bundled.code, 0, bundled.stderr);
  assert.equal(bundled.stdout, `${PACKAGE_VERSION}\n`);
});
