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
import { BackendResolver, sameAddresses, type ResolvedAddresses } from './resolver.ts';

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
  /** "up", "down" (checks), "ejected" (passive), "probation" (after the cooldown, one connection at a time until one connects). */
  readonly health: 'up' | 'down' | 'ejected' | 'probation';
  readonly state: AdminState;
  readonly active: number;
  readonly weight: number;
  readonly backup: boolean;
  readonly lastCheck: { readonly ok: boolean; readonly reason: string | null; readonly ms: number } | null;
  /** ISO time of the last health change (checks), or of when it entered the config. */
  readonly since: string;
  readonly ejectedUntil: string | null;
  /** ISO time its slow start ends (the route's slow_start), or null when it takes its full weight. */
  readonly slowStartUntil: string | null;
}

export interface SupervisorOptions {
  readonly states: SharedBackendStates;
  readonly indexes: CountIndexes;
  readonly log: Logger;
  readonly metrics: Metrics;
  /** A resolution changed some route's members: every thread must take it. */
  readonly publish: (update: BackendUpdate) => void;
}

interface ResolverUse {
  readonly resolver: BackendResolver;
  /** The [dns] table it was made for, as JSON. */
  readonly settings: string;
}

interface Checked {
  readonly entries: BackendEntry[];
}

export class BackendSupervisor {
  readonly directory: BackendDirectory;
  private readonly opts: SupervisorOptions;
  private config: Config | null = null;
  /**
   * A config prepared and not yet committed, and the answers its routes were compiled from. An
   * answer that changes before the commit is kept here and published again at the commit.
   */
  private pending: Config | null = null;
  private pendingResolved: Map<string, readonly string[]> | null = null;
  private changedWhilePending = false;
  /** The resolver of the config in force, and the one a prepared reload uses (the same one unless [dns] changed). */
  private inForce: ResolverUse | null = null;
  private prepared: ResolverUse | null = null;
  private readonly checker: HealthChecker;
  /** Check key -> the backends its result applies to. */
  private checked = new Map<string, Checked>();
  /** Backend key -> the settings it entered with (a change resets its runtime state). */
  private live = new Map<string, string>();
  /** The first refresh (the config the process starts with) is done: backends added later start in slow start. */
  private refreshed = false;
  /** Backend key -> when it entered the config or its health last changed. */
  private readonly since = new Map<string, number>();
  /**
   * Backend key -> when it left the config (a reload, or an address a name no longer resolves
   * to). Its index is given back once it has been gone RECYCLE_AFTER_MS with no connection left,
   * so a name whose addresses rotate (a cloud load balancer) never uses up the indexes. An address
   * of a name that comes back before then keeps its state (a DNS answer that flaps).
   */
  private readonly gone = new Map<string, number>();
  /**
   * Runtime states set by host name (listener/route/configured entry): every address the name
   * resolves to, later ones too, gets it. Dropped when a reload changes or removes the entry.
   */
  private readonly namedStates = new Map<string, { readonly state: AdminState; readonly settings: string }>();
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
    await Promise.all([...hosts].map((host) => resolver.watch(host)));
    // The answers as they stand now (one may have changed during the wait). A name the prepared
    // servers cannot resolve keeps the answer in force: a reload must not empty a route.
    const resolved = new Map<string, readonly string[]>();
    for (const host of hosts) {
      const answer = resolver.current(host);
      const inForce = this.directory.resolved.get(host) ?? [];
      let addresses = answer?.addresses ?? [];
      if (addresses.length === 0 && inForce.length > 0) {
        addresses = inForce;
        this.opts.log.warn({ host, error: answer?.error }, `backend host ${host} does not resolve with the new [dns] settings; keeping the addresses in force`);
      } else if (addresses.length === 0) {
        this.opts.log.warn({ host, error: answer?.error }, `backend host ${host} does not resolve; its backends are left out until it does`);
      }
      resolved.set(host, addresses);
    }
    const full = this.assign([...this.directory.keysOf(config, resolved), ...(this.config === null ? [] : this.directory.keysOf(this.config))]);
    if (full !== null) {
      this.abort(); // the resolver in force stays (the caller may not abort a prepare that threw)
      throw new Error(full);
    }
    this.pending = config;
    this.pendingResolved = resolved;
    this.changedWhilePending = false;
    return { resolved: [...resolved].map(([host, ips]) => [host, [...ips]]), indexes: this.directory.indexes.toJSON() };
  }

  /** Second half: `config` is in force in every thread. */
  commit(config: Config): void {
    if (this.prepared !== null && this.prepared !== this.inForce) {
      this.inForce?.resolver.close();
      this.inForce = this.prepared;
    }
    this.prepared = null;
    this.config = config;
    this.directory.resolved = this.pendingResolved ?? new Map();
    this.pending = null;
    this.pendingResolved = null;
    this.inForce?.resolver.retain(hostNames(config));
    this.refresh();
    // The threads compiled this config's routes from the answers prepare() returned; one that
    // changed since would otherwise stay unused until the name's next change.
    if (this.changedWhilePending) {
      this.changedWhilePending = false;
      this.opts.publish(this.directory.update());
    }
  }

  /** A prepared config that will not be committed: its resolver and answers go, nothing in force changes. */
  abort(): void {
    if (this.prepared !== null && this.prepared !== this.inForce) this.prepared.resolver.close();
    this.prepared = null;
    this.pending = null;
    this.pendingResolved = null;
    this.changedWhilePending = false;
    if (this.config !== null) this.inForce?.resolver.retain(hostNames(this.config));
  }

  /** The resolver for `config`'s [dns]: the one in force when unchanged, else a new one (in force at the commit). */
  private resolverFor(config: Config): BackendResolver {
    const settings = JSON.stringify(config.dns);
    if (this.prepared !== null && this.prepared !== this.inForce) this.prepared.resolver.close();
    if (this.inForce !== null && this.inForce.settings === settings) {
      this.prepared = this.inForce;
      return this.inForce.resolver;
    }
    const { dns } = config;
    const use: { resolver: BackendResolver | null; settings: string } = { resolver: null, settings };
    use.resolver = new BackendResolver({
      servers: dns.servers?.map((s) => s.text) ?? null,
      timeoutMs: dns.timeoutMs,
      minTtlMs: dns.minTtlMs,
      maxTtlMs: dns.maxTtlMs,
      retryMs: dns.retryMs,
      log: this.opts.log,
      onChange: (host, current) => this.onResolved(use as ResolverUse, host, current),
    });
    this.prepared = use as ResolverUse;
    if (this.inForce === null) this.inForce = this.prepared; // start-up
    return use.resolver;
  }

  /** Indexes for `keys`; a new index starts from a clean state (it may have served another backend). */
  private assign(keys: string[]): string | null {
    const indexes = this.directory.indexes;
    const known = new Set(indexes.backends.keys());
    const full = indexes.assignBackends(keys, MAX_BACKENDS);
    if (full !== null) return full;
    // After start-up a new backend ramps (slow_start) from here: the threads may commit before refresh().
    const warmSince = this.refreshed ? Date.now() : 0;
    for (const [key, index] of indexes.backends) if (!known.has(key)) this.opts.states.reset(index, warmSince);
    return null;
  }

  /** A resolver's answer for `host` changed: the config in force, a prepared one, or both take it. */
  private onResolved(source: ResolverUse, host: string, current: ResolvedAddresses): void {
    if (this.closed || (!current.ok && current.addresses.length === 0)) return;
    const inForce = source === this.inForce && this.config !== null && hostNames(this.config).has(host)
      && !sameAddresses(this.directory.resolved.get(host) ?? [], current.addresses);
    const pending = source === this.prepared && this.pending !== null && this.pendingResolved !== null && hostNames(this.pending).has(host)
      && !sameAddresses(this.pendingResolved.get(host) ?? [], current.addresses);
    if (!inForce && !pending) return;
    const before = { inForce: this.directory.resolved.get(host), pending: this.pendingResolved?.get(host) };
    if (inForce) this.directory.resolved.set(host, current.addresses);
    if (pending) this.pendingResolved!.set(host, current.addresses);
    const keys = [
      ...(this.config === null ? [] : this.directory.keysOf(this.config)),
      ...(this.pending === null ? [] : this.directory.keysOf(this.pending, this.pendingResolved!)),
    ];
    const full = this.assign(keys);
    if (full !== null) {
      this.opts.log.error({ host }, `${full}; the new addresses of ${host} are not used`);
      if (inForce) this.directory.resolved.set(host, before.inForce ?? []);
      if (pending) this.pendingResolved!.set(host, before.pending ?? []);
      return;
    }
    this.opts.log.info({ host, addresses: current.addresses }, `backend host ${host} now resolves to ${current.addresses.join(', ') || 'nothing'}`);
    if (pending) this.changedWhilePending = true;
    if (!inForce) return;
    this.refresh();
    this.opts.publish(this.directory.update());
  }

  /** Brings the live set, runtime states and health checks in line with the config and answers. */
  private refresh(): void {
    const config = this.config!;
    const states = this.opts.states;
    const now = Date.now();
    const live = new Map<string, string>();
    const named = new Set<string>();
    const checks = new Map<string, { target: { host: string; port: number }; def: CheckDefinition; entries: BackendEntry[]; wasDown: boolean }>();
    for (const listener of config.listeners) {
      for (const route of listener.routes) {
        const def = route.healthCheck === null ? null : checkDefinition(route.healthCheck, route);
        for (const { address, entry } of routeAddresses(route, (host) => this.directory.resolved.get(host))) {
          const key = backendKey(listener.name, route.name, address.text);
          const index = this.directory.indexes.backend(key);
          const settings = JSON.stringify(entry);
          const previous = this.live.get(key);
          const fromName = ipFamily(entry.address.host) === null;
          const namedKey = backendKey(listener.name, route.name, entry.address.text);
          const namedState = this.namedStates.get(namedKey);
          if (namedState !== undefined && namedState.settings === settings) named.add(namedKey);
          if (previous === undefined) {
            // An address of a name back within RECYCLE_AFTER_MS keeps its state; anything else starts
            // afresh, in slow start unless it is of the first config.
            if (!(fromName && this.gone.has(key))) states.reset(index, this.refreshed ? now : 0);
            this.since.set(key, now);
            if (named.has(namedKey)) states.setAdmin(index, namedState!.state);
          } else if (previous !== settings) {
            // A reload that changes the entry ends its runtime state: back to ready, ramping if it was out.
            if (states.admin(index) !== 'ready') states.startWarming(index, now);
            states.setAdmin(index, 'ready');
          }
          live.set(key, settings);
          if (def === null) {
            states.setCheckDown(index, false);
            continue;
          }
          const checkKey = `${address.text}\u0000${JSON.stringify(route.healthCheck)}\u0000${def.tlsServerName ?? ''}\u0000${def.proxyHeader?.toString('latin1') ?? ''}`;
          let check = checks.get(checkKey);
          if (check === undefined) {
            check = { target: { host: address.host, port: address.port }, def, entries: [], wasDown: false };
            checks.set(checkKey, check);
          }
          // Known down before (by a check of another definition, or before the reload): a new check starts down.
          if (previous !== undefined || (fromName && this.gone.has(key))) check.wasDown ||= states.snapshot(index, now).checkDown;
          check.entries.push({ listener: listener.name, route: route.name, backend: address.text, configured: entry.address.text, index });
        }
      }
    }
    for (const key of this.namedStates.keys()) if (!named.has(key)) this.namedStates.delete(key);
    for (const key of this.since.keys()) if (!live.has(key)) this.since.delete(key);
    for (const key of this.live.keys()) if (!live.has(key)) this.gone.set(key, now);
    const pending = new Set(this.pending === null ? [] : this.directory.keysOf(this.pending, this.pendingResolved!));
    // Indexes assigned and never in force (an aborted reload, an answer replaced before its commit) go too.
    for (const key of this.directory.indexes.backends.keys()) if (!live.has(key) && !pending.has(key) && !this.gone.has(key)) this.gone.set(key, now);
    for (const [key, left] of this.gone) {
      if (live.has(key) || pending.has(key)) this.gone.delete(key);
      else if (now - left >= RECYCLE_AFTER_MS && states.active(this.directory.indexes.backend(key)) === 0) {
        this.gone.delete(key);
        this.directory.indexes.releaseBackend(key);
      }
    }
    this.live = live;
    this.refreshed = true;
    this.checked = new Map([...checks].map(([key, check]) => [key, { entries: check.entries }]));
    this.checker.update([...checks].map(([key, check]) => ({ key, target: check.target, def: check.def, initialUp: !check.wasDown })));
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
    // A passing check of a backend the checks find up ends a passive ejection: it connects again,
    // and waiting out a cooldown of minutes (or a probe) would keep a good backend out for nothing.
    if (!result.ok || this.checker.state(key)?.up !== true) return;
    const now = Date.now();
    for (const entry of check.entries) {
      if (!this.opts.states.uneject(entry.index, now)) continue;
      const line = { listener: entry.listener, route: entry.route, backend: entry.backend };
      this.opts.log.info(line, `backend ${entry.backend} of route ${entry.route} is back: a health check passed after its passive ejection`);
    }
  }

  private onCheckChange(key: string, up: boolean, result: CheckResult, streak: number): void {
    const check = this.checked.get(key);
    if (check === undefined) return;
    const now = Date.now();
    for (const entry of check.entries) {
      this.opts.states.setCheckDown(entry.index, !up);
      if (up) this.opts.states.startWarming(entry.index, now);
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
      const route = findRoute(config!, entry);
      const settings = route?.backends.find((b) => b.address.text === entry.configured);
      // check-config refuses slow_start with source_hash: slowStartMs is 0 there.
      const slowStartMs = route?.slowStartMs ?? 0;
      const warmUntil = slowStartMs === 0 ? 0 : this.opts.states.warmUntil(entry.index, now, slowStartMs);
      const last = lastCheck.get(entry.index) ?? null;
      views.push({
        ...entry,
        health: snap.checkDown ? 'down' : snap.ejectedUntil > 0 ? 'ejected' : snap.probation ? 'probation' : 'up',
        state: snap.admin,
        active: snap.active,
        weight: settings?.weight ?? 1,
        backup: settings?.backup ?? false,
        lastCheck: last === null ? null : { ok: last.ok, reason: last.ok ? null : last.reason, ms: Math.round(last.ms * 10) / 10 },
        since: new Date(this.since.get(backendKey(entry.listener, entry.route, entry.backend)) ?? now).toISOString(),
        ejectedUntil: snap.ejectedUntil > 0 ? new Date(snap.ejectedUntil).toISOString() : null,
        slowStartUntil: warmUntil > 0 ? new Date(warmUntil).toISOString() : null,
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
    const now = Date.now();
    for (const entry of matched) {
      // Back to ready from drain or maintenance: back into rotation, so slow_start applies.
      if (state === 'ready' && this.opts.states.admin(entry.index) !== 'ready') this.opts.states.startWarming(entry.index, now);
      this.opts.states.setAdmin(entry.index, state);
      // Set by host name: later addresses of the name get it too.
      const configured = findEntry(this.config!, entry);
      if (entry.configured === target.backend && configured !== undefined && ipFamily(configured.address.host) === null) {
        const key = backendKey(entry.listener, entry.route, entry.configured);
        const settings = JSON.stringify(configured);
        if (state === 'ready') this.namedStates.delete(key);
        else this.namedStates.set(key, { state, settings });
      }
    }
    return matched;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.checker.close();
    if (this.prepared !== null && this.prepared !== this.inForce) this.prepared.resolver.close();
    this.inForce?.resolver.close();
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

function findRoute(config: Config, entry: BackendEntry): RouteConfig | undefined {
  const listener: ListenerConfig | undefined = config.listeners.find((l) => l.name === entry.listener);
  return listener?.routes.find((r) => r.name === entry.route);
}

function findEntry(config: Config, entry: BackendEntry): RouteConfig['backends'][number] | undefined {
  return findRoute(config, entry)?.backends.find((b) => b.address.text === entry.configured);
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
    // The spec's header for a connection that carries no client: v2 LOCAL, or v1 UNKNOWN on a v1
    // route (a backend that parses only v1 would fail every check on a v2 header).
    proxyHeader: check.proxyProtocol !== 'local' ? null : route.sendProxyProtocol === 'v1' ? Buffer.from('PROXY UNKNOWN\r\n', 'latin1') : writeProxyHeaderV2Local(),
  };
}
