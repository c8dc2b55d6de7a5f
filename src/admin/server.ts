// The admin API: plain HTTP on loopback or a unix socket (mode 0600). Read-only views of the
// daemon, and one write: a backend's runtime state (POST /backends/state, as HAProxy's
// `set server state`). The write is served only on the unix socket or a loopback address, never
// on a public one even with allow_public, and every change is logged with who asked.
import { lstatSync, unlinkSync } from 'node:fs';
import http from 'node:http';
import type { AdminState } from '../backends/backend-states.ts';
import type { BackendEntry, BackendView } from '../backends/supervisor.ts';
import type { AdminListen } from '../config/types.ts';
import { formatHostPort, isLoopbackHost } from '../config/units.ts';
import type { ConnectionInfo } from '../connection/connection.ts';
import type { Logger } from '../logging/logger.ts';
import type { DaemonStats } from './stats.ts';

/** What the admin API reads: a Daemon (one event loop) or EventLoops (several threads). */
export interface AdminSource {
  readonly accepting: boolean;
  /** True before the listeners are up (the admin API listens first): /healthz says "starting". */
  readonly starting?: boolean;
  readonly log: Logger;
  metricsText(): Promise<{ contentType: string; body: string }>;
  stats(): Promise<DaemonStats>;
  connections(limit: number): Promise<{ total: number; connections: ConnectionInfo[] }>;
  backendViews(): Promise<BackendView[]>;
  setBackendState(target: { backend: string; listener?: string; route?: string }, state: AdminState): Promise<BackendEntry[]>;
}

export interface AdminServer {
  /** As configured (a reload compares it with the new [admin] listen). */
  readonly listen: AdminListen;
  /** `host:port` or `unix:/path`. */
  readonly address: string;
  readonly port: number;
  close(): Promise<void>;
}

