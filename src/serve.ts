// `smartproxy serve`: load, bind, run until a signal. SIGHUP reloads, SIGTERM/SIGINT drain and
// exit 0, a second SIGTERM/SIGINT closes everything at once.
import { formatIssue, loadConfig } from './config/load.ts';
import type { Config } from './config/types.ts';
import { Daemon } from './daemon.ts';
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
  const log = createLogger({ level: opts.logLevel ?? config.logging.level, format: opts.logFormat });
  installCrashHandlers(log);
  // Until the real handlers are installed below, a SIGHUP (default action: terminate; systemd
  // does not restart after it) or a SIGTERM during start-up would kill the process: hold them
  // and replay them once running.
  const held: NodeJS.Signals[] = [];
  const hold = (signal: NodeJS.Signals): void => void held.push(signal);
  const stopHolding = (): void => {
    for (const signal of STOP_AND_RELOAD) process.off(signal, hold);
  };
  for (const signal of STOP_AND_RELOAD) process.on(signal, hold);

  let daemon: Daemon;
  try {
    daemon = await Daemon.start(config, log);
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

  let reloading = Promise.resolve();
  const onHangup = (): void => {
    // Reloads run one after another; ten HUPs in a second end in the last file's config.
    reloading = reloading.then(() => reload(daemon, opts.configFile, log));
  };
  process.on('SIGHUP', onHangup);

  const exitCode = await new Promise<number>((resolve) => {
    let signals = 0;
    const onStop = (signal: NodeJS.Signals): void => {
      signals++;
      if (signals > 1) {
        log.warn({ signal }, 'second stop signal: closing every connection now');
        void daemon.shutdown({ immediate: true });
        return;
      }
      void stop(daemon, admin, log, signal).then(() => resolve(0));
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

async function stop(daemon: Daemon, admin: AdminServer | null, log: Logger, signal: string): Promise<void> {
  const { shutdownDelayMs, drainTimeoutMs } = daemon.config.shutdown;
  daemon.accepting = false; // /healthz says 503 from now on
  log.info({ signal, shutdownDelayMs, drainTimeoutMs, open: daemon.registry.size }, 'stopping');
  if (shutdownDelayMs > 0) await new Promise((r) => setTimeout(r, shutdownDelayMs));
  const result = await daemon.shutdown({ drainTimeoutMs });
  await admin?.close();
  log.info(result, 'stopped');
}

async function reload(daemon: Daemon, file: string, log: Logger): Promise<void> {
  const loaded = loadConfig(file);
  if (!loaded.ok) {
    for (const issue of loaded.issues) log.error({ path: issue.path }, `reload rejected: ${formatIssue(issue)}`);
    daemon.metrics.reloaded(false);
    log.error({ problems: loaded.issues.length }, 'reload failed; the previous configuration stays in force');
    return;
  }
  try {
    const changes = await daemon.reload(loaded.config);
    log.info(changes, 'configuration reloaded');
  } catch (err) {
    daemon.metrics.reloaded(false);
    log.error({ err: err instanceof Error ? err.message : String(err) }, 'reload failed; the previous configuration stays in force');
  }
}

function describeAdmin(config: Config): string {
  const admin = config.admin!;
  return admin.kind === 'unix' ? `unix:${admin.path}` : admin.address.text;
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
