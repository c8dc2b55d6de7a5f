// The config owner's side of backends (the main thread with [process] threads, or the daemon that
// is the process's only event loop): resolves backend host names, assigns every backend its state
// index, runs the active health checks and applies the operator's runtime states. It writes into
// the shared states, which every thread reads when it picks, and publishes new resolutions.
//
// A backend (listener/route/address) that enters the config, or comes back, starts up and ready.
// One whose settings a reload changes starts ready again: a runtime state lasts until then.
// Checks are shared: a backend address checked with the same definition by several routes is
// checked once, and the result applies to each of them.
import type { Config, HealthCheckConfig, ListenerConfig, RouteConfig } from '../config/types.ts';
import type { CountIndexes } from '../governance/shared-counts.ts';
import type { Logger } from '../logging/logger.ts';
import type { Metrics } from '../metrics.ts';
import { writeProxyHeaderV2Local } from '../proxy-protocol/write.ts';
import { ipFamily } from '../config/units.ts';
import { backendKey, routeAddresses } from './backend-pool.ts';
import { MAX_BACKENDS, type AdminState, type SharedBackendStates } from './backend-states.ts';
import { BackendDirectory, type BackendUpdate } from './directory.ts';
import { HealthChecker, type CheckDefinition, type CheckResult } from './health-check.ts';
import { BackendResolver, type ResolvedAddresses } from './resolver.ts';

/** One backend of the config in force, as the admin API and /stats see it. */
export interface BackendEntry {
  readonly listener: string;
  readonly route: string;
  /** The address dialled. */
  readonly backend: string;
  /** The `backends` entry it comes from (a host name for a resolved address). */
  readonly configured: string;
  readonly index: number;
}

export interface BackendView extends BackendEntry {
  /** "up", "down" (checks), "ejected" (passive), and the runtime state. */
  readonly health: 'up' | 'down' | 'ejected';
  readonly state: AdminState;
  readonly active: number;
  readonly weight: number;
  readonly backup: boolean;
  readonly lastCheck: { readonly ok: boolean; readonly reason: string | null; readonly ms: number } | null;
  /** ISO time of the last health change (checks), or of when it entered the config. */
  readonly since: string;
  readonly ejectedUntil: string | null;
}

export interface SupervisorOptions {
  readonly states: SharedBackendStates;
  readonly indexes: CountIndexes;
  readonly log: Logger;
  readonly metrics: Metrics;
  /** A resolution changed some route's members: every thread must take it. */
  readonly publish: (update: BackendUpdate) => void;
}

interface Checked {
  readonly entries: BackendEntry[];
}

export class BackendSupervisor {
  readonly directory: BackendDirectory;
  private readonly opts: SupervisorOptions;
  private config: Config | null = null;
  /**
   * A config prepared and not yet committed. Its host names are watched already, and an answer
   * that changes before the commit must reach the routes the threads compiled from the older one.
   */
  private pending: Config | null = null;
  /** A resolution changed while `pending` waited: commit() publishes the answers again. */
  private changedWhilePending = false;
  private resolver: BackendResolver | null = null;
  private resolverSettings = '';
  /** The resolver in force while a prepared reload with other [dns] settings waits for its commit. */
  private previousResolver: { readonly resolver: BackendResolver; readonly settings: string } | null = null;
  private readonly checker: HealthChecker;
  /** Check key -> the backends its result applies to. */
  private checked = new Map<string, Checked>();
  /** Backend key -> the settings it entered with (a change resets its runtime state). */
  private live = new Map<string, string>();
  /** Backend key -> when it entered the config or its health last changed. */
  private readonly since = new Map<string, number>();
  /**
   * Backend key -> when it left the config (a reload, or an address a name no longer resolves
   * to). Its index is given back once it has been gone RECYCLE_AFTER_MS with no connection left,
   * so a name whose addresses rotate (a cloud load balancer) never uses up the indexes.
   */
  private readonly gone = new Map<string, number>();
  private closed = false;

  constructor(opts: SupervisorOptions) {
    this.opts = opts;
    this.directory = new BackendDirectory(opts.states, opts.indexes);
    this.checker = new HealthChecker({
      onResult: (key, result) => this.onCheckResult(key, result),
      onChange: (key, up, result, streak) => this.onCheckChange(key, up, result, streak),
    });
  }

