// `smartproxy serve`: load, bind, run until a signal. SIGHUP reloads, SIGTERM/SIGINT drain and
// exit 0, a second SIGTERM/SIGINT closes everything at once. This is the main thread: it owns the
// config, the signals, reload, drain and the admin API; the listeners and their connections run
// in `[process] threads` event-loop threads (event-loops.ts, thread.ts).
//
// Start-up, in order: load the file -> admin API listens (answering 503 until the daemon is up) ->
// event-loop threads bind every listener -> READY=1 to systemd (notify.ts). A failure at any step
// exits 1 with one line on stderr, and nothing bound by an earlier step stays bound.
import { readFileSync } from 'node:fs';
import { formatIssue, loadConfig } from './config/load.ts';
import type { AdminListen, Config } from './config/types.ts';
import { ShuttingDownError } from './daemon.ts';
import { EventLoops } from './event-loops.ts';
import { VERSION } from './metrics.ts';
import { MAX_TIMER_MS } from './config/units.ts';
import { BindError } from './listener/listener.ts';
import { createLogger, type LogFormat, type LogLevel, type Logger } from './logging/logger.ts';
import type { AdminState } from './backends/backend-states.ts';
import type { BackendEntry, BackendView } from './backends/supervisor.ts';
import { startAdminServer, type AdminServer, type AdminSource } from './admin/server.ts';
import type { DaemonStats } from './admin/stats.ts';
import type { ConnectionInfo } from './connection/connection.ts';
import { fdLimitWarning } from './fd-limit.ts';
import { systemdNotifier, type Notifier } from './notify.ts';

export interface ServeOptions {
  readonly configFile: string;
  readonly logLevel?: LogLevel;
  readonly logFormat?: LogFormat;
}

/** Runs the daemon in the foreground; resolves with the process exit code. */
export async function serve(opts: ServeOptions): Promise<number> {
  const loaded = loadConfig(opts.configFile);
  if (!loaded.ok) {
    process.stderr.write(`smartproxy: ${opts.configFile}: invalid configuration (${loaded.issues.length} problem${loaded.issues.length === 1 ? '' : 's'})\n`);
    for (const issue of loaded.issues) process.stderr.write(`  ${formatIssue(issue)}\n`);
    return 1;
  }
  const config = loaded.config;
  const logFormat: LogFormat = opts.logFormat ?? (process.stdout.isTTY ? 'pretty' : 'json');
  const log = createLogger({ level: opts.logLevel ?? config.logging.level, format: logFormat });
  installCrashHandlers(log);
  log.info({ version: VERSION, node: process.version, config: config.file, threads: EventLoops.threadsFor(config) }, 'starting');
  // Until the real handlers are installed below, a SIGHUP (default action: terminate; systemd
  // does not restart after it) or a SIGTERM during start-up would kill the process: hold them
  // and replay them once running.
  const held: NodeJS.Signals[] = [];
  const hold = (signal: NodeJS.Signals): void => void held.push(signal);
  const stopHolding = (): void => {
    for (const signal of STOP_AND_RELOAD) process.off(signal, hold);
  };
  for (const signal of STOP_AND_RELOAD) process.on(signal, hold);

  const notifier = systemdNotifier(log);

  // The admin API listens first: a taken admin address fails start-up before any listener is bound.
  const view = new AdminView(log, config.limits.maxConnections);
  let admin: AdminServer | null = null;
  if (config.admin !== null) {
    try {
      admin = await startAdminServer(config.admin, view);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? String(err);
      const where = describeAdmin(config);
      const line = `admin API cannot listen on ${where}: ${code}${privilegedPortHint(code, where)}`;
      log.error({ code, admin: where }, line);
      process.stderr.write(`smartproxy: ${line}\n`);
      stopHolding();
      return 1;
    }
  }

  let daemon: EventLoops;
  try {
    daemon = await EventLoops.start(config, log, { logLevel: opts.logLevel ?? config.logging.level, logFormat });
  } catch (err) {
    await admin?.close();
    stopHolding();
    if (err instanceof BindError) {
      const line = bindFailureLine(err);
      log.error({ listener: err.listener, address: err.address, code: err.code }, line);
      process.stderr.write(`smartproxy: ${line}\n`);
      return 1;
    }
    throw err;
  }
  view.daemon = daemon;
  const fdWarning = fdLimitWarning(config);
  if (fdWarning !== null) log.warn(fdWarning.fields, fdWarning.message);
  // Logged once the daemon behind it is up (tests and operators wait for this line); until then it
  // answered /healthz with 503 and /stats with no listeners.
  if (admin !== null) log.info({ admin: admin.address }, 'admin API listening');
  notifier.ready(servingStatus(daemon.config));

  const running: Running = { daemon, threads: config.process.threads, admin, log, notifier, logLevelFromCli: opts.logLevel !== undefined, cutShort: null };
  let reloading = Promise.resolve();
  const onHangup = (): void => {
    // Reloads run one after another; ten HUPs in a second end in the last file's config. systemd
    // hears RELOADING=1 when each begins and READY=1 when it ends, applied or not.
    reloading = reloading
      .then(async () => {
        notifier.reloading();
        const outcome = await reload(running, opts.configFile);
        if (outcome === 'applied') notifier.ready(servingStatus(daemon.config));
        else if (outcome === 'failed') notifier.ready(`reload failed at ${new Date().toISOString()}; the previous configuration stays in force`);
      })
      .catch((err: unknown) => {
        // A bug in the reload path: logged with its stack, and the daemon keeps serving its
        // connections (exiting would cut them all); the chain stays usable for the next SIGHUP.
        log.error({ err }, 'reload failed on an unexpected error (bug)');
        notifier.ready(`reload failed at ${new Date().toISOString()}`);
      });
  };
  process.on('SIGHUP', onHangup);

  const exitCode = await new Promise<number>((resolve) => {
    let signals = 0;
    const onStop = (signal: NodeJS.Signals): void => {
      signals++;
      if (signals > 1) {
        log.warn({ signal }, 'second stop signal: closing every connection now');
        running.cutShort?.();
        daemon.shutdown({ immediate: true }).catch((err: unknown) => log.error({ err }, 'immediate shutdown failed (bug)'));
        return;
      }
      // A reload in flight cannot commit once shutdown began (Daemon.reload checks after every
      // await); waiting for it here as well means the admin API it may restart is the one closed.
      void stop(running, signal)
        .then(() => reloading)
        .then(() => running.admin?.close())
        .then(
          () => resolve(0),
          (err: unknown) => {
            log.fatal({ err }, 'shutdown failed (bug)');
            resolve(70);
          },
        );
    };
    process.on('SIGTERM', onStop);
    process.on('SIGINT', onStop);
    stopHolding();
    for (const signal of held) process.emit(signal, signal);
  });
  process.off('SIGHUP', onHangup);
  await notifier.settled(); // STOPPING=1 reaches systemd before the process ends
  return exitCode;
}

