// Backend host names resolved with the DNS answer's own TTL, re-resolved when it runs out.
//
// Queries go through one c-ares channel (dns.promises.Resolver), never dns.lookup: getaddrinfo runs
// on libuv's 4-thread pool, where one slow resolver would stall file and crypto work, and it hides
// the TTL. A failed resolution keeps the last good answer: a DNS outage must not empty a route.
// One exception: with the system's servers, a name DNS does not know (NXDOMAIN, no data) is looked
// up once more with getaddrinfo, so names from /etc/hosts (`localhost`) work as they do for every
// other program; such an answer has no TTL and is looked up again every HOSTS_RECHECK_MS at most.
//
// One host's life (one timer, `refreshTimer`, held only while waiting):
//
//   watch() -> resolving -> waiting (TTL, or retryMs after a failure) -> resolving -> ...
//   retain() without it, or close() -> gone (timer cleared; a query in flight is ignored when it ends)
//
// Each resolution's outcome is ok (at least one family answered with addresses) or failed; the
// ok -> failed edge logs one warning, failed -> ok one info line, so a long outage retried every
// retryMs logs twice, not once per retry.
import { promises as dnsPromises } from 'node:dns';
import net from 'node:net';
import ipaddr from 'ipaddr.js';

export interface ResolvedAddresses {
  /** Sorted (numerically), IPv4 then IPv6, deduplicated. */
  readonly addresses: readonly string[];
  /** false: the last resolution failed and `addresses` are the last good answer (empty if there never was one). */
  readonly ok: boolean;
  /** The failure's code (ENOTFOUND, ENODATA, ETIMEOUT, ESERVFAIL, ECONNREFUSED, ...) while ok is false; null when ok. */
  readonly error: string | null;
  /** When `addresses` were obtained (epoch ms); 0 if never. */
  readonly resolvedAt: number;
  /** When the next resolution is due (epoch ms): the TTL after a success, retryMs after a failure; Infinity for an IP literal. */
  readonly expiresAt: number;
}

export interface ResolverLog {
  warn(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
}

export interface BackendResolverOptions {
  /** "127.0.0.1:5353", "[::1]:53", "10.0.0.53"; null: Node's default servers (the system's resolv.conf). */
  readonly servers: readonly string[] | null;
  /**
   * A watched host's address set changed, or ok flipped (resolution started failing, or recovered).
   * Not called for the first answer: watch() returns that one. It runs from a timer, so it must not throw.
   */
  readonly onChange: (host: string, current: ResolvedAddresses) => void;
  readonly log?: ResolverLog;
  /** Floor for the re-resolution delay, so a TTL of 0 does not make a query loop. Default 1000. */
  readonly minTtlMs?: number;
  /** Ceiling for the re-resolution delay. Default 3_600_000. */
  readonly maxTtlMs?: number;
  /** After a failure, retry this much later, keeping the last good answer. Default 5000. */
  readonly retryMs?: number;
  /** Per try of each query (c-ares `timeout`, also its `maxTimeout` so retries do not grow). Default 2000. */
  readonly timeoutMs?: number;
  /** Tries per name server before a query fails (c-ares `tries`): one lost UDP packet is not an outage. Default 2. */
  readonly tries?: number;
}

/** One family's part of a resolution: addresses, an authoritative "none" (ENODATA, ENOTFOUND), or a failure. */
type FamilyAnswer =
  | { readonly kind: 'addresses'; readonly addresses: string[]; readonly ttlMs: number }
  | { readonly kind: 'none'; readonly code: string }
  | { readonly kind: 'failed'; readonly code: string };

/** A watched host. Owned by BackendResolver.hosts: present exactly while watched. */
interface Watched {
  readonly host: string;
  /** null until the first resolution ends. */
  current: ResolvedAddresses | null;
  /** Each family's last good addresses, kept when only that family fails for a while. */
  v4: string[];
  v6: string[];
  /** The first resolution, for watch() calls made while it runs. */
  first: Promise<ResolvedAddresses> | null;
  /** Set only while waiting for the next resolution. */
  refreshTimer: NodeJS.Timeout | null;
  /** When the current failure episode began; null while ok. */
  failingSince: number | null;
}

const NO_ADDRESSES: readonly string[] = Object.freeze([]);

export class BackendResolver {
  private readonly resolver: dnsPromises.Resolver;
  private readonly hosts = new Map<string, Watched>();
  private readonly onChange: (host: string, current: ResolvedAddresses) => void;
  private readonly log: ResolverLog | undefined;
  private readonly minTtlMs: number;
  private readonly maxTtlMs: number;
  private readonly retryMs: number;
  /** The system's servers: names DNS does not know are looked up in /etc/hosts (getaddrinfo). */
  private readonly hostsFallback: boolean;
  private closed = false;

