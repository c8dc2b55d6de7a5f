// `[cluster]` in one event loop: the cluster-wide per-client checks, asked after the local ones,
// and this event loop's ledger of what it holds in the store. It outlives config generations (as
// the per-client table does): a reload may change or remove `[cluster]` and the ledger stays.
//
// Leases: a connection admitted with a cluster-wide max_connections_per_ip holds one count in the
// ledger under its tag (listener/client key), taken here and given back once by release(), called
// from Listener.connectionClosed only. The store holds, per tag, this event loop's count under its
// own field; the ledger is the truth and the store a copy: each renewal (every lease_ttl / 3)
// writes the ledger's count, so whatever the store lost or gained wrongly (Redis restarted, a
// call that timed out after Redis ran it, releases made while it was unreachable) is repaired
// within one renewal, and the counts of an instance that died expire after lease_ttl.
// For that, the ledger has an entry for every tag whose field in the store may not match it: a
// tag whose count fell to 0 keeps its entry (at 0) until a renewal has deleted its field, and a
// failed admission or release of a tag leaves one (at 0 if it held nothing), since Redis may have
// run the call. An entry the ledger forgot would leave a phantom count that each admission of
// that client pushes on for another lease_ttl.
//
// Modes (one breaker per event loop; each change logged once):
//
//   off   no [cluster]
//   degraded --ready + a write answered + every count republished--> ok
//   ok --any failed call, or the connection closed--> degraded
//
// While degraded no call is made per connection: on_store_failure decides at once ("local": this
// instance's own limits, the local checks already made; "open": no per-client limit of those made
// cluster-wide; "closed": refused, cluster_unavailable), and a probe every second (at most) finds
// the store again. A store starts degraded and becomes ok once connected; its first failure
// before that is a warning (a wrong password or address would otherwise only show as the mode).
import type { ClusterConfig, ListenerLimits, OnStoreFailure } from '../config/types.ts';
import type { Logger } from '../logging/logger.ts';
import { readPassword, RedisStore, storeErrorKind, storeIdentity, type AdmitCode, type StoreErrorKind } from './store.ts';

export type ClusterMode = 'off' | 'ok' | 'degraded';

/** `leased`: admitted, and the connection holds a count (give it back with release). */
export type ClusterAnswer = 'leased' | 'ok' | 'cluster_ip_limit' | 'cluster_ip_rate' | 'cluster_unavailable';

export interface ClusterMetrics {
  storeLatency(seconds: number): void;
  storeError(kind: StoreErrorKind): void;
}

/**
 * Tags released per event-loop turn (16 store calls): a mass close (a drain deadline, maintenance)
 * would otherwise queue hundreds of calls in Redis at once, and those at the back would time out.
 */
const RELEASES_PER_TURN = 2048;

/** Tags renewed per batch (store calls of up to 128 tags each): each batch must come back within `timeout`. */
const RENEW_BATCH = 512;

export class Cluster {
  private settings: ClusterConfig | null = null;
  private store: RedisStore | null = null;
  #mode: ClusterMode = 'off';
  /** Per tag: connections of this event loop that hold a cluster count. */
  private readonly held = new Map<string, number>();
  /**
   * Per store, per tag: admissions sent and not answered (a renewal of that tag in that store
   * waits for them; leaving that store deletes the tag's field there all the same).
   */
  private readonly pending = new Map<RedisStore, Map<string, number>>();
  /** Releases not yet sent: flushed together once per tick. */
  private readonly releases = new Map<string, number>();
  private flushScheduled = false;
  private timer: NodeJS.Timeout | null = null;
  private nextRenewal = 0;
  private recovering = false;
  private renewing = false;
  /** The store in use has not been ok yet, and its first failure was not logged yet. */
  private connectingUnwarned = false;
  /** Called on every change of mode (tests await it). */
  readonly modeListeners = new Set<(mode: ClusterMode) => void>();

  constructor(
    private readonly thread: number,
    private readonly log: Logger,
    private readonly metrics: ClusterMetrics,
  ) {}

