// Running smartproxy as an operator (and systemd) does, through the real CLI: readiness
// notification (Type=notify) without systemd, start-up failures that leave nothing bound, the
// EACCES hint for privileged ports, `status --watch` when the daemon goes away, and the unit file.
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import { startAdminServer } from '../src/admin/server.ts';
import type { DaemonStats } from '../src/admin/stats.ts';
import { renderStatus } from '../src/admin/status.ts';
import { silentLogger } from '../src/logging/logger.ts';
import { systemdNotifier } from '../src/notify.ts';
import { AdminView, bindFailureLine, privilegedPortHint } from '../src/serve.ts';
import { BindError } from '../src/listener/listener.ts';
import { CLI, ROOT, adminGet, startCli, tempDir, assertCleanExit } from './support/cli.ts';
import { connectOutcome } from './support/clients.ts';
import { closedPort, memoryLogger, startBackend } from './support/harness.ts';

const run = promisify(execFile);

/** Lines a child process writes, as they arrive, with a wait for the first that matches. */
class LineLog {
  readonly lines: string[] = [];
  private partial = '';
  private readonly waiters = new Set<() => void>();

  constructor(
    stream: NodeJS.ReadableStream,
    private readonly child: ChildProcess,
  ) {
    stream.setEncoding('utf8');
    stream.on('data', (chunk: string) => {
      const parts = (this.partial + chunk).split('\n');
      this.partial = parts.pop()!;
      this.lines.push(...parts);
      for (const wake of [...this.waiters]) wake();
    });
    child.once('exit', () => {
      for (const wake of [...this.waiters]) wake();
    });
  }

  /** The index of the first line at `from` or later that satisfies `predicate`. */
  waitFor(predicate: (line: string) => boolean, what: string, opts: { from?: number; ms?: number } = {}): Promise<number> {
    const ms = opts.ms ?? 15_000;
    return new Promise((resolve, reject) => {
      let index = opts.from ?? 0;
      const finish = (): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      const check = (): void => {
        for (; index < this.lines.length; index++) {
          if (predicate(this.lines[index]!)) {
            finish();
            return resolve(index);
          }
        }
        if (this.child.exitCode !== null || this.child.signalCode !== null) {
          finish();
          reject(new Error(`the process exited (${this.child.exitCode ?? this.child.signalCode}) before ${what}; lines: ${this.lines.join(' | ')}`));
        }
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`timed out after ${ms} ms waiting for ${what}; lines: ${this.lines.join(' | ')}`));
      }, ms);
      this.waiters.add(check);
      check();
    });
  }
}

/** Spawns a child, kills it by its PID after the test if it still runs. */
function child(t: TestContext, command: string, args: string[], env: NodeJS.ProcessEnv = process.env): { proc: ChildProcess; out: LineLog; stderr: () => string; exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }> } {
  const proc = spawn(command, args, { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  t.after(async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      process.kill(proc.pid!, 'SIGKILL');
      await exited;
    }
  });
  let stderr = '';
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  return { proc, out: new LineLog(proc.stdout!, proc), stderr: () => stderr, exited };
}

/**
 * systemd's side of sd_notify(3), for tests: a unix datagram socket at `<dir>/notify.sock`
 * (python3: Node cannot bind one) printing each message it receives as one JSON line, and closing
 * the descriptors systemd-notify's barrier passes (as the service manager does).
 */
async function notifySocket(t: TestContext, dir: string): Promise<{ path: string; messages: LineLog; fields: (index: number) => string[] }> {
  const socketPath = path.join(dir, 'notify.sock');
  const script = `
import array, json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print(json.dumps("listening"), flush=True)
while True:
    data, anc, flags, addr = s.recvmsg(4096, socket.CMSG_SPACE(64))
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
            for fd in fds:
                os.close(fd)
    print(json.dumps(data.decode()), flush=True)
`;
  const receiver = child(t, 'python3', ['-c', script, socketPath]);
  await receiver.out.waitFor((l) => JSON.parse(l) === 'listening', 'the notify socket');
  return {
    path: socketPath,
    messages: receiver.out,
    fields: (index) => (JSON.parse(receiver.out.lines[index]!) as string).split('\n'),
  };
}