  /** Throws (ERR_INVALID_IP_ADDRESS) on a malformed server address: the config check rejects those first. */
  constructor(opts: BackendResolverOptions) {
    const timeoutMs = opts.timeoutMs ?? 2000;
    this.resolver = new dnsPromises.Resolver({ timeout: timeoutMs, maxTimeout: timeoutMs, tries: opts.tries ?? 2 });
    if (opts.servers !== null) this.resolver.setServers([...opts.servers]);
    this.hostsFallback = opts.servers === null;
    this.onChange = opts.onChange;
    this.log = opts.log;
    this.minTtlMs = opts.minTtlMs ?? 1000;
    this.maxTtlMs = Math.max(opts.maxTtlMs ?? 3_600_000, this.minTtlMs);
    this.retryMs = opts.retryMs ?? 5000;
  }

  /**
   * Resolves `host` now (A and AAAA with their TTLs) and keeps re-resolving it when the shortest TTL
   * runs out. Resolves with the first answer and never rejects. An already watched host gives its
   * current answer; an IP literal gives itself at once, without a query or a timer.
   */
  watch(host: string): Promise<ResolvedAddresses> {
    const known = this.hosts.get(host);
    if (known !== undefined) return known.current !== null ? Promise.resolve(known.current) : known.first!;
    if (net.isIP(host) !== 0) {
      const literal: ResolvedAddresses = { addresses: Object.freeze([host]), ok: true, error: null, resolvedAt: Date.now(), expiresAt: Infinity };
      if (!this.closed) this.hosts.set(host, { host, current: literal, v4: [], v6: [], first: null, refreshTimer: null, failingSince: null });
      return Promise.resolve(literal);
    }
    if (this.closed) {
      const now = Date.now();
      return Promise.resolve({ addresses: NO_ADDRESSES, ok: false, error: 'ECANCELLED', resolvedAt: 0, expiresAt: now });
    }
    const watched: Watched = { host, current: null, v4: [], v6: [], first: null, refreshTimer: null, failingSince: null };
    this.hosts.set(host, watched);
    watched.first = this.refresh(watched);
    return watched.first;
  }

  /** Stops watching (timer and all) every host not in `hosts`. */
  retain(hosts: ReadonlySet<string>): void {
    for (const [host, watched] of this.hosts) {
      if (hosts.has(host)) continue;
      this.forget(watched);
    }
  }

  /** The host's current answer; undefined if it is not watched or its first resolution has not ended. */
  current(host: string): ResolvedAddresses | undefined {
    return this.hosts.get(host)?.current ?? undefined;
  }

  /** Stops every timer and cancels every query in flight (their watch() calls resolve with ECANCELLED). Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const watched of this.hosts.values()) this.forget(watched);
    this.resolver.cancel();
  }

  private forget(watched: Watched): void {
    if (watched.refreshTimer !== null) clearTimeout(watched.refreshTimer);
    watched.refreshTimer = null;
    this.hosts.delete(watched.host);
  }

  /** One resolution of `watched`: query, then (if still watched) record, report and schedule the next. */
  private async refresh(watched: Watched): Promise<ResolvedAddresses> {
    watched.refreshTimer = null;
    const host = watched.host;
    let [a, aaaa] = await Promise.all([
      familyAnswer(() => this.resolver.resolve4(host, { ttl: true })),
      familyAnswer(() => this.resolver.resolve6(host, { ttl: true })),
    ]);
    if (this.hostsFallback && a.kind === 'none' && aaaa.kind === 'none') [a, aaaa] = await hostsAnswer(host, Math.max(this.minTtlMs, HOSTS_RECHECK_MS));
    const now = Date.now();
    const previous = watched.current;
    let next: ResolvedAddresses;
    if (a.kind === 'addresses' || aaaa.kind === 'addresses') {
      // A family that failed outright (not "no such records") keeps its last good addresses until
      // it answers again, and the next try comes no later than retryMs.
      const v4 = a.kind === 'addresses' ? a.addresses : a.kind === 'failed' ? watched.v4 : [];
      const v6 = aaaa.kind === 'addresses' ? aaaa.addresses : aaaa.kind === 'failed' ? watched.v6 : [];
      const ttlMs = Math.min(a.kind === 'addresses' ? a.ttlMs : Infinity, aaaa.kind === 'addresses' ? aaaa.ttlMs : Infinity);
      let delay = Math.min(Math.max(ttlMs, this.minTtlMs), this.maxTtlMs);
      if (a.kind === 'failed' || aaaa.kind === 'failed') delay = Math.min(delay, this.retryMs);
      next = { addresses: Object.freeze([...sortAddresses(v4), ...sortAddresses(v6)]), ok: true, error: null, resolvedAt: now, expiresAt: now + delay };
      if (this.hosts.get(host) === watched) {
        watched.v4 = v4;
        watched.v6 = v6;
      }
    } else {
      next = {
        addresses: previous?.addresses ?? NO_ADDRESSES,
        ok: false,
        error: failureCode(a, aaaa),
        resolvedAt: previous?.resolvedAt ?? 0,
        expiresAt: now + this.retryMs,
      };
    }
    // Retained away or closed while the queries ran: the answer goes to watch() only.
    if (this.hosts.get(host) !== watched) return next;
    watched.current = next;
    watched.first = null;
    // Scheduled before reporting, so an onChange that throws does not end the re-resolution.
    watched.refreshTimer = setTimeout(() => void this.refresh(watched), next.expiresAt - now).unref();
    this.report(watched, previous, next, now);
    return next;
  }

