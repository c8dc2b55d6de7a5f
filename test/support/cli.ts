// The real `smartproxy` process for tests of signals and the CLI: a config file in a fresh temp
// directory, `node --import tsx src/cli.ts serve -c file --log-format json`, its JSON log lines
// collected as they arrive. The process is killed (by its PID) and the directory removed after
// the test.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const CLI = path.join(ROOT, 'src/cli.ts');

export interface CliProxy {
  readonly child: ChildProcess;
  readonly pid: number;
  /** The temp directory holding the config file (put unix sockets here too). */
  readonly dir: string;
  readonly configFile: string;
  /** Every JSON log line so far, in order. */
  readonly lines: Array<Record<string, unknown>>;
  /** Whatever the process wrote to stderr. */
  stderr(): string;
  /** Replaces the config file atomically (a reload never reads half a file). */
  writeConfig(toml: string): void;
  /** Resolves with the first line (at index `from` or later) that satisfies `predicate`. */
  waitForLine(predicate: (line: Record<string, unknown>) => boolean, opts?: { from?: number; what?: string; ms?: number }): Promise<Record<string, unknown>>;
  /** Resolves with the exit code (or the signal that ended it) once its output is read to the end. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/**
 * The event-loop threads a test daemon runs: `[process] threads` as the file says, else
 * SMARTPROXY_TEST_THREADS (default 1; `npm test` also runs the threads suite with 4).
 */
export const TEST_THREADS = Number(process.env.SMARTPROXY_TEST_THREADS ?? '1');

function withThreads(toml: string): string {
  return /^\[process\]/m.test(toml) ? toml : `${toml}\n[process]\nthreads = ${TEST_THREADS}\n`;
}

/** A fresh temp directory removed after the test. */
export function tempDir(t: TestContext): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'smartproxy-test-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * Starts `smartproxy serve` on `toml` (written to `<dir>/proxy.toml`; `{{dir}}` in the text is
 * replaced by the temp directory) and resolves once every listener in `ready` has logged
 * "listener started" (and the admin API, when `admin` is true, is listening).
 */
export async function startCli(
  t: TestContext,
  toml: string,
  opts: { ready: string[]; admin?: boolean; dir?: string; /** Open-file limit for the process (`ulimit -n`: hard too, or node raises its soft limit to the hard one). */ nofile?: number },
): Promise<CliProxy> {
  const dir = opts.dir ?? tempDir(t);
  const configFile = path.join(dir, 'proxy.toml');
  const write = (text: string): void => {
    const tmp = `${configFile}.tmp`;
    writeFileSync(tmp, withThreads(text).replaceAll('{{dir}}', dir));
    renameSync(tmp, configFile);
  };
  write(toml);
  const args = ['--import', 'tsx', CLI, 'serve', '-c', configFile, '--log-format', 'json'];
  // With a limit, a shell lowers it and then becomes node (exec): the PID stays the daemon's.
  const [command, argv] = opts.nofile === undefined ? [process.execPath, args] : ['/bin/sh', ['-c', `ulimit -n ${opts.nofile} && exec "$0" "$@"`, process.execPath, ...args]];
  const child = spawn(command, argv, {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: Array<Record<string, unknown>> = [];
  const waiters = new Set<() => void>();
  let stderr = '';
  let partial = '';
  /** Its output is read to the end: a line not seen by now never comes. */
  let closed = false;
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (chunk: string) => {
    partial += chunk;
    const parts = partial.split('\n');
    partial = parts.pop()!;
    for (const part of parts) if (part.length > 0) lines.push(JSON.parse(part) as Record<string, unknown>);
    for (const wake of [...waiters]) wake();
  });
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (chunk: string) => (stderr += chunk));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    // 'close', not 'exit': the last lines (a fatal one above all) may still be in the pipe at exit.
    child.once('close', (code, signal) => {
      closed = true;
      for (const wake of [...waiters]) wake();
      resolve({ code, signal });
    });
  });
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      process.kill(child.pid!, 'SIGKILL');
      await exited;
    }
  });

  const waitForLine: CliProxy['waitForLine'] = (predicate, o = {}) => {
    const ms = o.ms ?? 10_000;
    return new Promise((resolve, reject) => {
      let index = o.from ?? 0;
      const check = (): void => {
        for (; index < lines.length; index++) {
          if (predicate(lines[index]!)) {
            finish();
            return resolve(lines[index]!);
          }
        }
        if (closed) {
          finish();
          reject(new Error(`smartproxy exited (${child.exitCode ?? child.signalCode}) before logging ${o.what ?? 'the line'}; stderr: ${stderr}`));
        }
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`timed out after ${ms} ms waiting for ${o.what ?? 'a log line'}; stderr: ${stderr}`));
      }, ms);
      const finish = (): void => {
        clearTimeout(timer);
        waiters.delete(check);
      };
      waiters.add(check);
      check();
    });
  };

  const proxy: CliProxy = {
    child,
    pid: child.pid!,
    dir,
    configFile,
    lines,
    stderr: () => stderr,
    writeConfig: write,
    waitForLine,
    exited,
  };
  for (const name of opts.ready) await waitForLine((l) => l.msg === 'listener started' && l.listener === name, { what: `listener ${name} started` });
  // "listener started" comes from the first thread; the others bind after it: wait for them all.
  if (opts.ready.length > 0) await waitForLine((l) => l.msg === 'event-loop threads started', { what: 'every event-loop thread' });
  if (opts.admin) await waitForLine((l) => l.msg === 'admin API listening', { what: 'the admin API' });
  return proxy;
}

