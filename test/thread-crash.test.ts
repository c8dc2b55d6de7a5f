// An uncaught exception in an event-loop thread is a bug: the main thread logs it with its stack
// and the process exits 70, so systemd restarts it. The bug is injected from outside, with a
// module preloaded by --import (threads inherit the main thread's execArgv), so the daemon
// carries no test hook.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { CLI, ROOT, tempDir } from './support/cli.ts';

test('an uncaught exception in one event-loop thread is logged with its stack and the process exits 70', { timeout: 30_000 }, async (t) => {
  const dir = tempDir(t);
  const inject = path.join(dir, 'inject.mjs');
  writeFileSync(inject, `
import { isMainThread, workerData } from 'node:worker_threads';
if (!isMainThread && workerData?.smartproxyThread === true && workerData.thread === 1) {
  setTimeout(() => { throw new Error('injected bug in thread 1'); }, 300);
}
`);
  const file = path.join(dir, 'proxy.toml');
  writeFileSync(file, `
[process]
threads = 2
[[listeners]]
name = "tcp"
bind = "127.0.0.1:0"
  [[listeners.routes]]
  name = "r"
  default = true
  backends = "127.0.0.1:1"
`);
  const child = spawn(process.execPath, ['--import', 'tsx', '--import', inject, CLI, 'serve', '-c', file, '--log-format', 'json'], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let stdout = '';
  child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
  child.stderr.resume();
  const code = await new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
  assert.equal(code, 70);
  const lines = stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
  const fatal = lines.find((l) => l.level === 'fatal');
  assert.ok(fatal !== undefined, `no fatal line in:\n${stdout}`);
  assert.equal(fatal.msg, 'uncaught exception in an event-loop thread (bug)');
  assert.equal(fatal.thread, 1);
  assert.match(String((fatal.err as { stack?: string } | undefined)?.stack), /injected bug in thread 1/);
});
