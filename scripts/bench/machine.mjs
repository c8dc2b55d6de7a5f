// What this machine offers the benchmark: tools, versions, cores, and the command prefixes that
// pin a process to its cores and raise its file-descriptor limit.
import { execFileSync, spawnSync } from 'node:child_process';
import { accessSync, constants, existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { availableParallelism } from 'node:os';

// libnginx-mod-stream: Debian builds nginx's stream module (the nginx contender) as a separate package.
export const INSTALL_LINE = 'apt-get install -y haproxy nginx libnginx-mod-stream wrk iperf3 openssl';

/** Descriptors we ask for: 9,000 proxied connections take two sockets each, with room to spare. */
const WANTED_FD_LIMIT = 200000;

/** Absolute path of `command` on PATH (or in /usr/sbin, where haproxy and nginx live), or null. */
export function findTool(command) {
  for (const dir of [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin']) {
    if (!dir) continue;
    try {
      accessSync(`${dir}/${command}`, constants.X_OK);
      return `${dir}/${command}`;
    } catch {
      // not in this directory
    }
  }
  return null;
}

/** stdout and stderr together: nginx prints its version on stderr, the others on stdout. */
function outputOf(argv) {
  const result = spawnSync(argv[0], argv.slice(1), { encoding: 'utf8', timeout: 5000 });
  return `${result.stdout ?? ''}${result.stderr ?? ''}`;
}

function versionOf(argv, pattern) {
  return pattern.exec(outputOf(argv))?.[1] ?? 'unknown';
}

/**
 * The `load_module` path nginx needs for `stream {}` ('' when built in), or null when this nginx
 * has no stream module (Debian ships it apart, in libnginx-mod-stream).
 */
function nginxStreamModule(nginx) {
  const configure = outputOf([nginx, '-V']);
  if (/--with-stream(\s|$)/.test(configure)) return '';
  if (!/--with-stream=dynamic/.test(configure)) return null;
  const modulesPath = /--modules-path=(\S+)/.exec(configure)?.[1] ?? '/usr/lib/nginx/modules';
  const file = join(modulesPath, 'ngx_stream_module.so');
  return existsSync(file) ? file : null;
}

/** Probes the machine once; `threads` sets where the proxy and the load run (see placement()). */
export function describeMachine({ threads = 1 } = {}) {
  const tools = {
    haproxy: findTool('haproxy'),
    nginx: findTool('nginx'),
    wrk: findTool('wrk'),
    iperf3: findTool('iperf3'),
    openssl: findTool('openssl'),
    taskset: findTool('taskset'),
    prlimit: findTool('prlimit'),
  };
  const cores = availableParallelism();
  const cpuModel = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? 'unknown';
  const kernel = readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim();
  const versions = {
    node: process.version,
    haproxy: tools.haproxy ? versionOf([tools.haproxy, '-v'], /HAProxy version (\S+)/) : null,
    nginx: tools.nginx ? versionOf([tools.nginx, '-v'], /nginx\/(\S+)/) : null,
    wrk: tools.wrk ? versionOf([tools.wrk, '--version'], /wrk (\S+)/) : null,
    iperf3: tools.iperf3 ? versionOf([tools.iperf3, '--version'], /iperf (\S+)/) : null,
    openssl: tools.openssl ? versionOf([tools.openssl, 'version'], /OpenSSL (\S+)/) : null,
  };

  const fdLimit = raisableFdLimit(tools.prlimit);
  const machine = {
    tools,
    cores,
    cpuModel,
    kernel,
    versions,
    /** The open-files limit every child gets (soft = hard). */
    fdLimit,
    wantedFdLimit: WANTED_FD_LIMIT,
    /** See nginxStreamModule(). */
    nginxStreamModule: tools.nginx ? nginxStreamModule(tools.nginx) : null,
  };
  return Object.assign(machine, placement(machine, threads));
}

/**
 * Where the proxy under test and the load run when the proxy has `threads` threads (or worker
 * processes): the proxy alone on cores 0..k-1 with k = min(threads, cores - 1), the backends and
 * load generators on the others. At least one core always stays with the load, so on a 2-core
 * machine the proxy gets core 0 whatever `threads` is, and its threads share that core.
 * @param {{ cores: number, tools: Record<string, string | null>, fdLimit: number }} machine
 * @param {number} threads
 */
export function placement(machine, threads) {
  const { cores, tools, fdLimit } = machine;
  const pinned = cores >= 2 && tools.taskset !== null;
  const proxyCoreCount = pinned ? Math.max(1, Math.min(threads, cores - 1)) : cores;
  const range = (from, to) => (from === to ? String(from) : `${from}-${to}`);
  const proxyCores = range(0, proxyCoreCount - 1);
  const loadCores = range(proxyCoreCount, cores - 1);
  const fdPrefix = tools.prlimit ? [tools.prlimit, `--nofile=${fdLimit}:${fdLimit}`] : [];
  return {
    pinned,
    threads,
    /** Cores the proxy under test may use (all of them when not pinned). */
    proxyCoreCount,
    proxyCores: pinned ? proxyCores : null,
    loadCores: pinned ? loadCores : null,
    /** Prefix for the proxy under test: its cores, and descriptors for the idle scenario. */
    proxyPrefix: [...(pinned ? [tools.taskset, '-c', proxyCores] : []), ...fdPrefix],
    /** Prefix for backends and load generators: the other cores. */
    loadPrefix: [...(pinned ? [tools.taskset, '-c', loadCores] : []), ...fdPrefix],
  };
}

/**
 * WANTED_FD_LIMIT when prlimit may set it (root, outside a restricting container); otherwise our
 * own hard limit, which any process may take up to.
 */
function raisableFdLimit(prlimit) {
  if (prlimit) {
    try {
      execFileSync(prlimit, [`--nofile=${WANTED_FD_LIMIT}:${WANTED_FD_LIMIT}`, 'true'], { stdio: 'ignore', timeout: 5000 });
      return WANTED_FD_LIMIT;
    } catch {
      // not permitted here: fall back to the hard limit
    }
  }
  const hard = /^Max open files\s+\S+\s+(\S+)/m.exec(readFileSync('/proc/self/limits', 'utf8'))?.[1];
  return hard === undefined || hard === 'unlimited' ? WANTED_FD_LIMIT : Number(hard);
}

/** Moves this orchestrating process off the proxy's core, so its polling never competes with it. */
export function pinSelf(machine) {
  if (!machine.pinned) return;
  try {
    execFileSync(machine.tools.taskset, ['-a', '-pc', machine.loadCores, String(process.pid)], { stdio: 'ignore' });
  } catch {
    // Not fatal: the orchestrator is idle while a run is measured.
  }
}
