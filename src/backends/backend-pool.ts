// One route's backends as a thread picks among them: the members (every configured address, and
// every address a configured host name resolved to), and the choice of one for a new connection
// by `balance`, skipping what is down, drained, at its cap or already tried by this connection.
//
// Tiers, in order: primaries that are up; else backups that are up; else, when nothing of the
// route is up at all (checks and ejection together), panic (every member the operator left ready,
// as Envoy's panic threshold does) or, with on_all_down = "refuse", no_healthy_backend. Up means
// active checks find it up and it is not passively ejected; at its cap is not down (backend_full).
// A backend on probation after an ejection (backends/backend-states.ts) is up for one connection
// at a time: whoever picks it must also win its probe, else it is skipped like one at its cap.
// Backends on probation with their probe out come after the backups and before panic: with
// nothing else up they take connections as they did before any probation, rather than panic
// dialling backends the checks know are down.
import type { Balance, HostPort, RouteConfig } from '../config/types.ts';
import { formatHostPort, ipFamily, normalizeHost } from '../config/units.ts';
import type { SharedBackendStates } from './backend-states.ts';

export interface Member {
  /** Index of its state in SharedBackendStates. */
  readonly index: number;
  /** Where to dial: an IP literal and port. */
  readonly address: HostPort;
  /** The `backends` entry it comes from, as written (a host name for a resolved address). */
  readonly configured: string;
  readonly weight: number;
  readonly backup: boolean;
  readonly maxConnections: number;
  /** Its share of source_hash: a hash of its address, mixed with the client's. */
  readonly seed: number;
}

export type NoBackend = 'no_healthy_backend' | 'backend_full' | 'backend_unavailable';

/** The key of a backend's state: one entry per listener, route and address. */
export function backendKey(listener: string, route: string, address: string): string {
  return `${listener}\u0000${route}\u0000${address}`;
}

/**
 * Every address a route's backends stand for, in config order: an IP literal as written, a host
 * name as each address it resolves to (none while it has never resolved). One address listed
 * twice (a literal and a name resolving to it) is one member with the first entry's settings.
 */
export function routeAddresses(route: RouteConfig, resolved: (host: string) => readonly string[] | undefined): Array<{ address: HostPort; entry: RouteConfig['backends'][number] }> {
  const out: Array<{ address: HostPort; entry: RouteConfig['backends'][number] }> = [];
  const seen = new Set<string>();
  for (const entry of route.backends) {
    const { host, port } = entry.address;
    const ips = ipFamily(host) !== null ? [host] : (resolved(host) ?? []);
    for (const ip of ips) {
      const text = ipFamily(host) !== null ? entry.address.text : formatHostPort(ip, port);
      const key = `${normalizeHost(ip)}:${port}`;
      if (seen.has(key)) continue;
      seen.add(key);
      out.push({ address: { host: ip, port, text }, entry });
    }
  }
  return out;
}

export interface PoolSettings {
  readonly balance: Balance;
  readonly onAllDown: 'panic' | 'refuse';
  /** How long a probe holds a backend on probation: the longest a dial can take. */
  readonly probeWindowMs: number;
  /** A backend back in rotation ramps its weight over this long (0 = off; not for source_hash). */
  readonly slowStartMs: number;
}

export class BackendPool {
  readonly balance: Balance;
  readonly onAllDown: 'panic' | 'refuse';
  private readonly probeWindowMs: number;
  private readonly slowStartMs: number;
  private members: readonly Member[] = [];
  /** Smooth weighted round-robin (as nginx's): each member's running score, by position. */
  private current: Float64Array = new Float64Array(0);
  private cursor = 0;

  constructor(
    private readonly states: SharedBackendStates,
    members: readonly Member[],
    settings: PoolSettings,
  ) {
    this.balance = settings.balance;
    this.onAllDown = settings.onAllDown;
    this.probeWindowMs = settings.probeWindowMs;
    this.slowStartMs = settings.slowStartMs; // source_hash never reads it: its picks use the configured weight
    this.setMembers(members);
  }

  /** Its weight now: the configured one, or a share of it during its slow start. */
  private weight(m: Member, now: number): number {
    return this.slowStartMs === 0 ? m.weight : m.weight * this.states.warmShare(m.index, now, this.slowStartMs);
  }

  get all(): readonly Member[] {
    return this.members;
  }

  /** A new resolution replaced the members (DNS); round-robin starts afresh. */
  setMembers(members: readonly Member[]): void {
    this.members = members;
    this.current = new Float64Array(members.length);
  }