  get mode(): ClusterMode {
    return this.#mode;
  }

  /** Connections this event loop holds in the ledger, over every tag (tests, stats). */
  get leases(): number {
    let n = 0;
    for (const count of this.held.values()) n += count;
    return n;
  }

  /**
   * First half of applying `[cluster]` (start or reload): a store for new settings, not yet
   * connected; throws when password_file cannot be read. null when the store in use stays (the
   * same address, prefix, instance and password: password_file is read again on every reload).
   */
  prepare(settings: ClusterConfig | null): RedisStore | null {
    if (settings === null) return null;
    const password = readPassword(settings);
    if (this.store !== null && this.store.identity === storeIdentity(settings, password)) return null;
    return new RedisStore(settings, password, this.thread, { ready: () => this.recover(), down: (kind) => this.failed(kind, null) });
  }

  /** Second half: never fails. A replaced store gets this event loop's fields deleted. */
  commit(settings: ClusterConfig | null, prepared: RedisStore | null): void {
    this.settings = settings;
    if (settings === null) {
      this.replaceStore(null);
      return;
    }
    if (prepared !== null) {
      this.replaceStore(prepared);
      prepared.connect();
    } else this.store?.setTimeout(settings.timeoutMs);
    this.timer ??= setInterval(() => this.tick(), 200);
    this.timer.unref();
  }

  /** A prepared store whose reload was aborted. */
  discard(prepared: RedisStore | null): void {
    prepared?.close();
  }

  private replaceStore(next: RedisStore | null): void {
    const old = this.store;
    this.store = next;
    if (old !== null) {
      // Leaving that store: this event loop's counts there go now rather than after lease_ttl.
      // Admissions still out there included: Redis runs them before these deletions (one connection).
      this.flushReleases(old);
      const tags = new Set([...this.held.keys(), ...(this.pending.get(old)?.keys() ?? [])]);
      void old.renew([...tags].map((tag) => [tag, 0] as const), 1).catch(() => {});
      old.close();
    }
    if (next === null) {
      if (this.timer !== null) clearInterval(this.timer);
      this.timer = null;
      this.setMode('off', {});
      // Zero entries were kept only to delete their fields in the store.
      for (const [tag, n] of this.held) if (n === 0) this.held.delete(tag);
    } else {
      this.connectingUnwarned = true;
      this.setMode('degraded', { redis: next.display, kind: 'connecting' }, 'info');
    }
  }