/** Every message received so far has been read: a sentinel sent through systemd-notify arrived. */
async function drain(notify: { path: string; messages: LineLog }): Promise<void> {
  await run('systemd-notify', ['SMARTPROXY_TEST_SENTINEL=1'], { env: { ...process.env, NOTIFY_SOCKET: notify.path } });
  await notify.messages.waitFor((l) => (JSON.parse(l) as string).includes('SMARTPROXY_TEST_SENTINEL=1'), 'the sentinel');
}

const has = (field: string) => (line: string): boolean => (JSON.parse(line) as string).split('\n').includes(field);

function serveArgs(configFile: string): string[] {
  return ['--import', 'tsx', CLI, 'serve', '-c', configFile, '--log-format', 'json'];
}

function listenerToml(port: number, backendPort: number, extra = ''): string {
  return `${extra}
[[listeners]]
name = "tcp"
bind = ["127.0.0.1:${port}"]
  [[listeners.routes]]
  name = "echo"
  default = true
  backends = ["127.0.0.1:${backendPort}"]
`;
}

test('with NOTIFY_SOCKET set, READY=1 comes once every listener is bound; RELOADING=1 then READY=1 around each SIGHUP, valid file or not; STOPPING=1 on SIGTERM', { timeout: 60_000 }, async (t) => {
  const dir = tempDir(t);
  const notify = await notifySocket(t, dir);
  const backend = await startBackend(t);
  const port = await closedPort();
  const configFile = path.join(dir, 'proxy.toml');
  const toml = listenerToml(port, backend.port, `[admin]\nlisten = "unix:${dir}/admin.sock"\n[process]\nthreads = 2\n`);
  writeFileSync(configFile, toml);
  const daemon = child(t, process.execPath, serveArgs(configFile), { ...process.env, NOTIFY_SOCKET: notify.path });

  const ready = await notify.messages.waitFor(has('READY=1'), 'READY=1');
  // Checked as soon as READY=1 is read: both threads bound, the admin API answers for the daemon.
  assert.equal(await connectOutcome(port), 'connected');
  assert.deepEqual(await adminGet({ socketPath: `${dir}/admin.sock` }, '/healthz'), { status: 200, body: 'ok\n' });
  assert.ok(notify.fields(ready).includes('STATUS=serving 1 listener'), notify.fields(ready).join(' '));
  assert.equal(notify.messages.lines.slice(0, ready).filter(has('READY=1')).length, 0);

  // A valid reload.
  let from = notify.messages.lines.length;
  process.kill(daemon.proc.pid!, 'SIGHUP');
  const reloading = await notify.messages.waitFor(has('RELOADING=1'), 'RELOADING=1', { from });
  assert.ok(notify.fields(reloading).some((f) => /^MONOTONIC_USEC=\d+$/.test(f)), notify.fields(reloading).join(' '));
  const reloaded = await notify.messages.waitFor(has('READY=1'), 'READY=1 after the reload', { from: reloading + 1 });
  assert.ok(notify.fields(reloaded).includes('STATUS=serving 1 listener'));
  await daemon.out.waitFor((l) => l.includes('"configuration reloaded"'), 'the reload log line');

  // An invalid file: the reload fails, systemd still hears READY=1 (with the failure as STATUS).
  writeFileSync(configFile, `${toml}\n[limits]\nmax_conections = 1\n`);
  from = notify.messages.lines.length;
  process.kill(daemon.proc.pid!, 'SIGHUP');
  const failing = await notify.messages.waitFor(has('RELOADING=1'), 'RELOADING=1', { from });
  const after = await notify.messages.waitFor(has('READY=1'), 'READY=1 after the failed reload', { from: failing + 1 });
  assert.ok(notify.fields(after).some((f) => /^STATUS=reload failed at .*; the previous configuration stays in force$/.test(f)), notify.fields(after).join(' '));
  assert.equal(await connectOutcome(port), 'connected');

  from = notify.messages.lines.length;
  process.kill(daemon.proc.pid!, 'SIGTERM');
  const stopping = await notify.messages.waitFor(has('STOPPING=1'), 'STOPPING=1', { from });
  assert.ok(notify.fields(stopping).includes('STATUS=stopping on SIGTERM: draining'));
  assert.deepEqual(await daemon.exited, { code: 0, signal: null });
  await drain(notify);
  assert.equal(notify.messages.lines.slice(stopping + 1).filter((l) => has('READY=1')(l) || has('RELOADING=1')(l)).length, 0, 'nothing after STOPPING=1');
  assert.equal(daemon.stderr(), '');
});