  /**
   * First half of start-up or a reload: resolves every backend host name of `config` (each
   * within `[dns] timeout`) and assigns every backend an index. Changes nothing in force; the
   * returned update goes to every thread with the config. Throws when the indexes are used up.
   */
  async prepare(config: Config): Promise<BackendUpdate> {
    const resolver = this.resolverFor(config);
    const hosts = hostNames(config);
    const answers = await Promise.all([...hosts].map(async (host) => [host, await resolver.watch(host)] as const));
    for (const [host, answer] of answers) {
      if (answer.addresses.length === 0) this.opts.log.warn({ host, error: answer.error }, `backend host ${host} does not resolve; its backends are left out until it does`);
      this.directory.resolved.set(host, answer.addresses);
    }
    const full = this.directory.indexes.assignBackends(this.directory.keysOf(config), MAX_BACKENDS);
    if (full !== null) {
      this.abort(); // the resolver in force stays (the caller may not abort a prepare that threw)
      throw new Error(full);
    }
    this.pending = config;
    this.changedWhilePending = false;
    return this.directory.update();
  }

  /** Second half: `config` is in force in every thread. */
  commit(config: Config): void {
    this.config = config;
    this.pending = null;
    this.previousResolver?.resolver.close();
    this.previousResolver = null;
    this.resolver?.retain(hostNames(config));
    for (const host of [...this.directory.resolved.keys()]) if (!hostNames(config).has(host)) this.directory.resolved.delete(host);
    this.refresh();
    // The threads compiled this config's routes from the answers prepare() returned; one that
    // changed since would otherwise stay unused until the name's next change.
    if (this.changedWhilePending) {
      this.changedWhilePending = false;
      this.opts.publish(this.directory.update());
    }
  }

  /** A prepared config that will not be committed: stop resolving names only it had. */
  abort(): void {
    this.pending = null;
    this.changedWhilePending = false;
    // Other [dns] settings were prepared: the config in force keeps its own resolver.
    if (this.previousResolver !== null) {
      this.resolver?.close();
      this.resolver = this.previousResolver.resolver;
      this.resolverSettings = this.previousResolver.settings;
      this.previousResolver = null;
    }
    if (this.config !== null) this.resolver?.retain(hostNames(this.config));
  }

  private resolverFor(config: Config): BackendResolver {
    const settings = JSON.stringify(config.dns);
    if (this.resolver !== null && settings === this.resolverSettings) return this.resolver;
    // The resolver in force keeps re-resolving the names in force until the commit (closed
    // there, or back in force at an abort). One prepared earlier and not committed goes.
    if (this.previousResolver === null && this.resolver !== null) this.previousResolver = { resolver: this.resolver, settings: this.resolverSettings };
    else this.resolver?.close();
    this.resolverSettings = settings;
    const { dns } = config;
    this.resolver = new BackendResolver({
      servers: dns.servers?.map((s) => s.text) ?? null,
      timeoutMs: dns.timeoutMs,
      minTtlMs: dns.minTtlMs,
      maxTtlMs: dns.maxTtlMs,
      retryMs: dns.retryMs,
      log: this.opts.log,
      onChange: (host, current) => this.onResolved(host, current),
    });
    return this.resolver;
  }

  private onResolved(host: string, current: ResolvedAddresses): void {
    // The config in force and the one a reload prepared (either may be absent during start-up or a reload).
    const configs = [this.config, this.pending].filter((c): c is Config => c !== null);
    if (this.closed || !configs.some((c) => hostNames(c).has(host))) return;
    const before = this.directory.resolved.get(host) ?? [];
    if (!current.ok && current.addresses.length === 0) return;
    if (sameList(before, current.addresses)) return;
    this.directory.resolved.set(host, current.addresses);
    const full = this.directory.indexes.assignBackends(
      configs.flatMap((c) => this.directory.keysOf(c)),
      MAX_BACKENDS,
    );
    if (full !== null) {
      this.opts.log.error({ host }, `${full}; the new addresses of ${host} are not used`);
      this.directory.resolved.set(host, before);
      return;
    }
    this.opts.log.info({ host, addresses: current.addresses }, `backend host ${host} now resolves to ${current.addresses.join(', ') || 'nothing'}`);
    if (this.pending !== null) this.changedWhilePending = true;
    // Before the first commit no thread runs a config yet: commit() publishes.
    if (this.config === null) return;
    this.refresh();
    this.opts.publish(this.directory.update());
  }