/**
 * Waits for the process to end and asserts it exited 0; otherwise the failure shows its warn,
 * error and fatal lines and its stderr, so a crash in CI can be read from the test's output.
 */
export async function assertCleanExit(proxy: CliProxy): Promise<void> {
  const outcome = await proxy.exited;
  if (outcome.code === 0 && outcome.signal === null) return;
  const serious = proxy.lines.filter((l) => l.level === 'warn' || l.level === 'error' || l.level === 'fatal');
  assert.fail(`smartproxy ended with ${JSON.stringify(outcome)}, not exit 0; its warn/error/fatal lines:\n${serious.map((l) => JSON.stringify(l)).join('\n')}\nstderr: ${proxy.stderr()}`);
}

/** One GET against the admin API (TCP port or unix socket path). */
export function adminGet(target: { port: number } | { socketPath: string }, urlPath: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const where = 'socketPath' in target ? { socketPath: target.socketPath } : { host: '127.0.0.1', port: target.port };
    const req = http.get({ ...where, path: urlPath, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
  });
}

/**
 * TCP ports a process (by PID) has in LISTEN state, from /proc: its socket inodes matched against
 * /proc/<pid>/net/tcp and tcp6. Sorted; a port bound on two addresses appears twice.
 */
export function listeningPorts(pid: number): number[] {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue; // closed while we looked
    }
    const m = /^socket:\[(\d+)\]$/.exec(target);
    if (m !== null) inodes.add(m[1]!);
  }
  const ports: number[] = [];
  for (const table of ['tcp', 'tcp6']) {
    let text: string;
    try {
      text = readFileSync(`/proc/${pid}/net/${table}`, 'utf8');
    } catch {
      continue;
    }
    for (const row of text.split('\n').slice(1)) {
      const cols = row.trim().split(/\s+/);
      if (cols.length < 10) continue;
      const [, local, , state] = cols;
      if (state === '0A' && inodes.has(cols[9]!)) ports.push(Number.parseInt(local!.split(':').pop()!, 16));
    }
  }
  return ports.sort((a, b) => a - b);
}

export interface CliRun {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/**
 * Runs the CLI (or another entry file, or another command) to completion; killed by its PID and
 * failed after `ms`.
 */
export function runCli(t: TestContext, args: readonly string[], opts: { command?: string; entry?: string[]; ms?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CliRun> {
  const ms = opts.ms ?? 20_000;
  const child = spawn(opts.command ?? process.execPath, [...(opts.entry ?? ['--import', 'tsx', CLI]), ...args], {
    cwd: ROOT,
    env: opts.env ?? process.env,
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