const STOP_AND_RELOAD = ['SIGHUP', 'SIGTERM', 'SIGINT'] as const;

/** What the signal handlers share while the daemon runs. */
interface Running {
  readonly daemon: EventLoops;
  /** [process] threads as it was at start (a reload cannot change it). */
  readonly threads: number | 'auto';
  admin: AdminServer | null;
  readonly log: Logger;
  readonly notifier: Notifier;
  /** --log-level given: it wins over [logging] level, at start and on every reload. */
  readonly logLevelFromCli: boolean;
  /** Ends the shutdown_delay wait early (a second stop signal); null when not waiting. */
  cutShort: (() => void) | null;
}

async function stop(running: Running, signal: string): Promise<void> {
  const { daemon, log } = running;
  const { shutdownDelayMs, drainTimeoutMs } = daemon.config.shutdown;
  daemon.accepting = false; // /healthz says 503 from now on
  running.notifier.stopping(`stopping on ${signal}: draining`);
  log.info({ signal, shutdownDelayMs, drainTimeoutMs, open: daemon.openConnections }, 'stopping');
  if (shutdownDelayMs > 0) {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, Math.min(shutdownDelayMs, MAX_TIMER_MS));
      running.cutShort = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    running.cutShort = null;
  }
  const result = await daemon.shutdown({ drainTimeoutMs });
  log.info(result, 'stopped');
}

/** Re-reads the file and applies it to every thread, or to none; says which. */
async function reload(running: Running, file: string): Promise<'applied' | 'failed' | 'ignored'> {
  const { daemon, log } = running;
  const loaded = loadConfig(file);
  if (!loaded.ok) {
    for (const issue of loaded.issues) log.error({ path: issue.path, line: issue.line }, `reload rejected: ${formatIssue(issue)}`);
    daemon.metrics.reloaded(false);
    log.error({ problems: loaded.issues.length }, 'reload failed; the previous configuration stays in force');
    return 'failed';
  }
  const config = loaded.config;
  let changes;
  try {
    changes = await daemon.reload(config, { logLevel: running.logLevelFromCli ? undefined : config.logging.level });
  } catch (err) {
    if (err instanceof ShuttingDownError) {
      log.warn('reload ignored: the daemon is shutting down');
      return 'ignored';
    }
    daemon.metrics.reloaded(false);
    const message = err instanceof BindError ? bindFailureLine(err) : err instanceof Error ? err.message : String(err);
    log.error({ err: message }, 'reload failed; the previous configuration stays in force');
    return 'failed';
  }
  if (config.process.threads !== running.threads) {
    log.warn({ threads: config.process.threads, running: running.threads }, '[process] threads applies at start only; restart to change it');
  }
  await reapplyAdmin(running, config);
  log.info(changes, 'configuration reloaded');
  return 'applied';
}

/**
 * [admin] as the reloaded file says: started, moved or stopped. A new address is listened on
 * before the old one closes; the same address (or a unix path) is closed first and, if the
 * new listen fails, the old settings are restored so the API does not vanish on a bad reload.
 */
