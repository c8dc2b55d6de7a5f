// `smartproxy serve`: load, bind, run until a signal. SIGHUP reloads, SIGTERM/SIGINT drain and
// exit 0, a second SIGTERM/SIGINT closes everything at once. This is the main thread: it owns the
// config, the signals, reload, drain and the admin API; the listeners and their connections run
// in `[process] threads` event-loop threads (event-loops.ts, thread.ts).
import { formatIssue, loadConfig } from './config/load.ts';
import type { AdminListen, Config } from './config/types.ts';
import { ShuttingDownError } from './daemon.ts';
import { EventLoops } from './event-loops.ts';
import { VERSION } from './metrics.ts';
import { MAX_TIMER_MS } from './config/units.ts';
import { BindError } from './listener/listener.ts';
import { createLogger, type LogFormat, type LogLevel, type Logger } from './logging/logger.ts';
import { startAdminServer, type AdminServer } from './admin/server.ts';
import { fdLimitWarning } from './fd-limit.ts';

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

  let daemon: EventLoops;
  try {
    daemon = await EventLoops.start(config, log, { logLevel: opts.logLevel ?? config.logging.level, logFormat });
  } catch (err) {
    if (err instanceof BindError) {
      log.error({ listener: err.listener, address: err.address, code: err.code }, err.message);
      process.stderr.write(`smartproxy: ${err.message}\n`);
      stopHolding();
      return 1;
    }
    throw err;
  }
  const fdWarning = fdLimitWarning(config);
  if (fdWarning !== null) log.warn(fdWarning.fields, fdWarning.message);

  let admin: AdminServer | null = null;
  if (config.admin !== null) {
    try {
      admin = await startAdminServer(config.admin, daemon);
      log.info({ admin: admin.address }, 'admin API listening');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? String(err);
      log.error({ code }, `admin API cannot listen: ${code}`);
      process.stderr.write(`smartproxy: admin API cannot listen on ${describeAdmin(config)}: ${code}\n`);
      await daemon.shutdown({ immediate: true });
      stopHolding();
      return 1;
    }
  }

  const running: Running = { daemon, threads: config.process.threads, admin, log, logLevelFromCli: opts.logLevel !== undefined, cutShort: null };
  let reloading = Promise.resolve();
  const onHangup = (): void => {
    // Reloads run one after another; ten HUPs in a second end in the last file's config.
    reloading = reloading.then(() => reload(running, opts.configFile));
  };
  process.on('SIGHUP', onHangup);

  const exitCode = await new Promise<number>((resolve) => {
    let signals = 0;
    const onStop = (signal: NodeJS.Signals): void => {
      signals++;
      if (signals > 1) {
        log.warn({ signal }, 'second stop signal: closing every connection now');
        running.cutShort?.();
        void daemon.shutdown({ immediate: true });
        return;
      }
      // A reload in flight cannot commit once shutdown began (Daemon.reload checks after every
      // await); waiting for it here as well means the admin API it may restart is the one closed.
      void stop(running, signal)
        .then(() => reloading)
        .then(() => running.admin?.close())
        .then(() => resolve(0));
    };
    process.on('SIGTERM', onStop);
    process.on('SIGINT', onStop);
    stopHolding();
    for (const signal of held) process.emit(signal, signal);
  });
  process.off('SIGHUP', onHangup);
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
  /** --log-level given: it wins over [logging] level, at start and on every reload. */
  readonly logLevelFromCli: boolean;
  /** Ends the shutdown_delay wait early (a second stop signal); null when not waiting. */
  cutShort: (() => void) | null;
}

async function stop(running: Running, signal: string): Promise<void> {
  const { daemon, log } = running;
  const { shutdownDelayMs, drainTimeoutMs } = daemon.config.shutdown;
  daemon.accepting = false; // /healthz says 503 from now on
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

async function reload(running: Running, file: string): Promise<void> {
  const { daemon, log } = running;
  const loaded = loadConfig(file);
  if (!loaded.ok) {
    for (const issue of loaded.issues) log.error({ path: issue.path }, `reload rejected: ${formatIssue(issue)}`);
    daemon.metrics.reloaded(false);
    log.error({ problems: loaded.issues.length }, 'reload failed; the previous configuration stays in force');
    return;
  }
  const config = loaded.config;
  let changes;
  try {
    changes = await daemon.reload(config);
  } catch (err) {
    if (err instanceof ShuttingDownError) {
      log.warn('reload ignored: the daemon is shutting down');
      return;
    }
    daemon.metrics.reloaded(false);
    log.error({ err: err instanceof Error ? err.message : String(err) }, 'reload failed; the previous configuration stays in force');
    return;
  }
  if (!running.logLevelFromCli) await daemon.setLogLevel(config.logging.level);
  if (config.process.threads !== running.threads) {
    log.warn({ threads: config.process.threads, running: running.threads }, '[process] threads applies at start only; restart to change it');
  }
  await reapplyAdmin(running, config);
  log.info(changes, 'configuration reloaded');
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
