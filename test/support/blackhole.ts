// A backend address whose TCP handshake never completes, for connect-timeout tests on loopback.
//
// A listening socket that nobody accepts from, with its accept queue full: Linux then drops every
// further SYN (tcp_conn_request: "sk_acceptq_is_full -> drop"), so a connect() to it stays in
// SYN_SENT until the caller gives up. A net.Server in this process would accept at once, so the
// listener lives in a child process whose event loop is blocked right after listen().
import { spawn } from 'node:child_process';
import net from 'node:net';
import type { TestContext } from 'node:test';

const CHILD = `
const net = require('node:net');
const fs = require('node:fs');
const server = net.createServer().listen({ port: 0, host: '127.0.0.1', backlog: 1 }, () => {
  fs.writeSync(1, server.address().port + '\\n');
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0); // never accept anything
});
`;

export interface Blackhole {
  readonly port: number;
}

/** Starts the blackhole; the child process (by its pid) and the filler sockets are cleaned up in t.after(). */
export async function startBlackhole(t: TestContext): Promise<Blackhole> {
  const child = spawn(process.execPath, ['-e', CHILD], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const fillers: net.Socket[] = [];
  t.after(async () => {
    for (const s of fillers) s.destroy();
    if (child.exitCode === null && child.signalCode === null) process.kill(child.pid!, 'SIGKILL');
    await exited;
  });
  const port = await new Promise<number>((resolve, reject) => {
    let text = '';
    child.stdout.on('data', (d: Buffer) => {
      text += d.toString();
      if (text.includes('\n')) resolve(Number(text.trim()));
    });
    child.once('exit', (code) => reject(new Error(`blackhole child exited early (${code})`)));
  });
  // Fill the accept queue: connect until one handshake does not complete.
  for (let i = 0; i < 16; i++) {
    const socket = net.connect({ port, host: '127.0.0.1' });
    socket.on('error', () => {});
    fillers.push(socket);
    const completed = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 250);
      socket.once('connect', () => {
        clearTimeout(timer);
        resolve(true);
      });
    });
    if (!completed) return { port };
  }
  throw new Error('could not fill the blackhole accept queue');
}