test('a systemd-notify that is missing or fails is a warning naming the message; without NOTIFY_SOCKET nothing is sent', async () => {
  const { log, lines } = memoryLogger('warn');
  const missing = systemdNotifier(log, { env: { NOTIFY_SOCKET: '/nonexistent.sock' }, command: '/nonexistent/systemd-notify' });
  missing.ready('serving 1 listener');
  const failing = systemdNotifier(log, { env: { NOTIFY_SOCKET: '/nonexistent.sock' }, command: 'false' });
  failing.stopping('stopping');
  failing.ready('dropped: after STOPPING=1');
  await Promise.all([missing.settled(), failing.settled()]);
  assert.deepEqual(
    lines.map((l) => l.msg),
    ['cannot notify systemd (READY=1): spawn /nonexistent/systemd-notify ENOENT', 'cannot notify systemd (STOPPING=1): false exited 1'],
  );
  const off = systemdNotifier(log, { env: {}, command: '/nonexistent/systemd-notify' });
  off.ready('x');
  off.reloading();
  off.stopping('y');
  await off.settled();
  assert.equal(lines.length, 2);
});

test('with NOTIFY_SOCKET set, a bind that fails exits 1 and systemd never hears READY=1', { timeout: 30_000 }, async (t) => {
  const dir = tempDir(t);
  const notify = await notifySocket(t, dir);
  const squatter = net.createServer();
  await new Promise<void>((resolve) => squatter.listen(0, '127.0.0.1', resolve));
  t.after(() => squatter.close());
  const port = (squatter.address() as net.AddressInfo).port;
  const configFile = path.join(dir, 'proxy.toml');
  writeFileSync(configFile, listenerToml(port, 9, `[admin]\nlisten = "unix:${dir}/admin.sock"\n[process]\nthreads = 2\n`));
  const daemon = child(t, process.execPath, serveArgs(configFile), { ...process.env, NOTIFY_SOCKET: notify.path });
  assert.deepEqual(await daemon.exited, { code: 1, signal: null });
  assert.match(daemon.stderr(), new RegExp(`^smartproxy: listener "tcp": cannot bind 127\\.0\\.0\\.1:${port}: EADDRINUSE\\n$`));
  await drain(notify);
  assert.deepEqual(notify.messages.lines.slice(1).filter(has('READY=1')), []);
});

test('a taken admin address fails start-up with one line and exit 1 before any listener is bound', { timeout: 30_000 }, async (t) => {
  const squatter = net.createServer();
  await new Promise<void>((resolve) => squatter.listen(0, '127.0.0.1', resolve));
  t.after(() => squatter.close());
  const adminPort = (squatter.address() as net.AddressInfo).port;
  const port = await closedPort();
  const dir = tempDir(t);
  const configFile = path.join(dir, 'proxy.toml');
  writeFileSync(configFile, listenerToml(port, 9, `[admin]\nlisten = "127.0.0.1:${adminPort}"\n[process]\nthreads = 2\n`));
  const daemon = child(t, process.execPath, serveArgs(configFile));
  // Were the listener bound at any moment, one of these connects would be accepted.
  let probes = 0;
  let accepted = 0;
  const probing = (async () => {
    while (daemon.proc.exitCode === null && daemon.proc.signalCode === null) {
      probes++;
      if ((await connectOutcome(port)) === 'connected') accepted++;
    }
  })();
  assert.deepEqual(await daemon.exited, { code: 1, signal: null });
  await probing;
  assert.equal(daemon.stderr(), `smartproxy: admin API cannot listen on 127.0.0.1:${adminPort}: EADDRINUSE\n`);
  const log = daemon.out.lines.filter((l) => l !== '').map((l) => JSON.parse(l) as Record<string, unknown>);
  assert.deepEqual(log.filter((l) => l.msg === 'listener started' || l.msg === 'event-loop threads started'), [], 'no listener was started');
  assert.ok(log.some((l) => l.level === 'error' && l.code === 'EADDRINUSE'));
  assert.ok(probes > 0);
  assert.equal(accepted, 0, 'the listener port was never bound');
});

