// Fixtures for the backend tests (issue 17): backends that say who they are, a client that asks
// which backend served it (optionally through a PROXY v1 header), admin API writes, and polling
// of a daemon's backend views until a state shows up.
import http from 'node:http';
import net from 'node:net';
import type { TestContext } from 'node:test';
import type { BackendView } from '../../src/backends/supervisor.ts';

export interface NamedBackend {
  readonly name: string;
  readonly host: string;
  readonly port: number;
  /** `host:port`, as the proxy writes the backend. */
  readonly address: string;
  /** Client connections: those that sent a byte (a health check of type tcp sends none). */
  served: number;
  /** Every TCP connection accepted, health checks included. */
  accepted: number;
  readonly sockets: Set<net.Socket>;
  /** Stops listening and destroys every open socket (idempotent). */
  close(): Promise<void>;
}

/**
 * A server on 127.0.0.1 (a free port) that keeps its sockets, ignores their errors, and is closed
 * with every socket destroyed when the test ends. `onSocket` gives each connection its behaviour.
 */
export async function startTrackedServer(
  t: TestContext,
  onSocket: (socket: net.Socket) => void,
  opts: { allowHalfOpen?: boolean } = {},
): Promise<{ server: net.Server; port: number; address: string; sockets: Set<net.Socket> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: opts.allowHalfOpen ?? false }, (socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    onSocket(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(
    () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  );
  const port = (server.address() as net.AddressInfo).port;
  return { server, port, address: `127.0.0.1:${port}`, sockets };
}

/**
 * A backend that answers a connection's first bytes with `<name>\n` and echoes what follows.
 * `port` binds a given port (to bring a killed backend back on its address).
 */
export async function startNamedBackend(t: TestContext, name: string, opts: { host?: string; port?: number } = {}): Promise<NamedBackend> {
  const host = opts.host ?? '127.0.0.1';
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    backend.accepted++;
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    socket.once('data', () => {
      backend.served++;
      socket.write(`${name}\n`);
      socket.on('data', (chunk: Buffer) => socket.write(chunk));
    });
    socket.on('end', () => socket.end());
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as net.AddressInfo).port;
  let closing: Promise<void> | null = null;
  const backend: NamedBackend = {
    name,
    host,
    port,
    address: `${host}:${port}`,
    served: 0,
    accepted: 0,
    sockets,
    close: () =>
      (closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      })),
  };
  t.after(() => backend.close());
  return backend;
}

/** The answer of one connection through the proxy. */
export interface Answer {
  /** The backend's name, or null when the proxy closed the connection first. */
  readonly name: string | null;
  /** From the start of the connect to the name (or the close). */
  readonly ms: number;
  /** Open when `hold` was asked and a backend answered; else closed or closing. */
  readonly socket: net.Socket;
  /** The error code (ECONNRESET...) of a connection closed before an answer. */
  readonly error: string | null;
}

/**
 * Connects to the proxy, sends `hi\n` (after a PROXY v1 header naming `proxyFrom` as the client,
 * when given) and resolves with the name of the backend that answered. Without `hold` the
 * connection is ended at once.
 */
export function ask(port: number, opts: { localAddress?: string; proxyFrom?: string; hold?: boolean } = {}): Promise<Answer> {
  const started = Date.now();
  return new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1', localAddress: opts.localAddress, allowHalfOpen: true });
    let got = '';
    let done = false;
    let error: string | null = null;
    const finish = (name: string | null): void => {
      if (done) return;
      done = true;
      socket.removeListener('data', onData);
      if (name === null || opts.hold !== true) {
        socket.resume();
        socket.end();
      }
      resolve({ name, ms: Date.now() - started, socket, error });
    };
    const onData = (chunk: Buffer): void => {
      got += chunk.toString('latin1');
      const nl = got.indexOf('\n');
      if (nl >= 0) finish(got.slice(0, nl));
    };
    socket.on('connect', () => {
      const header = opts.proxyFrom === undefined ? '' : `PROXY TCP4 ${opts.proxyFrom} 10.0.0.1 40000 443\r\n`;
      socket.write(`${header}hi\n`);
    });
    socket.on('data', onData);
    socket.on('error', (err: NodeJS.ErrnoException) => {
      error = err.code ?? 'error';
      finish(null);
    });
    socket.on('end', () => {
      if (!done) finish(null);
      socket.end();
    });
    socket.on('close', () => finish(null));
  });
}

/** `n` asks, `concurrency` at a time; resolves with how many each backend name answered (null: refused). */
export async function tallyAsks(port: number, n: number, concurrency = 1, opts: { localAddress?: string } = {}): Promise<Map<string | null, number>> {
  const counts = new Map<string | null, number>();
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < n) {
      next++;
      const { name } = await ask(port, opts);
      counts.set(name, (counts.get(name) ?? 0) + 1);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, worker));
  return counts;
}

/** Ends a held connection and resolves once it is closed. */
export function hangUp(socket: net.Socket): Promise<void> {
  return new Promise((resolve) => {
    if (socket.destroyed) return resolve();
    socket.once('close', () => resolve());
    socket.resume();
    socket.end();
  });
}

/** One echo round trip on a held connection; rejects if it closes first. */
export function roundTrip(socket: net.Socket, text: string, ms = 2000): Promise<void> {
  return new Promise((resolve, reject) => {
    let got = '';
    const timer = setTimeout(() => fail(new Error(`no echo of ${JSON.stringify(text)} within ${ms} ms`)), ms);
    const onData = (chunk: Buffer): void => {
      got += chunk.toString('latin1');
      if (got.length >= text.length) {
        cleanup();
        if (got === text) resolve();
        else reject(new Error(`echo: got ${JSON.stringify(got)}`));
      }
    };
    const onClose = (): void => fail(new Error('closed before the echo'));
    const fail = (err: Error): void => {
      cleanup();
      reject(err);
    };
    const cleanup = (): void => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('close', onClose);
    };
    socket.on('data', onData);
    socket.on('close', onClose);
    socket.resume();
    socket.write(text);
  });
}

export type AdminTarget = { host: string; port: number; localAddress?: string } | { socketPath: string };

/** One request to the admin API. */
export function adminRequest(target: AdminTarget, method: 'GET' | 'POST', path: string, headers: Record<string, string> = {}): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const where = 'socketPath' in target ? { socketPath: target.socketPath } : { host: target.host, port: target.port, localAddress: target.localAddress };
    const req = http.request({ ...where, method, path, headers, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** POST /backends/state for one backend. */
export function setState(target: AdminTarget, backend: string, state: string): Promise<{ status: number; body: string }> {
  return adminRequest(target, 'POST', `/backends/state?backend=${encodeURIComponent(backend)}&state=${state}`);
}

/** Polls `views` until `predicate` holds on the view of `backend`; fails with the last views after `ms`. */
export async function waitBackend(
  views: () => Promise<BackendView[]>,
  backend: string,
  predicate: (v: BackendView) => boolean,
  what: string,
  ms = 5000,
): Promise<BackendView> {
  const deadline = Date.now() + ms;
  for (;;) {
    const all = await views();
    const view = all.find((v) => v.backend === backend);
    if (view !== undefined && predicate(view)) return view;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${backend} ${what}; last: ${JSON.stringify(all)}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Polls an async condition; fails after `ms`. */
export async function eventually(predicate: () => Promise<boolean> | boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
