// Shared test fixtures: an in-process daemon built from TOML text, backends that record what they
// see, and clients. Everything listens on loopback port 0 and is closed through t.after().
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import type { TestContext } from 'node:test';
import { Writable } from 'node:stream';
import { parseConfigText, formatIssue } from '../../src/config/load.ts';
import type { Config } from '../../src/config/types.ts';
import { Daemon } from '../../src/daemon.ts';
import { createLogger, type Logger } from '../../src/logging/logger.ts';
import { Metrics } from '../../src/metrics.ts';

export const CERT = readFileSync(new URL('../fixtures/cert.pem', import.meta.url));
export const KEY = readFileSync(new URL('../fixtures/key.pem', import.meta.url));

/** Parses TOML text into a Config, failing the test with every issue if it is invalid. */
export function configFrom(toml: string): Config {
  const result = parseConfigText(toml, 'test.toml');
  if (!result.ok) throw new Error(`invalid test config:\n${result.issues.map(formatIssue).join('\n')}`);
  return result.config;
}

/** A logger whose JSON lines are kept in memory for assertions. */
export function memoryLogger(level: 'debug' | 'info' | 'warn' = 'info'): { log: Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString('utf8').split('\n')) if (line.length > 0) lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { log: createLogger({ level, format: 'json', destination }), lines };
}

export interface ProxyUnderTest {
  readonly daemon: Daemon;
  /** The port of a listener's first bind address (or the one given). */
  port(listener: string, address?: string): number;
  readonly lines: Array<Record<string, unknown>>;
}

/**
 * Starts a daemon on `toml` (bind to port 0 so tests never collide) and shuts it down at once
 * after the test. Tests assert `daemon.registry.size === 0` themselves before they end.
 */
export async function startProxy(t: TestContext, toml: string, opts: { logLevel?: 'debug' | 'info' | 'warn' } = {}): Promise<ProxyUnderTest> {
  const { log, lines } = memoryLogger(opts.logLevel ?? 'warn');
  const daemon = await Daemon.start(configFrom(toml), log, { metrics: new Metrics({ defaultMetrics: false }) });
  t.after(async () => {
    await daemon.shutdown({ immediate: true });
  });
  return { daemon, port: (listener, address) => daemon.portOf(listener, address), lines };
}

export interface Backend {
  readonly port: number;
  /** Connections accepted so far. */
  accepted: number;
  readonly sockets: Set<net.Socket>;
  close(): Promise<void>;
}

/** A TCP server; `onSocket` decides what it does (default: echo, ending when the client ends). */
export async function startBackend(t: TestContext, onSocket: (s: net.Socket) => void = echo, host = '127.0.0.1'): Promise<Backend> {
  // listenTracked gives each socket its error handler.
  const server = net.createServer({ allowHalfOpen: true }, onSocket);
  return listenTracked(t, server, host);
}

/** Echo: every byte back, FIN answered with FIN. */
export function echo(socket: net.Socket): void {
  socket.pipe(socket);
}

/** A TLS server that answers each connection with its name, then echoes. */
export async function startTlsBackend(t: TestContext, name: string): Promise<Backend> {
  const server = tls.createServer({ cert: CERT, key: KEY }, (socket) => {
    socket.on('error', () => {});
    socket.write(`${name}\n`);
    socket.pipe(socket);
  });
  server.on('tlsClientError', () => {});
  return listenTracked(t, server, '127.0.0.1');
}

/** Listens on port 0, counts accepted TCP connections, and closes everything after the test. */
async function listenTracked(t: TestContext, server: net.Server, host: string): Promise<Backend> {
  const sockets = new Set<net.Socket>();
  // Prepended: the count is up to date by the time the server's own handler runs.
  server.prependListener('connection', (socket: net.Socket) => {
    backend.accepted++;
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  const backend: Backend = {
    port: (server.address() as net.AddressInfo).port,
    accepted: 0,
    sockets,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
  t.after(() => backend.close());
  return backend;
}

/** A port nobody listens on (bound then released). */
export async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** Connects (optionally from a given loopback source address) and resolves once connected. */
export function connect(port: number, opts: { host?: string; localAddress?: string } = {}): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host: opts.host ?? '127.0.0.1', localAddress: opts.localAddress, allowHalfOpen: true });
    socket.once('connect', () => {
      socket.off('error', reject);
      resolve(socket);
    });
    socket.once('error', reject);
  });
}

/** Everything the socket sends until it ends or closes, and how it ended. */
export function readAll(socket: net.Socket): Promise<{ data: Buffer; error: NodeJS.ErrnoException | null }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let error: NodeJS.ErrnoException | null = null;
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', (e: NodeJS.ErrnoException) => (error = e));
    socket.on('close', () => resolve({ data: Buffer.concat(chunks), error }));
  });
}

/** Resolves when the socket closes; with whether it was reset (ECONNRESET) rather than ended. */
export function closed(socket: net.Socket): Promise<{ reset: boolean }> {
  return new Promise((resolve) => {
    let reset = false;
    socket.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'ECONNRESET') reset = true;
    });
    socket.resume();
    socket.on('close', () => resolve({ reset }));
  });
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Waits until `predicate` holds, checking on each event-loop turn; fails after `ms`. */
export async function until(predicate: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
