// The process logger: JSON lines on stdout (systemd/journald style), pretty on a TTY.
import { pino, type Logger } from 'pino';
import pretty from 'pino-pretty';

export type { Logger };
export type LogFormat = 'json' | 'pretty';
export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error' | 'fatal' | 'silent';

export interface LoggerOptions {
  readonly level: LogLevel;
  /** Default: pretty when stdout is a TTY. */
  readonly format?: LogFormat;
  /** Where lines go; tests pass a stream to read them back. */
  readonly destination?: NodeJS.WritableStream;
  /** Fields on every line besides pid (an event-loop thread adds its number). */
  readonly base?: Record<string, unknown>;
}

/** Builds the one logger the daemon passes down. Synchronous writes: a crash never loses its last line. */
export function createLogger(opts: LoggerOptions): Logger {
  const format = opts.format ?? (process.stdout.isTTY ? 'pretty' : 'json');
  // The level as its name ("level":"info"), as journald readers and log shippers expect, not pino's number.
  const base = {
    level: opts.level,
    base: { pid: process.pid, ...opts.base },
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label: string) => ({ level: label }) },
  };
  if (format === 'pretty') {
    return pino(base, pretty({ colorize: process.stdout.isTTY === true, sync: true, destination: opts.destination ?? 1 }));
  }
  return pino(base, opts.destination ?? pino.destination({ dest: 1, sync: true }));
}

/** A logger that writes nothing, for tests and library use. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