  /** Brings the live set, runtime states and health checks in line with the config and answers. */
  private refresh(): void {
    const config = this.config!;
    const states = this.opts.states;
    const now = Date.now();
    const live = new Map<string, string>();
    const checks = new Map<string, { target: { host: string; port: number }; def: CheckDefinition; entries: BackendEntry[] }>();
    for (const listener of config.listeners) {
      for (const route of listener.routes) {
        const def = route.healthCheck === null ? null : checkDefinition(route.healthCheck, route);
        for (const { address, entry } of routeAddresses(route, (host) => this.directory.resolved.get(host))) {
          const key = backendKey(listener.name, route.name, address.text);
          const index = this.directory.indexes.backend(key);
          const settings = JSON.stringify(entry);
          const previous = this.live.get(key);
          if (previous === undefined) {
            states.reset(index);
            this.since.set(key, now);
          } else if (previous !== settings) {
            states.setAdmin(index, 'ready');
          }
          live.set(key, settings);
          if (def === null) {
            states.setCheckDown(index, false);
            continue;
          }
          const checkKey = `${address.text}\u0000${JSON.stringify(route.healthCheck)}\u0000${def.tlsServerName ?? ''}\u0000${def.proxyHeader === null ? '' : 'pp'}`;
          let check = checks.get(checkKey);
          if (check === undefined) {
            check = { target: { host: address.host, port: address.port }, def, entries: [] };
            checks.set(checkKey, check);
          }
          check.entries.push({ listener: listener.name, route: route.name, backend: address.text, configured: entry.address.text, index });
        }
      }
    }
    for (const key of this.since.keys()) if (!live.has(key)) this.since.delete(key);
    for (const key of this.live.keys()) if (!live.has(key)) this.gone.set(key, now);
    const pending = new Set(this.pending === null ? [] : this.directory.keysOf(this.pending));
    for (const [key, left] of this.gone) {
      if (live.has(key) || pending.has(key)) this.gone.delete(key);
      else if (now - left >= RECYCLE_AFTER_MS && states.active(this.directory.indexes.backend(key)) === 0) {
        this.gone.delete(key);
        this.directory.indexes.releaseBackend(key);
      }
    }
    this.live = live;
    this.checked = new Map([...checks].map(([key, check]) => [key, { entries: check.entries }]));
    this.checker.update([...checks].map(([key, check]) => ({ key, target: check.target, def: check.def })));
    // A check kept across the reload keeps its verdict; apply it to entries that joined it.
    for (const [key, check] of this.checked) {
      const state = this.checker.state(key);
      if (state !== undefined) for (const entry of check.entries) states.setCheckDown(entry.index, !state.up);
    }
  }

  private onCheckResult(key: string, result: CheckResult): void {
    const check = this.checked.get(key);
    if (check === undefined) return;
    this.opts.metrics.healthChecked(check.entries[0]!.backend, result.ok);
  }

  private onCheckChange(key: string, up: boolean, result: CheckResult, streak: number): void {
    const check = this.checked.get(key);
    if (check === undefined) return;
    const now = Date.now();
    for (const entry of check.entries) {
      this.opts.states.setCheckDown(entry.index, !up);
      this.since.set(backendKey(entry.listener, entry.route, entry.backend), now);
      const checks = streak === 1 ? 'check' : 'checks';
      const why = up ? `${streak} ${checks} passed` : `${streak} ${checks} failed, last: ${result.ok ? 'ok' : result.reason}`;
      const line = { listener: entry.listener, route: entry.route, backend: entry.backend, up };
      const message = `backend ${entry.backend} of route ${entry.route} is ${up ? 'up' : 'down'}: ${why}`;
      if (up) this.opts.log.info(line, message);
      else this.opts.log.warn(line, message);
    }
  }