  /** The limits the local check applies: with "open" while degraded, the cluster-wide ones are off. */
  localLimits(limits: ListenerLimits): ListenerLimits {
    const s = this.settings;
    if (s === null || this.#mode !== 'degraded' || s.onStoreFailure !== 'open') return limits;
    return {
      ...limits,
      maxConnectionsPerIp: s.maxConnectionsPerIp ? 0 : limits.maxConnectionsPerIp,
      connectionRatePerIp: s.connectionRatePerIp ? { count: 0, perMs: limits.connectionRatePerIp.perMs } : limits.connectionRatePerIp,
    };
  }

  /**
   * The cluster-wide checks for a client the local checks admitted: null when none applies (no
   * [cluster], or no cluster-wide limit set on this listener), an answer at once while degraded,
   * else a promise that settles within `timeout`.
   */
  admit(tag: string, limits: ListenerLimits): ClusterAnswer | Promise<ClusterAnswer> | null {
    const s = this.settings;
    if (s === null) return null;
    const max = s.maxConnectionsPerIp ? limits.maxConnectionsPerIp : 0;
    const rate = s.connectionRatePerIp ? limits.connectionRatePerIp.count : 0;
    if (max === 0 && rate === 0) return null;
    const store = this.store;
    if (this.#mode !== 'ok' || store === null) return this.fallback(tag, max, s.onStoreFailure);
    let pending = this.pending.get(store);
    if (pending === undefined) this.pending.set(store, (pending = new Map()));
    pending.set(tag, (pending.get(tag) ?? 0) + 1);
    const started = performance.now();
    return store.admit(tag, max, rate, limits.connectionRatePerIp.perMs, s.leaseTtlMs).then(
      (code: AdmitCode) => {
        this.settled(store, tag);
        this.metrics.storeLatency((performance.now() - started) / 1000);
        if (code === 1) return 'cluster_ip_limit';
        if (code === 2) return 'cluster_ip_rate';
        if (max === 0) return 'ok';
        const n = (this.held.get(tag) ?? 0) + 1;
        this.held.set(tag, n);
        // Admitted by a store a reload has left since: the store in use gets the count now, not
        // at its next renewal (unless an admission of that tag is out there: that renewal waits).
        const now = this.store;
        if (now !== null && now !== store && this.#mode === 'ok' && this.pending.get(now)?.has(tag) !== true) {
          now.renew([[tag, n]], this.settings?.leaseTtlMs ?? 0).catch((err: unknown) => {
            if (now === this.store) this.failed(null, err);
          });
        }
        return 'leased';
      },
      (err: unknown) => {
        this.settled(store, tag);
        // Redis may have counted it (a timeout after it ran the script): the next renewal writes
        // the ledger's count over it. (A store left meanwhile had the field deleted after it.)
        if (max > 0 && this.store !== null) this.held.set(tag, this.held.get(tag) ?? 0);
        // A store a reload replaced meanwhile says nothing about the one in use.
        if (store === this.store) this.failed(null, err);
        // The settings in force now: a reload may have come in between.
        return this.settings === null ? 'ok' : this.fallback(tag, max, this.settings.onStoreFailure);
      },
    );
  }

  private settled(store: RedisStore, tag: string): void {
    const pending = this.pending.get(store);
    if (pending === undefined) return;
    const n = (pending.get(tag) ?? 1) - 1;
    if (n > 0) pending.set(tag, n);
    else if (pending.delete(tag) && pending.size === 0) this.pending.delete(store);
  }

  private fallback(tag: string, max: number, policy: OnStoreFailure): ClusterAnswer {
    if (policy === 'closed') return 'cluster_unavailable';
    if (max === 0) return 'ok';
    // Counted in the ledger all the same: republished to the store when it is back.
    this.held.set(tag, (this.held.get(tag) ?? 0) + 1);
    return 'leased';
  }

  /** Gives back one lease; sent with the other releases of this tick. */
  release(tag: string): void {
    const n = Math.max(0, (this.held.get(tag) ?? 1) - 1);
    // At 0 the entry stays until a renewal has deleted the field (renewAll): were this release
    // lost, or the field holding more than the ledger, nothing else would correct it.
    if (n > 0 || this.store !== null) this.held.set(tag, n);
    else this.held.delete(tag);
    if (this.#mode !== 'ok') return;
    this.releases.set(tag, (this.releases.get(tag) ?? 0) + 1);
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      if (this.store === null || this.#mode !== 'ok') {
        this.releases.clear(); // their tags are in the ledger: the republish writes them
        return;
      }
      this.flushReleases(this.store, RELEASES_PER_TURN);
      if (this.releases.size > 0) this.scheduleFlush();
    });
  }

  /**
   * Sends the releases not sent yet, at most `limit` tags of them. Renewals send them all first:
   * the counts they write already leave these releases out.
   */
  private flushReleases(store: RedisStore, limit = Infinity): void {
    if (this.releases.size === 0) return;
    const releases: Array<[string, number]> = [];
    for (const entry of this.releases) {
      if (releases.length >= limit) break;
      releases.push(entry);
    }
    for (const [tag] of releases) this.releases.delete(tag);
    store.release(releases).catch((err: unknown) => {
      if (store !== this.store) return;
      // Whether Redis ran them is unknown: the renewal writes these tags' counts over them.
      for (const [tag] of releases) this.held.set(tag, this.held.get(tag) ?? 0);
      this.failed(null, err);
    });
  }

  private tick(): void {
    if (this.store === null) return;
    const now = Date.now();
    if (this.#mode === 'degraded') {
      if (now >= this.nextRenewal) this.recover();
      return;
    }
    if (now >= this.nextRenewal) void this.renewAll(this.store);
  }

  /**
   * Writes every count of the ledger (those with an admission in flight in this store wait for the
   * next round); a 0 deletes the field, and then the entry.
   */
  private async renewAll(store: RedisStore): Promise<boolean> {
    if (this.renewing) return false;
    this.renewing = true;
    const ttl = this.settings?.leaseTtlMs ?? 0;
    this.nextRenewal = Date.now() + Math.max(100, Math.floor(ttl / 3));
    try {
      const tags = [...this.held.keys()];
      for (let i = 0; i < tags.length; i += RENEW_BATCH) {
        // Before each batch, as the counts are read now: releases not sent yet are already
        // subtracted from them (sent after, they would count twice), and a tag with an admission
        // in flight waits for the next round (its count does not include that one yet).
        this.flushReleases(store);
        const pending = this.pending.get(store);
        const batch = tags.slice(i, i + RENEW_BATCH).filter((tag) => pending?.has(tag) !== true && this.held.has(tag));
        const counts = batch.map((tag) => [tag, this.held.get(tag) ?? 0] as const);
        await store.renew(counts, ttl);
        for (const [tag, n] of counts) if (n === 0 && this.held.get(tag) === 0) this.held.delete(tag);
        if (store !== this.store) return false;
      }
      return true;
    } catch (err) {
      if (store === this.store) this.failed(null, err);
      return false;
    } finally {
      this.renewing = false;
    }
  }

  /**
   * Degraded: a write (a PING answers while Redis refuses writes: OOM, READONLY, LOADING, and the
   * mode would flap), republish every count, then ok. At most one attempt at a time, one a second.
   */
  private recover(): void {
    const store = this.store;
    if (store === null || this.#mode === 'ok' || this.recovering) return;
    this.recovering = true;
    this.nextRenewal = Date.now() + 1000;
    void store
      .probe()
      .then(() => this.renewAll(store))
      .then((ok) => {
        if (ok && store === this.store) this.setMode('ok', { redis: store.display, leases: this.leases }, 'info');
      })
      .catch((err: unknown) => {
        if (store === this.store) this.failed(null, err);
      })
      .finally(() => {
        this.recovering = false;
      });
  }

  /** A call failed (`err`) or the connection reported a failure (`kind`): degraded, once. */
  private failed(kind: StoreErrorKind | null, err: unknown): void {
    const k = kind ?? storeErrorKind(err);
    this.metrics.storeError(k);
    if (this.#mode !== 'ok') {
      if (this.connectingUnwarned && this.store !== null) {
        this.connectingUnwarned = false;
        this.log.warn({ redis: this.store.display, kind: k, onStoreFailure: this.settings?.onStoreFailure }, 'cluster store not reached yet: on_store_failure applies');
      }
      return;
    }
    this.nextRenewal = Date.now() + 1000;
    this.setMode('degraded', { redis: this.store?.display, kind: k, onStoreFailure: this.settings?.onStoreFailure }, 'warn');
  }

  private setMode(mode: ClusterMode, fields: Record<string, unknown>, level: 'info' | 'warn' = 'info'): void {
    if (mode === this.#mode) return;
    this.#mode = mode;
    if (mode === 'ok') this.connectingUnwarned = false;
    if (mode === 'ok') this.log.info(fields, 'cluster store ok: cluster-wide limits apply');
    else if (mode === 'degraded') this.log[level](fields, 'cluster store unavailable: on_store_failure applies');
    else this.log.info(fields, 'cluster off: limits are this instance\'s own');
    for (const listener of this.modeListeners) listener(mode);
  }

  /** Final teardown: this event loop's counts leave the store. */
  close(): void {
    this.replaceStore(null);
    this.settings = null;
  }
}
