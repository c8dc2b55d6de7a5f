// systemd's readiness protocol (sd_notify(3)) for the unit's Type=notify: READY=1 once every
// listener is bound and the admin API listens, RELOADING=1 and then READY=1 around each reload
// (whether it succeeded or not), STOPPING=1 when shutdown begins. Only when systemd set
// $NOTIFY_SOCKET; otherwise every call does nothing.
//
// Node cannot send an AF_UNIX datagram, so each message is sent by systemd-notify(1), the tool
// systemd ships for programs that cannot call sd_notify() themselves. The race its man page
// warns about (the sender exits before the service manager has read the message, which then
// cannot be attributed to the unit and is dropped) is closed since systemd 246: without
// --no-block, systemd-notify waits (sd_notify_barrier) until the manager has read the message
// before it exits. The sender is a child of this process, not the main process, so the unit
// needs NotifyAccess=all. No --pid: the main PID already is this process (the unit runs node
// directly), and sending as another PID needs privileges the unit does not grant.
import { spawn } from 'node:child_process';
import type { Logger } from './logging/logger.ts';

/** What the daemon tells systemd; every method is a no-op outside a Type=notify unit. */
export interface Notifier {
  /** Start-up or a reload is finished (success or not); `status` is shown by `systemctl status`. */
  ready(status: string): void;
  /** A reload begins (SIGHUP). */
  reloading(): void;
  /** Shutdown begins; later ready() and reloading() calls are dropped. */
  stopping(status: string): void;
  /** Resolves once every message queued so far has been handed over (or failed). */
  settled(): Promise<void>;
}

export interface NotifierOptions {
  readonly env?: NodeJS.ProcessEnv;
  /** The program that sends one message (tests may point elsewhere). */
  readonly command?: string;
}

/** A Notifier for this process: systemd-notify when $NOTIFY_SOCKET is set, else a no-op. */
export function systemdNotifier(log: Logger, opts: NotifierOptions = {}): Notifier {
  const env = opts.env ?? process.env;
  const socket = env.NOTIFY_SOCKET;
  if (socket === undefined || socket === '') return NO_NOTIFIER;
  return new SystemdNotify(log, opts.command ?? 'systemd-notify', env);
}

const NO_NOTIFIER: Notifier = {
  ready: () => undefined,
  reloading: () => undefined,
  stopping: () => undefined,
  settled: () => Promise.resolve(),
};

class SystemdNotify implements Notifier {
  /** Messages go one at a time: a RELOADING=1 must never overtake the READY=1 before it. */
  private queue = Promise.resolve();
  private stopped = false;

  constructor(
    private readonly log: Logger,
    private readonly command: string,
    private readonly env: NodeJS.ProcessEnv,
  ) {}

  ready(status: string): void {
    if (!this.stopped) this.send(['READY=1', `STATUS=${status}`]);
  }

  reloading(): void {
    // MONOTONIC_USEC (CLOCK_MONOTONIC, which is process.hrtime's clock on Linux) is what
    // sd_notify(3) asks to accompany RELOADING=1 since systemd 253; older managers ignore it.
    if (!this.stopped) this.send(['RELOADING=1', `MONOTONIC_USEC=${process.hrtime.bigint() / 1000n}`, 'STATUS=reloading']);
  }

  stopping(status: string): void {
    if (this.stopped) return;
    this.stopped = true;
    this.send(['STOPPING=1', `STATUS=${status}`]);
  }

  settled(): Promise<void> {
    return this.queue;
  }

  private send(fields: string[]): void {
    this.queue = this.queue.then(() => this.sendNow(fields));
  }

  /** One systemd-notify run; never rejects (a failure is a warning: systemd will time the start out). */
  private sendNow(fields: string[]): Promise<void> {
    return new Promise((resolve) => {
      let done = false;
      let stderr = '';
      const finish = (problem: string | null): void => {
        if (done) return;
        done = true;
        if (problem !== null) this.log.warn({ message: fields[0], command: this.command }, `cannot notify systemd (${fields[0]}): ${problem}`);
        resolve();
      };
      const child = spawn(this.command, fields, { env: this.env, stdio: ['ignore', 'ignore', 'pipe'] });
      child.on('error', (err) => finish(err.message));
      child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
      child.on('close', (code, signal) => finish(code === 0 ? null : `${this.command} exited ${code ?? signal}${stderr === '' ? '' : `: ${stderr.trim()}`}`));
    });
  }
}