export async function startAdminServer(listen: AdminListen, daemon: AdminSource): Promise<AdminServer> {
  const server = http.createServer((req, res) => {
    handle(daemon, listen, req, res).catch((err: unknown) => {
      // A request that reaches the threads after they stopped (a SIGTERM under way) is no error:
      // the admin API outlives them by a moment while the process exits.
      if ((err as { code?: unknown } | null)?.code === 'ESHUTTINGDOWN') {
        daemon.log.debug({ url: req.url }, 'admin request during shutdown: 503');
        if (!res.headersSent) res.writeHead(503, { 'content-type': 'text/plain', 'cache-control': 'no-store' });
        res.end('shutting down\n');
        return;
      }
      daemon.log.error({ err }, 'admin request failed');
      if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
      res.end('internal error\n');
    });
  });
  server.keepAliveTimeout = 5_000;
  server.headersTimeout = 10_000;
  server.requestTimeout = 10_000;
  server.on('clientError', (_err, socket) => socket.destroy());
  if (listen.kind === 'unix') removeStaleSocket(listen.path);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    if (listen.kind === 'unix') {
      // The socket file is created with mode 0600 (umask 0177 around bind(2)) so no client can
      // connect in between creation and a chmod. listen() binds synchronously: the umask is
      // restored before any other code runs.
      const umask = process.umask(0o177);
      try {
        server.listen(listen.path, () => resolve());
      } finally {
        process.umask(umask);
      }
    } else {
      // IPv6-only like the listeners, so check-config's overlap rules hold for the admin address too.
      const host = listen.address.host;
      server.listen({ host, port: listen.address.port, ipv6Only: host.includes(':') }, () => resolve());
    }
  });
  server.on('error', (err) => daemon.log.error({ err }, 'admin server error'));
  const bound = server.address();
  const port = typeof bound === 'object' && bound !== null ? bound.port : 0;
  const address = listen.kind === 'unix' ? `unix:${listen.path}` : formatHostPort(listen.address.host, port);
  return {
    listen,
    address,
    port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

/**
 * Removes a socket a previous run left at `path`. Anything else there (a regular file, a
 * directory, a link) is not ours to delete: listen then fails with EADDRINUSE and says so.
 */
function removeStaleSocket(path: string): void {
  let stat;
  try {
    stat = lstatSync(path);
  } catch {
    return; // absent
  }
  if (stat.isSocket()) unlinkSync(path);
}

async function handle(daemon: AdminSource, listen: AdminListen, req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://admin');
  if (url.pathname === '/backends/state') return setBackendState(daemon, listen, url, req, res);
  if (req.method !== 'GET' && req.method !== 'HEAD') return send(res, 405, 'text/plain', 'method not allowed\n');
  switch (url.pathname) {
    case '/healthz':
      if (daemon.accepting) return send(res, 200, 'text/plain', 'ok\n');
      return send(res, 503, 'text/plain', daemon.starting === true ? 'starting\n' : 'draining\n');
    case '/metrics': {
      const { contentType, body } = await daemon.metricsText();
      return send(res, 200, contentType, body);
    }
    case '/stats':
      return sendJson(res, { ...(await daemon.stats()), backends: await daemon.backendViews() });
    case '/backends':
      return sendJson(res, await daemon.backendViews());
    case '/connections':
      return sendJson(res, await daemon.connections(clampLimit(url.searchParams.get('limit'))));
    default:
      return send(res, 404, 'text/plain', 'not found: try /healthz, /metrics, /stats, /backends, /connections?limit=N, POST /backends/state\n');
  }
}

const ADMIN_STATES: readonly AdminState[] = ['ready', 'drain', 'maintenance'];

/**
 * POST /backends/state?backend=ADDR&state=ready|drain|maintenance[&listener=L][&route=R]: the
 * runtime state of a backend in every route that has it (or only those named). ADDR is the
 * address dialled or as configured (a host name covers every address it resolved to).
 */
async function setBackendState(daemon: AdminSource, listen: AdminListen, url: URL, req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
  if (req.method !== 'POST') return send(res, 405, 'text/plain', 'use POST\n');
  const peer = req.socket.remoteAddress;
  // Loopback only: the API has no authentication, so a write never comes from the network.
  if (listen.kind === 'tcp' && (!isLoopbackHost(listen.address.host) || peer === undefined || !isLoopbackHost(peer))) {
    return send(res, 403, 'text/plain', 'forbidden: backend state changes are served only on the unix socket or a loopback address\n');
  }
  // A browser on this host could be made to send this POST by any page it visits (or a name
  // rebound to 127.0.0.1): a browser always says where the request comes from, curl never does.
  if (req.headers.origin !== undefined) return send(res, 403, 'text/plain', 'forbidden: requests from a web page (with an Origin header) may not change state\n');
  const backend = url.searchParams.get('backend');
  const state = url.searchParams.get('state') as AdminState | null;
  if (backend === null || backend === '' || state === null || !ADMIN_STATES.includes(state)) {
    return send(res, 400, 'text/plain', 'expected ?backend=host:port&state=ready|drain|maintenance (and optionally &listener=NAME&route=NAME)\n');
  }
  const target = {
    backend,
    ...(url.searchParams.has('listener') ? { listener: url.searchParams.get('listener')! } : {}),
    ...(url.searchParams.has('route') ? { route: url.searchParams.get('route')! } : {}),
  };
  const changed = await daemon.setBackendState(target, state);
  if (changed.length === 0) return send(res, 404, 'text/plain', `no backend ${backend} in the routes in force\n`);
  // Who asked: Node exposes no SO_PEERCRED, so on the unix socket (mode 0600) that is whoever
  // can open it (root or the daemon's user); on TCP the peer address.
  const by = listen.kind === 'unix' ? `unix:${listen.path}` : `${peer}:${req.socket.remotePort}`;
  for (const entry of changed) {
    daemon.log.warn(
      { listener: entry.listener, route: entry.route, backend: entry.backend, state, by },
      `backend ${entry.backend} of route ${entry.route} set to ${state} through the admin API by ${by}`,
    );
  }
  return sendJson(res, { state, changed });
}

function clampLimit(raw: string | null): number {
  const n = raw === null ? 100 : Number.parseInt(raw, 10);
  return Number.isFinite(n) && n > 0 ? Math.min(n, 10_000) : 100;
}

function send(res: http.ServerResponse, code: number, type: string, body: string): void {
  res.writeHead(code, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(body);
}

function sendJson(res: http.ServerResponse, value: unknown): void {
  send(res, 200, 'application/json', `${JSON.stringify(value, null, 2)}\n`);
}