test('before the event loops are up, the admin API answers /healthz 503, /stats with no listeners (status: STARTING), and empty /metrics and /connections', async (t) => {
  // What the admin API serves between listening (first) and the listeners being bound.
  const dir = tempDir(t);
  const view = new AdminView(silentLogger(), 10);
  const admin = await startAdminServer({ kind: 'unix', path: path.join(dir, 'admin.sock') }, view);
  t.after(() => admin.close());
  const target = { socketPath: path.join(dir, 'admin.sock') };
  assert.deepEqual(await adminGet(target, '/healthz'), { status: 503, body: 'starting\n' });
  const stats = JSON.parse((await adminGet(target, '/stats')).body) as DaemonStats & { starting?: boolean };
  assert.deepEqual({ listeners: stats.listeners, accepting: stats.accepting, starting: stats.starting, active: stats.active }, { listeners: [], accepting: false, starting: true, active: 0 });
  assert.match(renderStatus(stats).split('\n')[0]!, /  STARTING  connections 0\/10$/);
  assert.deepEqual(await adminGet(target, '/metrics'), { status: 200, body: '' });
  assert.deepEqual(JSON.parse((await adminGet(target, '/connections')).body), { total: 0, connections: [] });
  // A daemon that stopped accepting (no `starting`) is still DRAINING.
  assert.match(renderStatus({ ...stats, starting: undefined } as DaemonStats).split('\n')[0]!, /  DRAINING  connections 0\/10$/);
});

test('EACCES on a port below ip_unprivileged_port_start says to grant CAP_NET_BIND_SERVICE (as the unit does) or use a higher port', () => {
  const hint = privilegedPortHint('EACCES', '0.0.0.0:443', 1024);
  assert.equal(hint, ' (ports below 1024 need root or the CAP_NET_BIND_SERVICE capability, which systemd/smartproxy.service grants; or use a port >= 1024)');
  assert.equal(privilegedPortHint('EACCES', '[::]:80', 1024), hint);
  assert.equal(privilegedPortHint('EACCES', '0.0.0.0:8443', 1024), '', 'not a privileged port: EACCES has another cause');
  assert.equal(privilegedPortHint('EACCES', '0.0.0.0:443', 0), '', 'every port is unprivileged on this host');
  assert.equal(privilegedPortHint('EADDRINUSE', '0.0.0.0:443', 1024), '');
  assert.equal(privilegedPortHint('EACCES', 'unix:/run/smartproxy/admin.sock', 1024), '');
  assert.equal(privilegedPortHint('EACCES', '127.0.0.1:0', 1024), '');
  const err = new BindError('web', '0.0.0.0:80', Object.assign(new Error('bind'), { code: 'EADDRINUSE' }));
  assert.equal(bindFailureLine(err), 'listener "web": cannot bind 0.0.0.0:80: EADDRINUSE');
});

test('serve as an unprivileged user on 127.0.0.1:1 exits 1 with the EACCES line and what to do', { timeout: 30_000 }, async (t) => {
  const start = Number.parseInt(readFileSync('/proc/sys/net/ipv4/ip_unprivileged_port_start', 'utf8'), 10);
  if (start <= 1) return t.skip(`net.ipv4.ip_unprivileged_port_start is ${start}: every port is unprivileged here`);
  const dir = tempDir(t);
  const configFile = path.join(dir, 'proxy.toml');
  writeFileSync(configFile, listenerToml(1, 9, '[process]\nthreads = 1\n'));
  chmodSync(dir, 0o755);
  chmodSync(configFile, 0o644);
  // Root (as here) drops to nobody, with no capabilities left (setpriv, util-linux); any other user is unprivileged already.
  // Without coverage: nobody cannot write c8's directory.
  const env = { ...process.env, NODE_V8_COVERAGE: undefined };
  const [command, args] = process.getuid?.() === 0 ? ['setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', process.execPath, ...serveArgs(configFile)]] : [process.execPath, serveArgs(configFile)];
  const daemon = child(t, command, args, env);
  assert.deepEqual(await daemon.exited, { code: 1, signal: null }, daemon.stderr());
  assert.equal(
    daemon.stderr(),
    `smartproxy: listener "tcp": cannot bind 127.0.0.1:1: EACCES (ports below ${start} need root or the CAP_NET_BIND_SERVICE capability, which systemd/smartproxy.service grants; or use a port >= ${start})\n`,
  );
});