  /** Every backend of the config in force. */
  entries(): BackendEntry[] {
    const config = this.config;
    if (config === null) return [];
    const out: BackendEntry[] = [];
    for (const listener of config.listeners) {
      for (const route of listener.routes) {
        for (const { address, entry } of routeAddresses(route, (host) => this.directory.resolved.get(host))) {
          const index = this.directory.indexes.backend(backendKey(listener.name, route.name, address.text));
          out.push({ listener: listener.name, route: route.name, backend: address.text, configured: entry.address.text, index });
        }
      }
    }
    return out;
  }

  /** /stats and `status`: every backend with its state. */
  describe(): BackendView[] {
    const now = Date.now();
    const config = this.config;
    const views: BackendView[] = [];
    const lastCheck = new Map<number, CheckResult | null>();
    for (const [key, check] of this.checked) {
      const state = this.checker.state(key);
      for (const entry of check.entries) lastCheck.set(entry.index, state?.last ?? null);
    }
    for (const entry of this.entries()) {
      const snap = this.opts.states.snapshot(entry.index, now);
      const settings = findEntry(config!, entry);
      const last = lastCheck.get(entry.index) ?? null;
      views.push({
        ...entry,
        health: snap.checkDown ? 'down' : snap.ejectedUntil > 0 ? 'ejected' : 'up',
        state: snap.admin,
        active: snap.active,
        weight: settings?.weight ?? 1,
        backup: settings?.backup ?? false,
        lastCheck: last === null ? null : { ok: last.ok, reason: last.ok ? null : last.reason, ms: Math.round(last.ms * 10) / 10 },
        since: new Date(this.since.get(backendKey(entry.listener, entry.route, entry.backend)) ?? now).toISOString(),
        ejectedUntil: snap.ejectedUntil > 0 ? new Date(snap.ejectedUntil).toISOString() : null,
      });
    }
    return views;
  }

  /**
   * The operator's runtime state for `backend` (as dialled, or as configured: a host name covers
   * every address it resolved to), in every route or only those named. Returns the backends it
   * changed (empty: no such backend).
   */
  setState(target: { backend: string; listener?: string; route?: string }, state: AdminState): BackendEntry[] {
    const matched = this.entries().filter(
      (e) =>
        (e.backend === target.backend || e.configured === target.backend) &&
        (target.listener === undefined || e.listener === target.listener) &&
        (target.route === undefined || e.route === target.route),
    );
    for (const entry of matched) this.opts.states.setAdmin(entry.index, state);
    return matched;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.checker.close();
    this.resolver?.close();
    this.previousResolver?.resolver.close();
  }
}

/** How long a backend must have left the config before its state index may serve another. */
const RECYCLE_AFTER_MS = 10 * 60_000;

/** Host names (not IP literals) among the backends of `config`. */
function hostNames(config: Config): Set<string> {
  const hosts = new Set<string>();
  for (const listener of config.listeners) {
    for (const route of listener.routes) for (const b of route.backends) if (ipFamily(b.address.host) === null) hosts.add(b.address.host);
  }
  return hosts;
}

function sameList(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

function findEntry(config: Config, entry: BackendEntry): RouteConfig['backends'][number] | undefined {
  const listener: ListenerConfig | undefined = config.listeners.find((l) => l.name === entry.listener);
  const route = listener?.routes.find((r) => r.name === entry.route);
  return route?.backends.find((b) => b.address.text === entry.configured);
}

/** The runner's definition of a route's check: bytes encoded, the SNI and PROXY header chosen. */
export function checkDefinition(check: HealthCheckConfig, route: RouteConfig): CheckDefinition {
  const firstExactName = route.sni.find((name) => !name.startsWith('*.')) ?? null;
  return {
    type: check.type,
    intervalMs: check.intervalMs,
    timeoutMs: check.timeoutMs,
    rise: check.rise,
    fall: check.fall,
    jitterPct: check.jitterPct,
    send: check.send === null ? null : Buffer.from(check.send, 'utf8'),
    expect:
      check.expect !== null
        ? { kind: 'prefix', bytes: Buffer.from(check.expect, 'utf8') }
        : check.expectRegex !== null
          ? { kind: 'regex', regex: new RegExp(check.expectRegex) }
          : null,
    tlsServerName: check.type === 'tls' ? (check.tlsServerName ?? firstExactName) : null,
    tlsVerify: check.tlsVerify,
    proxyHeader: check.proxyProtocol === 'local' ? writeProxyHeaderV2Local() : null,
  };
}
