// `smartproxy status`: fetches /stats from the admin API and prints a readable table.
import http from 'node:http';
import { formatIssue, loadConfig } from '../config/load.ts';
import type { BackendView } from '../backends/supervisor.ts';
import type { DaemonStats } from './stats.ts';
import { formatHostPort } from '../config/units.ts';

export interface StatusOptions {
  readonly config?: string;
  readonly admin?: string;
  readonly watch?: boolean;
}

type Target = { socketPath: string } | { host: string; port: number };

/**
 * Prints the status once (or every second with --watch); resolves with the exit code. When the
 * daemon stops answering, --watch keeps the last table on screen with an error line under it and
 * goes on trying.
 */
export async function status(opts: StatusOptions): Promise<number> {
  const target = resolveTarget(opts);
  if (typeof target === 'string') {
    process.stderr.write(`smartproxy status: ${target}\n`);
    return 1;
  }
  if (!opts.watch) {
    try {
      process.stdout.write(renderStatus(await fetchStats(target)));
      return 0;
    } catch (err) {
      process.stderr.write(`smartproxy status: cannot reach the admin API: ${(err as Error).message}\n`);
      return 1;
    }
  }
  let last: { text: string; at: Date } | null = null;
  for (;;) {
    let frame: string;
    try {
      last = { text: renderStatus(await fetchStats(target)), at: new Date() };
      frame = last.text;
    } catch (err) {
      frame = watchErrorFrame(last, (err as Error).message, describeTarget(target), new Date());
    }
    // One write per frame: clear, then draw, so the screen is never seen half-drawn.
    process.stdout.write(`${CLEAR_SCREEN}${frame}`);
    await new Promise((r) => setTimeout(r, 1000));
  }
}

const CLEAR_SCREEN = '\x1b[2J\x1b[H';

/** A --watch frame when the admin API did not answer: the last table (if any), then the error. */
export function watchErrorFrame(last: { text: string; at: Date } | null, error: string, where: string, now: Date): string {
  const since = last === null ? '' : `; table from ${last.at.toTimeString().slice(0, 8)}, ${Math.round((now.getTime() - last.at.getTime()) / 1000)}s ago`;
  const line = `smartproxy status: cannot reach the admin API at ${where}: ${error}${since}; retrying every second`;
  return last === null ? `${line}\n` : `${last.text}\n${line}\n`;
}

function describeTarget(target: Target): string {
  return 'socketPath' in target ? `unix:${target.socketPath}` : formatHostPort(target.host, target.port);
}

function resolveTarget(opts: StatusOptions): Target | string {
  let address = opts.admin;
  if (address === undefined) {
    const file = opts.config ?? '/etc/smartproxy/proxy.toml';
    const loaded = loadConfig(file);
    if (!loaded.ok) return `${file}: ${loaded.issues.map(formatIssue).join('; ')}`;
    const admin = loaded.config.admin;
    if (admin === null) return `${file} has no [admin] listen address; pass --admin`;
    address = admin.kind === 'unix' ? `unix:${admin.path}` : admin.address.text;
  }
  if (address.startsWith('unix:')) return { socketPath: address.slice(5) };
  const match = /^\[?([^\]]+?)\]?:(\d+)$/.exec(address);
  if (match === null) return `--admin ${address}: expected host:port or unix:/path`;
  return { host: match[1]!, port: Number(match[2]) };
}

function fetchStats(target: Target): Promise<DaemonStats> {
  return new Promise((resolve, reject) => {
    const req = http.get({ ...target, path: '/stats', timeout: 3000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => {
        try {
          resolve(JSON.parse(body) as DaemonStats);
        } catch {
          reject(new Error(`unexpected answer (HTTP ${res.statusCode})`));
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
  });
}

/** The table `status` prints; exported for tests. */
export function renderStatus(stats: DaemonStats): string {
  const lines: string[] = [];
  const cap = stats.maxConnections > 0 ? `/${stats.maxConnections}` : '';
  // `starting` is set by a daemon whose admin API answers before its listeners are bound (serve.ts).
  const state = stats.accepting ? 'accepting' : (stats as { starting?: boolean }).starting === true ? 'STARTING' : 'DRAINING';
  lines.push(`smartproxy ${stats.version}  pid ${stats.pid}  up ${stats.uptimeSeconds}s  ${state}  connections ${stats.active}${cap}`);
  if (stats.cluster !== undefined) lines.push(`cluster store ${stats.cluster.mode === 'ok' ? 'ok' : 'DEGRADED (on_store_failure applies)'}  connections counted in it ${stats.cluster.leases}`);
  lines.push('');
  const rows = [['LISTENER', 'BIND', 'WORKERS', 'QUEUE', 'ACTIVE', 'CLIENTS', 'REJECTED']];
  for (const l of stats.listeners) {
    const rejected = Object.values(l.rejections).reduce((a, b) => a + b, 0);
    rows.push([
      l.draining ? `${l.name} (draining)` : l.name,
      l.bind.join(',') || '-',
      `${l.busy}/${l.workers}`,
      `${l.queued}/${l.queue}`,
      String(l.active),
      String(l.trackedClients),
      String(rejected),
    ]);
  }
  lines.push(...table(rows));
  for (const l of stats.listeners) {
    const reasons = Object.entries(l.rejections).filter(([, n]) => n > 0);
    if (reasons.length > 0) lines.push('', `${l.name} rejections: ${reasons.map(([r, n]) => `${r} ${n}`).join(', ')}`);
    const routes = l.routes.map((r) => `${r.name} ${r.active}`).join(', ');
    lines.push(`${l.name} routes: ${routes}`);
    if (l.topClients.length > 0) lines.push(`${l.name} top clients: ${l.topClients.slice(0, 10).map((c) => `${c.client} x${c.active}`).join(', ')}`);
  }
  const backends = (stats as { backends?: BackendView[] }).backends ?? [];
  if (backends.length > 0) {
    lines.push('');
    const rows = [['BACKEND', 'ROUTE', 'HEALTH', 'STATE', 'ACTIVE', 'LAST CHECK', 'SINCE']];
    for (const b of backends) {
      const check = b.lastCheck === null ? '-' : b.lastCheck.ok ? `ok ${b.lastCheck.ms}ms` : `failed: ${b.lastCheck.reason}`;
      rows.push([`${b.backend}${b.backup ? ' (backup)' : ''}`, `${b.listener}/${b.route}`, `${b.health}${b.slowStartUntil != null ? ' (slow start)' : ''}`, b.state, String(b.active), check, b.since.slice(0, 19)]);
    }
    lines.push(...table(rows));
  }
  return `${lines.join('\n')}\n`;
}

function table(rows: string[][]): string[] {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((cell, i) => cell.padEnd(widths[i]!)).join('  ').trimEnd());
}