test('status --watch keeps the last table on screen with an error line under it when the daemon goes away', { timeout: 60_000 }, async (t) => {
  const backend = await startBackend(t);
  const port = await closedPort();
  const proxy = await startCli(t, listenerToml(port, backend.port, '[admin]\nlisten = "unix:{{dir}}/admin.sock"\n'), { ready: ['tcp'], admin: true });
  const watch = child(t, process.execPath, ['--import', 'tsx', CLI, 'status', '--watch', '--admin', `unix:${proxy.dir}/admin.sock`]);
  let screen = '';
  watch.proc.stdout!.on('data', (chunk: string) => (screen += chunk));
  const lastFrame = (): string => screen.slice(screen.lastIndexOf('\x1b[2J\x1b[H') + '\x1b[2J\x1b[H'.length);
  await watch.out.waitFor((l) => l.startsWith('tcp routes: echo 0'), 'a table');

  process.kill(proxy.pid, 'SIGTERM');
  await assertCleanExit(proxy);
  await watch.out.waitFor((l) => l.includes('cannot reach the admin API'), 'the error line');
  const frame = lastFrame().trimEnd().split('\n');
  assert.match(frame[0]!, /^smartproxy \S+ {2}pid \d+ {2}up \d+s {2}(accepting|DRAINING) {2}connections 0\/10000$/, frame.join('\n'));
  assert.ok(frame.some((l) => /^LISTENER +BIND/.test(l)), frame.join('\n'));
  assert.ok(frame.some((l) => l.startsWith(`tcp `) && l.includes(`127.0.0.1:${port}`)), frame.join('\n'));
  assert.match(frame.at(-1)!, new RegExp(`^smartproxy status: cannot reach the admin API at unix:${proxy.dir.replaceAll('/', '\\/')}/admin\\.sock: .*(ENOENT|ECONNREFUSED).*; table from \\d\\d:\\d\\d:\\d\\d, \\d+s ago; retrying every second$`));
  assert.equal(watch.proc.exitCode, null, 'status --watch goes on trying');
  process.kill(watch.proc.pid!, 'SIGTERM');
  assert.deepEqual(await watch.exited, { code: null, signal: 'SIGTERM' });
  assert.equal(watch.stderr(), '');
});

test('the systemd unit is Type=notify, validates before a reload, runs the node the project carries, and systemd-analyze verify accepts it', { timeout: 30_000 }, async (t) => {
  const unit = readFileSync(path.join(ROOT, 'systemd/smartproxy.service'), 'utf8');
  const keys = unit.split('\n').filter((l) => /^[A-Za-z]+=/.test(l)).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)] as const);
  const all = (key: string): string[] => keys.filter(([k]) => k === key).map(([, v]) => v);
  assert.deepEqual(all('Type'), ['notify']);
  assert.deepEqual(all('NotifyAccess'), ['all']);
  const node = '/opt/smartproxy/node_modules/.bin/node /opt/smartproxy/dist/smartproxy.js';
  assert.deepEqual(all('ExecStart'), [`${node} serve -c /etc/smartproxy/proxy.toml`]);
  assert.deepEqual(all('ExecReload'), [`${node} check-config -c /etc/smartproxy/proxy.toml`, '/bin/kill -HUP $MAINPID']);
  assert.deepEqual(all('Documentation'), ['file:///opt/smartproxy/README.md']);
  // README's install steps put README.md where Documentation= points.
  const readme = readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  assert.ok(/sudo cp -r package\.json package-lock\.json README\.md dist \/opt\/smartproxy\//.test(readme), 'README\'s install steps copy README.md to /opt/smartproxy');

  // verify checks that every command is executable: point the unit at this node for it.
  const dir = tempDir(t);
  const copy = path.join(dir, 'smartproxy.service');
  writeFileSync(copy, unit.replaceAll('/opt/smartproxy/node_modules/.bin/node', process.execPath));
  const { stdout, stderr } = await run('systemd-analyze', ['verify', copy]);
  assert.equal(`${stdout}${stderr}`, '', 'systemd-analyze verify has nothing to say');
});