async function reapplyAdmin(running: Running, config: Config): Promise<void> {
  const { daemon, log } = running;
  const wanted = config.admin;
  const current = running.admin;
  if (current !== null && wanted !== null && current.listen.kind === wanted.kind && describeListen(current.listen) === describeListen(wanted)) return;
  if (wanted === null) {
    running.admin = null;
    await current?.close();
    if (current !== null) log.info('admin API stopped');
    return;
  }
  const sameSocket = current !== null && sameAdminAddress(current.listen, wanted);
  if (sameSocket) await current.close();
  try {
    running.admin = await startAdminServer(wanted, daemon);
    if (!sameSocket) await current?.close();
    log.info({ admin: running.admin.address }, 'admin API listening');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? String(err);
    log.error({ code, admin: describeListen(wanted) }, `admin API cannot listen on the reloaded address: ${code}`);
    if (sameSocket) {
      running.admin = await startAdminServer(current.listen, daemon).catch(() => null);
      if (running.admin === null) log.error('admin API stopped: its previous address could not be taken back');
    }
  }
}

function describeListen(listen: AdminListen): string {
  return listen.kind === 'unix' ? `unix:${listen.path}` : listen.address.text;
}

/** Two admin addresses that need the same socket: a unix path, or a TCP port on any host. */
function sameAdminAddress(a: AdminListen, b: AdminListen): boolean {
  if (a.kind === 'unix' || b.kind === 'unix') return a.kind === b.kind && describeListen(a) === describeListen(b);
  return a.address.port === b.address.port && a.address.port !== 0;
}

function describeAdmin(config: Config): string {
  return describeListen(config.admin!);
}

function servingStatus(config: Config): string {
  const n = config.listeners.length;
  return `serving ${n} listener${n === 1 ? '' : 's'}`;
}

/** The one line a failed bind prints: `listener "tls": cannot bind 127.0.0.1:8443: EADDRINUSE`, and what to do about EACCES. */
export function bindFailureLine(err: BindError): string {
  return `${err.message}${privilegedPortHint(err.code, err.address)}`;
}

/**
 * What to do when binding `address` failed with `code`: for EACCES on a port the kernel keeps
 * for privileged processes (below net.ipv4.ip_unprivileged_port_start, which covers IPv6 too;
 * 1024 by default), how to get it; '' for anything else.
 */
export function privilegedPortHint(code: string, address: string, unprivilegedPortStart = unprivilegedPortStartOf()): string {
  const port = /:(\d+)$/.exec(address);
  if (code !== 'EACCES' || port === null) return '';
  const n = Number(port[1]);
  if (n === 0 || n >= unprivilegedPortStart) return '';
  return ` (ports below ${unprivilegedPortStart} need root or the CAP_NET_BIND_SERVICE capability, which systemd/smartproxy.service grants; or use a port >= ${unprivilegedPortStart})`;
}

function unprivilegedPortStartOf(): number {
  try {
    const n = Number.parseInt(readFileSync('/proc/sys/net/ipv4/ip_unprivileged_port_start', 'utf8'), 10);
    return Number.isInteger(n) && n >= 0 ? n : 1024;
  } catch {
    return 1024; // not Linux, or no /proc: the classic rule
  }
}

/**
 * What the admin API reads. It listens before any listener is bound, so until the event loops
 * are up it answers as a daemon that does not accept yet: /healthz 503, /stats with no listeners
 * and `starting: true`, /metrics empty, /connections empty.
 */
export class AdminView implements AdminSource {
  daemon: EventLoops | null = null;

  constructor(
    readonly log: Logger,
    private readonly maxConnections: number,
  ) {}

  get accepting(): boolean {
    return this.daemon?.accepting ?? false;
  }

  get starting(): boolean {
    return this.daemon === null;
  }

  metricsText(): Promise<{ contentType: string; body: string }> {
    return this.daemon?.metricsText() ?? Promise.resolve({ contentType: 'text/plain; version=0.0.4; charset=utf-8', body: '' });
  }

  stats(): Promise<DaemonStats> {
    if (this.daemon !== null) return this.daemon.stats();
    const starting: DaemonStats & { readonly starting: true } = {
      version: VERSION,
      pid: process.pid,
      uptimeSeconds: Math.round(process.uptime()),
      accepting: false,
      active: 0,
      maxConnections: this.maxConnections,
      listeners: [],
      starting: true,
    };
    return Promise.resolve(starting);
  }

  connections(limit: number): Promise<{ total: number; connections: ConnectionInfo[] }> {
    return this.daemon?.connections(limit) ?? Promise.resolve({ total: 0, connections: [] });
  }

  backendViews(): Promise<BackendView[]> {
    return this.daemon?.backendViews() ?? Promise.resolve([]);
  }

  setBackendState(target: { backend: string; listener?: string; route?: string }, state: AdminState): Promise<BackendEntry[]> {
    return this.daemon?.setBackendState(target, state) ?? Promise.resolve([]);
  }
}

function installCrashHandlers(log: Logger): void {
  // An uncaught exception is a bug: log it with its stack, then exit non-zero.
  process.on('uncaughtException', (err) => {
    log.fatal({ err }, 'uncaught exception (bug)');
    process.exit(70);
  });
  process.on('unhandledRejection', (err) => {
    log.fatal({ err }, 'unhandled rejection (bug)');
    process.exit(70);
  });
}
