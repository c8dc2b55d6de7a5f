// The `smartproxy` command as an operator runs it: a real process (`node --import tsx src/cli.ts`),
// its exit code, what it prints, and one relayed connection.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { build } from 'esbuild';
import { VERSION } from '../src/metrics.ts';
import { CLI, ROOT, listeningPorts, startCli, tempDir } from './support/cli.ts';
import { connect, readAll, sha256, startBackend } from './support/harness.ts';

interface Run {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs the CLI (or another entry file) to completion; killed by its PID and failed after `ms`. */
function run(t: TestContext, args: readonly string[], opts: { entry?: string[]; ms?: number } = {}): Promise<Run> {
  const ms = opts.ms ?? 20_000;
  const child = spawn(process.execPath, [...(opts.entry ?? ['--import', 'tsx', CLI]), ...args], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) process.kill(child.pid!, 'SIGKILL');
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      process.kill(child.pid!, 'SIGKILL');
      reject(new Error(`smartproxy ${args.join(' ')} still running after ${ms} ms; stderr: ${stderr}`));
    }, ms);
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

const PACKAGE_VERSION = (JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

test('check-config accepts smartproxy.example.toml and exits 0', { timeout: 30_000 }, async (t) => {
  const result = await run(t, ['check-config', '-c', 'smartproxy.example.toml']);
  assert.equal(result.stderr, '');
  assert.equal(result.code, 0);
  assert.match(result.stdout, /^smartproxy\.example\.toml: configuration ok \(2 listeners, 3 routes\)\n$/);
});

test('check-config accepts every file in config/ and exits 0', { timeout: 30_000 }, async (t) => {
  const files = readdirSync(path.join(ROOT, 'config')).filter((f) => f.endsWith('.toml'));
  assert.ok(files.length >= 3, `config/ holds ${files.join(', ')}`);
  const results = await Promise.all(files.map((f) => run(t, ['check-config', '-c', `config/${f}`])));
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
  const result = await run(t, ['check-config', '-c', file]);
  assert.equal(result.code, 1);
  assert.equal(result.stdout, '');
  const lines = result.stderr.trimEnd().split('\n');
  assert.equal(lines[0], `${file}: 5 problems`);
  const paths = ['limits.max_conections', 'timeouts.idle', 'listeners[0].bind[0]', 'listeners[0].workers', 'listeners[0].routes[0].backends[0]'];
  assert.deepEqual(
    lines.slice(1).map((l) => l.trim().split(':')[0]),
    paths,
  );
  assert.match(result.stderr, /"10 parsecs"/, 'the offending value is shown');
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
  const result = await run(t, ['serve', '-c', file, '--log-format', 'json']);
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
  const ports = listeningPorts(proxy.pid);
  assert.equal(ports.length, 1, `listening on ${ports.join(', ')}`);
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
  const fromSource = await run(t, ['--version']);
  assert.equal(fromSource.code, 0);
  assert.equal(fromSource.stdout, `${PACKAGE_VERSION}\n`);
  assert.equal(VERSION, PACKAGE_VERSION);

  // The shipped file: built as esbuild.mjs builds it (the version is defined at build time).
  const dir = tempDir(t);
  symlinkSync(path.join(ROOT, 'node_modules'), path.join(dir, 'node_modules'), 'dir'); // its dependencies stay external
  const outfile = path.join(dir, 'smartproxy.js');
  await build({
    entryPoints: [path.join(ROOT, 'src/cli.ts')],
    outfile,
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'esm',
    packages: 'external',
    define: { SMARTPROXY_VERSION: JSON.stringify(PACKAGE_VERSION) },
    logLevel: 'silent',
  });
  const bundled = await run(t, ['--version'], { entry: [outfile] });
  assert.equal(bundled.code, 0, bundled.stderr);
  assert.equal(bundled.stdout, `${PACKAGE_VERSION}\n`);
});
