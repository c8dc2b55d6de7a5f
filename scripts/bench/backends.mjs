// The servers behind the proxies, one kind per scenario, all on the load cores. The nginx that
// serves requests here is a separate process from the nginx contender (own config, own prefix).
import net from 'node:net';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { failureOutput, runToCompletion, spawnChild, waitForListen } from './processes.mjs';

const SCRIPTS_DIR = new URL('.', import.meta.url).pathname;
export const TLS_SERVER_NAME = 'api.example.com';

/** @typedef {{ machine: ReturnType<typeof import('./machine.mjs').describeMachine>, tmpDir: string }} BenchContext */

/** A loopback port nobody listens on right now (the kernel picks it; we release it at once). */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: '127.0.0.1', port: 0 }, resolve);
  });
  const { port } = /** @type {net.AddressInfo} */ (server.address());
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/**
 * Writes `text` as an nginx main config under its own prefix directory and starts nginx in the
 * foreground with it. Used for the backends here and for the nginx contender.
 * @param {BenchContext} ctx
 * @param {string} name  also the prefix directory name
 * @param {string[]} prefix  core pinning and fd limit
 * @param {string} body  the config after the main-context lines we always set: `http {...}` or
 *   `stream {...}` (which loads the stream module first when this nginx has it as a module)
 */
export function startNginx(ctx, name, prefix, body, { workerProcesses = 1 } = {}) {
  const dir = join(ctx.tmpDir, name);
  mkdirSync(dir, { recursive: true });
  const configFile = join(dir, 'nginx.conf');
  const { nginxStreamModule, fdLimit } = ctx.machine;
  const text = [
    ...(body.startsWith('stream') && nginxStreamModule ? [`load_module ${nginxStreamModule};`] : []),
    'daemon off;',
    'master_process on;',
    `worker_processes ${workerProcesses};`,
    `worker_rlimit_nofile ${fdLimit};`,
    `pid ${join(dir, 'nginx.pid')};`,
    'error_log stderr warn;',
    'events { worker_connections 20000; }',
    body,
  ].join('\n');
  writeFileSync(configFile, text + '\n');
  // -e stderr: nginx opens its default error log before it reads the config.
  return spawnChild(name, [...prefix, ctx.machine.tools.nginx, '-e', 'stderr', '-p', dir + '/', '-c', configFile]);
}

/** nginx `return 200` (or a Node HTTP server without nginx) for the connect and keepalive scenarios. @param {BenchContext} ctx */
export async function startHttpBackend(ctx) {
  const port = await freePort();
  const { machine } = ctx;
  let child;
  let kind;
  if (machine.tools.nginx) {
    kind = `nginx ${machine.versions.nginx} return 200`;
    child = startNginx(
      ctx,
      'backend-http',
      machine.loadPrefix,
      `http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 10m;
  server {
    listen 127.0.0.1:${port} backlog=4096;
    location / { default_type text/plain; return 200 "ok\\n"; }
  }
}`,
    );
  } else {
    kind = 'node http server (nginx not installed)';
    child = spawnChild('backend-http', [...machine.loadPrefix, process.execPath, join(SCRIPTS_DIR, 'http-server.mjs'), '--port', String(port)]);
  }
  await waitForListen(port, { child, what: 'http backend' });
  return { port, kind, child };
}

/** iperf3 server for the throughput scenario. @param {BenchContext} ctx */
export async function startIperfBackend(ctx) {
  const port = await freePort();
  const child = spawnChild('backend-iperf3', [...ctx.machine.loadPrefix, ctx.machine.tools.iperf3, '-s', '-B', '127.0.0.1', '-p', String(port)]);
  await waitForListen(port, { child, what: 'iperf3 server' });
  return { port, kind: `iperf3 ${ctx.machine.versions.iperf3} server`, child };
}

/**
 * The accept-and-hold server of the idle scenario (and, with `echo`, the echo backend of the flood
 * scenario), with a view of how many connections it holds now and has accepted in total.
 * @param {BenchContext} ctx
 * @param {{ echo?: boolean }} [options]
 */
export async function startHoldBackend(ctx, { echo = false } = {}) {
  const port = await freePort();
  let held = 0;
  let accepted = 0;
  const argv = [...ctx.machine.loadPrefix, process.execPath, join(SCRIPTS_DIR, 'hold-server.mjs'), '--port', String(port), ...(echo ? ['--echo'] : [])];
  const child = spawnChild('backend-hold', argv, {
    onLine: (line) => {
      const match = /^held (\d+) accepted (\d+)$/.exec(line);
      if (!match) return;
      held = Number(match[1]);
      accepted = Number(match[2]);
    },
  });
  await waitForListen(port, { child, what: 'hold server' });
  /** Resolves true once the held count satisfies `predicate`, false at the deadline. */
  const waitUntil = async (predicate, timeoutMs) => {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (predicate(held)) return true;
      if (!child.isRunning()) throw new Error(`hold server exited: ${failureOutput(child)}`);
      await sleep(50);
    }
    return predicate(held);
  };
  const kind = echo ? 'node accept-and-echo server' : 'node accept-and-hold server';
  return { port, kind, child, held: () => held, accepted: () => accepted, waitUntil };
}

/**
 * A self-signed P-256 certificate for the TLS scenario, generated into the temp dir.
 * @param {BenchContext} ctx
 */
export async function makeCertificate(ctx) {
  const cert = join(ctx.tmpDir, 'tls-cert.pem');
  const key = join(ctx.tmpDir, 'tls-key.pem');
  await runToCompletion(
    'openssl req',
    [ctx.machine.tools.openssl, 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1', '-subj', `/CN=${TLS_SERVER_NAME}`, '-keyout', key, '-out', cert],
    20000,
  );
  return { cert, key };
}

/**
 * TLS-terminating backend for the tls scenario: nginx `ssl` (http, which every nginx build has
 * built in) or a Node tls server without nginx. Session cache and tickets off: every handshake
 * is a full one.
 * @param {BenchContext} ctx
 */
export async function startTlsBackend(ctx) {
  const { cert, key } = await makeCertificate(ctx);
  const port = await freePort();
  const { machine } = ctx;
  let child;
  let kind;
  if (machine.tools.nginx) {
    kind = `nginx ${machine.versions.nginx} ssl`;
    child = startNginx(
      ctx,
      'backend-tls',
      machine.loadPrefix,
      `http {
  access_log off;
  server {
    listen 127.0.0.1:${port} ssl backlog=4096;
    ssl_certificate ${cert};
    ssl_certificate_key ${key};
    ssl_session_cache off;
    ssl_session_tickets off;
    location / { default_type text/plain; return 200 "ok\\n"; }
  }
}`,
    );
  } else {
    kind = 'node tls server (nginx not installed)';
    child = spawnChild('backend-tls', [...machine.loadPrefix, process.execPath, join(SCRIPTS_DIR, 'tls-server.mjs'), '--port', String(port), '--cert', cert, '--key', key]);
  }
  await waitForListen(port, { child, what: 'tls backend' });
  return { port, kind, child };
}
