// Every child process of the benchmark is spawned here and only here, so one registry can stop
// them all: on the normal path, on an exception and on SIGINT/SIGTERM. Each child leads its own
// process group (detached), so stopping it also stops what it forked (the nginx worker) and a
// terminal's Ctrl-C reaches only us; we then stop the groups ourselves, by the pid we spawned.
import { spawn, execFileSync } from 'node:child_process';
import { readFileSync, readdirSync, rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * `linesWritten`: stdout and stderr lines so far (the flood scenario counts a proxy's log lines).
 * @typedef {{ name: string, pid: number, exited: Promise<{code: number|null, signal: string|null}>, isRunning: () => boolean, output: () => string, linesWritten: () => number }} Child
 */

/** @type {Set<Child>} */
const running = new Set();
/** @type {string[]} */
const tempDirs = [];

const OUTPUT_TAIL_CHARS = 4000;

/**
 * Spawns `argv` in its own process group. `onLine` receives each stdout line (for children that
 * report progress); stderr and stdout tails are kept for error messages.
 * @param {string} name
 * @param {string[]} argv
 * @param {{ onLine?: (line: string) => void, cwd?: string, stdin?: 'pipe'|'ignore', env?: Record<string, string> }} [options]
 * @returns {Child & { stdin: import('node:stream').Writable | null }}
 */
export function spawnChild(name, argv, options = {}) {
  const proc = spawn(argv[0], argv.slice(1), {
    detached: true,
    cwd: options.cwd,
    // `env` adds to (or overrides in) this process's environment.
    env: options.env ? { ...process.env, ...options.env } : process.env,
    stdio: [options.stdin ?? 'ignore', 'pipe', 'pipe'],
  });
  let tail = '';
  let partialLine = '';
  let isRunning = true;
  let lines = 0;
  const keepTail = (chunk) => {
    tail = (tail + chunk).slice(-OUTPUT_TAIL_CHARS);
    for (let i = chunk.indexOf('\n'); i !== -1; i = chunk.indexOf('\n', i + 1)) lines++;
  };
  proc.stdout.setEncoding('utf8');
  proc.stderr.setEncoding('utf8');
  proc.stdout.on('data', (chunk) => {
    keepTail(chunk);
    if (!options.onLine) return;
    const lines = (partialLine + chunk).split('\n');
    partialLine = lines.pop() ?? '';
    for (const line of lines) options.onLine(line);
  });
  proc.stderr.on('data', keepTail);
  // A stdin pipe to a child that already exited emits EPIPE; that is an ordinary ending.
  proc.stdin?.on('error', () => {});

  const exited = new Promise((resolve) => {
    proc.on('error', (err) => {
      keepTail(`\nspawn failed: ${err.message}\n`);
    });
    proc.on('close', (code, signal) => {
      isRunning = false;
      running.delete(child);
      resolve({ code, signal });
    });
  });
  const child = {
    name,
    pid: proc.pid ?? -1,
    exited,
    stdin: proc.stdin,
    isRunning: () => isRunning,
    output: () => tail.trim(),
    linesWritten: () => lines,
  };
  if (proc.pid === undefined) isRunning = false;
  else running.add(child);
  return child;
}

/**
 * Runs a command to completion with a deadline and returns its stdout. Rejects with the output
 * tail when it exits non-zero or overruns.
 * @param {string} name
 * @param {string[]} argv
 * @param {number} timeoutMs
 * @param {{ cwd?: string }} [options]
 */
export async function runToCompletion(name, argv, timeoutMs, options = {}) {
  let stdout = '';
  const child = spawnChild(name, argv, {
    cwd: options.cwd,
    onLine: (line) => {
      stdout += line + '\n';
    },
  });
  let overran = false;
  const timer = setTimeout(() => {
    overran = true;
    stopChild(child);
  }, timeoutMs);
  const { code, signal } = await child.exited;
  clearTimeout(timer);
  if (code !== 0) {
    const why = overran ? `stopped after its deadline of ${timeoutMs} ms` : signal ? `killed by ${signal}` : `exit code ${code}`;
    throw new Error(`${name} failed (${why}): ${failureOutput(child)}`);
  }
  return stdout;
}

/**
 * The lines of a child's output that explain a failure (alerts, errors), else its last lines,
 * on one line: error messages and report notes show one line per problem.
 * @param {Child} child
 */
export function failureOutput(child) {
  const lines = child.output().split('\n').map((line) => line.trim()).filter(Boolean);
  const telling = lines.filter((line) => /alert|emerg|error|fatal|exception|cannot|failed/i.test(line));
  return (telling.length ? telling : lines).slice(-3).join(' | ') || '(no output)';
}

/** SIGTERM to the child's group, SIGKILL after a grace period. Idempotent. @param {Child} child */
export async function stopChild(child, graceMs = 3000) {
  if (!child.isRunning()) return;
  signalGroup(child.pid, 'SIGTERM');
  const timer = setTimeout(() => signalGroup(child.pid, 'SIGKILL'), graceMs);
  await child.exited;
  clearTimeout(timer);
  // The leader may exit before its group (nginx master before its worker): finish the group.
  signalGroup(child.pid, 'SIGKILL');
}

export async function stopAllChildren() {
  await Promise.all([...running].map((child) => stopChild(child)));
}

/** @param {string} dir */
export function removeOnExit(dir) {
  tempDirs.push(dir);
}

function signalGroup(pid, signal) {
  try {
    process.kill(-pid, signal);
  } catch {
    // ESRCH: the group is already gone.
  }
}

// Last resort for paths that cannot await (process.exit from anywhere, an uncaught exception).
process.on('exit', () => {
  for (const child of running) signalGroup(child.pid, 'SIGKILL');
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

/**
 * Waits until a socket listens on 127.0.0.1:`port` (read from /proc/net/tcp, so the check sends
 * nothing: a probe connection would reach iperf3 or the hold server through the proxy and count).
 * Fails early, with its output, if `child` exits first.
 * @param {number} port
 * @param {{ child?: Child, timeoutMs?: number, what?: string }} [options]
 */
export async function waitForListen(port, { child, timeoutMs = 15000, what = `port ${port}` } = {}) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (isListening(port)) return;
    if (child && !child.isRunning()) {
      throw new Error(`${what} exited before listening: ${failureOutput(child)}`);
    }
    await sleep(50);
  }
  throw new Error(`${what} not listening on port ${port} after ${timeoutMs} ms` + (child ? `: ${failureOutput(child)}` : ''));
}

const TCP_LISTEN_STATE = '0A';

function isListening(port) {
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text;
    try {
      text = readFileSync(table, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/);
      if (fields[3] === TCP_LISTEN_STATE && fields[1]?.endsWith(`:${hexPort}`)) return true;
    }
  }
  return false;
}

const CLOCK_TICKS_PER_SECOND = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/**
 * `pid` and all its descendants (nginx master + worker; any helper a daemon forks).
 * @param {number} pid
 */
export function processTree(pid) {
  const childrenOf = new Map();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = readStat(Number(entry));
    if (!stat) continue;
    const list = childrenOf.get(stat.ppid) ?? [];
    list.push(Number(entry));
    childrenOf.set(stat.ppid, list);
  }
  const tree = [pid];
  for (let i = 0; i < tree.length; i++) tree.push(...(childrenOf.get(tree[i]) ?? []));
  return tree;
}

/**
 * CPU seconds (user + system, all threads) and resident memory of a set of processes.
 * @param {number[]} pids
 */
export function sampleUsage(pids) {
  let cpuSeconds = 0;
  let rssKb = 0;
  for (const pid of pids) {
    const stat = readStat(pid);
    if (stat) cpuSeconds += (stat.utime + stat.stime) / CLOCK_TICKS_PER_SECOND;
    rssKb += readRssKb(pid);
  }
  return { cpuSeconds, rssKb };
}

function readStat(pid) {
  let text;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // The command name is in parentheses and may contain spaces; the fields after it are fixed.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return { ppid: Number(fields[1]), utime: Number(fields[11]), stime: Number(fields[12]) };
}

function readRssKb(pid) {
  try {
    const match = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) : 0;
  } catch {
    return 0;
  }
}