  /**
   * The member for a connection's next dial, its connection lease already taken (give it back
   * with states.release), or why there is none. `tried`: members this connection has dialled.
   */
  choose(tried: readonly number[], clientAddress: string, now: number): Member | NoBackend {
    const members = this.members;
    if (members.length === 0) return 'backend_unavailable';
    const states = this.states;
    const primaries: number[] = [];
    const backups: number[] = [];
    const probing: number[] = [];
    let anyUp = false;
    for (let i = 0; i < members.length; i++) {
      const m = members[i]!;
      if (!states.isReady(m.index)) continue;
      const up = states.isUp(m.index, now);
      if (!up && !states.probeOut(m.index, now)) continue;
      anyUp = true;
      if (tried.includes(m.index)) continue;
      (!up ? probing : m.backup ? backups : primaries).push(i);
    }
    let candidates = primaries.length > 0 ? primaries : backups;
    // Probes are claimed in the up tiers only: the probing tier is what is left when the probes
    // are out, and panic ignores health.
    let claimProbes = true;
    if (candidates.length === 0 && probing.length > 0) {
      candidates = probing;
      claimProbes = false;
    }
    if (candidates.length === 0) {
      claimProbes = false;
      // Up backends exist and this connection tried them all: that is failover exhausted, not
      // "nothing is up" (panic would dial a black hole known to be down).
      if (anyUp) return 'backend_unavailable';
      if (this.onAllDown === 'refuse') return tried.length === 0 ? 'no_healthy_backend' : 'backend_unavailable';
      // Panic: whatever the operator left ready, primaries first, health ignored.
      for (const backup of [false, true]) {
        for (let i = 0; i < members.length; i++) {
          const m = members[i]!;
          if (m.backup === backup && states.isReady(m.index) && !tried.includes(m.index)) candidates.push(i);
        }
        if (candidates.length > 0) break;
      }
      if (candidates.length === 0) return 'backend_unavailable';
    }
    let full = false;
    while (candidates.length > 0) {
      const position = this.pick(candidates, clientAddress, now);
      const m = members[position]!;
      candidates = candidates.filter((c) => c !== position);
      const probe = claimProbes && states.onProbation(m.index, now);
      if (probe && !states.claimProbe(m.index, now, this.probeWindowMs)) continue; // another connection is the probe
      if (states.take(m.index, m.maxConnections)) return m;
      if (probe) states.dropProbe(m.index);
      full = true;
    }
    return full ? 'backend_full' : 'backend_unavailable';
  }

  /** A position among `candidates` (positions in members) by `balance`. */
  private pick(candidates: readonly number[], clientAddress: string, now: number): number {
    if (candidates.length === 1) return candidates[0]!;
    const members = this.members;
    switch (this.balance) {
      case 'round_robin': {
        let total = 0;
        let best = -1;
        for (const c of candidates) {
          const w = this.weight(members[c]!, now);
          total += w;
          this.current[c]! += w;
          if (best === -1 || this.current[c]! > this.current[best]!) best = c;
        }
        this.current[best]! -= total;
        return best;
      }
      case 'least_conn': {
        // Fewest active per unit of weight; ties go round, so equal backends share new connections.
        const start = this.cursor++ % candidates.length;
        let best = -1;
        let bestLoad = Infinity;
        for (let k = 0; k < candidates.length; k++) {
          const c = candidates[(start + k) % candidates.length]!;
          const load = this.states.active(members[c]!.index) / this.weight(members[c]!, now);
          if (load < bestLoad) {
            best = c;
            bestLoad = load;
          }
        }
        return best;
      }
      case 'random_two': {
        const a = this.weightedRandom(candidates, -1, now);
        const b = this.weightedRandom(candidates, a, now);
        const load = (c: number): number => this.states.active(members[c]!.index) / this.weight(members[c]!, now);
        return load(b) < load(a) ? b : a;
      }
      case 'source_hash': {
        // Weighted rendezvous hashing: every member scores the client, the highest wins. Removing
        // a member moves only the clients it won; a down or full member's clients go to their
        // second choice and come back when it does. Every thread computes the same answer.
        const client = hashString(clientAddress);
        let best = -1;
        let bestScore = -Infinity;
        for (const c of candidates) {
          const m = members[c]!;
          const u = (mix32(client ^ m.seed) + 0.5) / 4294967296;
          const score = -m.weight / Math.log(u);
          if (score > bestScore) {
            best = c;
            bestScore = score;
          }
        }
        return best;
      }
    }
  }

  private weightedRandom(candidates: readonly number[], except: number, now: number): number {
    let total = 0;
    for (const c of candidates) if (c !== except) total += this.weight(this.members[c]!, now);
    let r = Math.random() * total;
    for (const c of candidates) {
      if (c === except) continue;
      r -= this.weight(this.members[c]!, now);
      if (r < 0) return c;
    }
    return candidates.find((c) => c !== except)!;
  }
}

/** FNV-1a over a string's UTF-16 units, then mixed. */
export function hashString(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return mix32(h);
}

/** murmur3's finaliser: every input bit moves every output bit. */
function mix32(x: number): number {
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b);
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35);
  x ^= x >>> 16;
  return x >>> 0;
}