  /** The log lines of a failure episode's two edges, and onChange. */
  private report(watched: Watched, previous: ResolvedAddresses | null, next: ResolvedAddresses, now: number): void {
    const host = watched.host;
    if (!next.ok && watched.failingSince === null) {
      watched.failingSince = now;
      this.log?.warn(
        { host, error: next.error, addresses: next.addresses, retryMs: this.retryMs },
        next.addresses.length > 0
          ? `resolving backend host ${host} failed (${next.error}); keeping its last good addresses`
          : `resolving backend host ${host} failed (${next.error}); it has no addresses`,
      );
    } else if (next.ok && watched.failingSince !== null) {
      this.log?.info({ host, addresses: next.addresses, failedForMs: now - watched.failingSince }, `backend host ${host} resolves again`);
      watched.failingSince = null;
    }
    if (previous === null) return; // the first answer is watch()'s result
    if (previous.ok !== next.ok || !sameAddresses(previous.addresses, next.addresses)) this.onChange(host, next);
  }
}

/** A getaddrinfo answer has no TTL: looked up again this often. */
const HOSTS_RECHECK_MS = 30_000;

/** getaddrinfo (files, then DNS, as nsswitch says) for a name c-ares found nothing for; never rejects. */
async function hostsAnswer(host: string, recheckMs: number): Promise<[FamilyAnswer, FamilyAnswer]> {
  try {
    const found = await dnsPromises.lookup(host, { all: true });
    const of = (family: number): FamilyAnswer => {
      const addresses = found.filter((r) => r.family === family).map((r) => r.address);
      return addresses.length > 0 ? { kind: 'addresses', addresses, ttlMs: recheckMs } : { kind: 'none', code: 'ENODATA' };
    };
    return [of(4), of(6)];
  } catch {
    return [{ kind: 'none', code: 'ENOTFOUND' }, { kind: 'none', code: 'ENOTFOUND' }];
  }
}

/** Runs one query and classifies its outcome; never rejects. */
async function familyAnswer(query: () => Promise<Array<{ address: string; ttl: number }>>): Promise<FamilyAnswer> {
  try {
    const records = await query();
    if (records.length === 0) return { kind: 'none', code: 'ENODATA' };
    return {
      kind: 'addresses',
      addresses: records.map((r) => r.address),
      ttlMs: Math.min(...records.map((r) => r.ttl)) * 1000,
    };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'EUNKNOWN';
    // NXDOMAIN and "no records of this type" are answers, not outages: a v4-only host is fine.
    if (code === 'ENODATA' || code === 'ENOTFOUND') return { kind: 'none', code };
    return { kind: 'failed', code };
  }
}

/** The code that best explains a resolution without addresses: an outage first, then NXDOMAIN, then no data. */
function failureCode(a: FamilyAnswer, aaaa: FamilyAnswer): string {
  if (a.kind === 'failed') return a.code;
  if (aaaa.kind === 'failed') return aaaa.code;
  if ((a.kind === 'none' && a.code === 'ENOTFOUND') || (aaaa.kind === 'none' && aaaa.code === 'ENOTFOUND')) return 'ENOTFOUND';
  return 'ENODATA';
}

/** Deduplicated, in numeric order (10.0.0.2 before 10.0.0.10). All of one family. */
function sortAddresses(addresses: readonly string[]): string[] {
  const byKey = new Map<string, string>(); // hex of the address bytes: same length within a family, so text order is numeric order
  for (const address of addresses) {
    const key = Buffer.from(ipaddr.parse(address).toByteArray()).toString('hex');
    if (!byKey.has(key)) byKey.set(key, address);
  }
  return [...byKey.keys()].sort().map((key) => byKey.get(key)!);
}

/** Same addresses in the same order. */
export function sameAddresses(x: readonly string[], y: readonly string[]): boolean {
  return x.length === y.length && x.every((address, i) => address === y[i]);
}
