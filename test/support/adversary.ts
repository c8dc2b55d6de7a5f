// The adversarial layer (issue 13): a seeded, bounded generator of hostile client behaviour, run
// against a real `smartproxy serve` process, with invariants checked during and after every run.
//
//   generatePlan(seed)    pure and deterministic: the same seed gives the same Plan, a JSON value
//                         (config versions + a list of steps) that prints, saves and replays.
//   runPlan(scope, plan)  starts the backends and the daemon, executes the steps (each bounded in
//                         time), checks the invariants, stops the daemon with SIGTERM. Returns
//                         every invariant that failed; never throws for a daemon failure.
//
// Steps run in plan order. A client step appends one operation to that client's lane (a promise
// chain, so one client's operations are serial while clients interleave); a `wait` step lets time
// pass; `burst` opens many clients at once; `reload` rewrites the file and sends SIGHUP.
//
// Pool backends (issue 17): routes "pool" (SNI pool.test) over four counting echo servers p0..p3
// and the SYN black hole, with every balance mode, weights, backups, per-backend max_connections,
// tcp and send_expect checks every 50-200 ms, short ejections, slow_start and both on_all_down. Their steps
// come from a second PRNG (a seed's other steps are unchanged): pool clients and bursts, `backend`
// (a server dies, every connection reset, and comes back), `state` (POST /backends/state: drain,
// maintenance, ready; in every route or one; unknown backends, routes and broken requests); a
// reload may give a pool route a new table or check definition, or drop or add it.
//
// Invariants (each failure is one line of RunResult.failures):
//   - the daemon never exits before SIGTERM; after it, it exits 0 within drain_timeout + slack;
//   - no fatal, "uncaught exception", "unhandled rejection" or "bug" log line; no error line but
//     the ones a deliberately invalid reload causes; every valid reload succeeds and leaves exactly
//     the binds of its file listening;
//   - while running (sampled from the admin API): busy <= workers, queued <= queue, route actives
//     <= route limits, per-client counts <= max_connections_per_ip (the largest any version of the
//     listener had), and no connection older than its state allows (queued, handshake, connecting,
//     lifetime), idle longer than `idle` or half-closed longer than `half_close`;
//   - every client socket is ended by the proxy within its deadlines (+ slack);
//   - once every client is gone: /stats active 0, busy 0, queued 0, route actives 0, no top client,
//     /connections empty, every /backends active and the /metrics gauges (backend connections
//     included) 0, and the daemon's descriptor count (less its listening sockets and its sockets to
//     the pool backends: checks) back to the baseline taken after start-up;
//   - /backends answers throughout, no row negative or over its max_connections; POST
//     /backends/state answers 200, 404 (unknown backend or route) or 400/405 (broken) as it should;
//   - no pool server accepts a proxied connection from IN_FLIGHT_DIAL_MS after a drain or
//     maintenance (of every route) was acknowledged until it is set ready again or a reload changes
//     its entries; no pool server holds more proxied connections than its routes' caps together.
import { once } from 'node:events';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import type { TestContext } from 'node:test';
import { writeProxyHeaderV1, writeProxyHeaderV2, writeProxyHeaderV2Local } from '../../src/proxy-protocol/write.ts';
import { startBlackhole } from './blackhole.ts';
import { adminGet, listeningPorts, startCli, type CliProxy } from './cli.ts';
import { closedPort, echo, startBackend } from './harness.ts';
import { parseExposition } from './metrics.ts';

// ---- a small seeded PRNG -----------------------------------------------------------------------

/** mulberry32: 32 bits of state, good enough to pick test cases, identical on every platform. */

/** pino's level numbers by the names the daemon logs. */
const LOG_LEVELS: Record<string, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60 };
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

class Rng {
  private readonly next: () => number;
  constructor(seed: number) {
    this.next = mulberry32(seed);
  }
  /** An integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.next() * items.length)]!;
  }
  weighted<T>(table: ReadonlyArray<readonly [T, number]>): T {
    const total = table.reduce((sum, [, w]) => sum + w, 0);
    let r = this.next() * total;
    for (const [value, w] of table) {
      r -= w;
      if (r < 0) return value;
    }
    return table[table.length - 1]![0];
  }
  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = Math.floor(this.next() * (i + 1));
      [items[i], items[j]] = [items[j]!, items[i]!];
    }
    return items;
  }
}

// ---- the plan ------------------------------------------------------------------------------------

/** Timeouts of every config version (fixed, so deadlines can be checked from outside). */
export const TIMEOUTS = {
  connectMs: 300,
  clientHelloMs: 300,
  idleMs: 2000,
  halfCloseMs: 1000,
  maxLifetimeMs: 4000,
  drainMs: 1000,
  queueMs: 500,
  /** queue_timeout of a listener set up for a flood (the queue must hold while the flood connects). */
  floodQueueMs: 2500,
} as const;

export type BackendName = 'echo' | 'talker' | 'silent' | 'closed' | 'blackhole';
export type ListenerKind = 'sni' | 'pp' | 'plain';
type Removal = 'keep' | 'drain' | 'close';

export interface RouteSpec {
  readonly name: string;
  readonly sni: readonly string[];
  readonly default: boolean;
  readonly backends: readonly BackendName[];
  /** Route max_connections; 0 = unlimited. */
  readonly maxConnections: number;
  readonly onRemoval: Removal | null;
  /** A route to the pool backends (issue 17): balance, weights, backups, caps, checks, ejection. */
  readonly pool?: PoolSpec;
}

/** The pool backends: four counting echo servers (which die and come back) and the SYN black hole. */
export const POOL = ['p0', 'p1', 'p2', 'p3', 'hole'] as const;
export type PoolName = (typeof POOL)[number];
export type Balance = 'round_robin' | 'least_conn' | 'random_two' | 'source_hash';

export interface PoolMember {
  readonly backend: PoolName;
  readonly weight: number;
  readonly backup: boolean;
  /** 0 = uncapped. */
  readonly maxConnections: number;
}

export interface PoolSpec {
  readonly balance: Balance;
  readonly onAllDown: 'panic' | 'refuse';
  readonly members: readonly PoolMember[];
  /** `send_expect` sends "PING\r\n" and expects "+PONG" (what the pool servers answer). */
  readonly check: { readonly type: 'tcp' | 'send_expect'; readonly intervalMs: number; readonly timeoutMs: number; readonly rise: number; readonly fall: number } | null;
  /** null: the defaults (3 failures, 30 s); else short cooldowns. */
  readonly ejection: { readonly failures: number; readonly baseMs: number; readonly maxShare: number } | null;
  /** slow_start in ms (0 = off; never with source_hash). */
  readonly slowStartMs: number;
}

export interface ListenerSpec {
  readonly name: string;
  readonly kind: ListenerKind;
  /** Indexes into the run's bind addresses (127.0.0.11.. on ports picked at run time). */
  readonly binds: readonly number[];
  readonly workers: number;
  readonly queue: number;
  readonly queueTimeoutMs: number;
  readonly maxPerIp: number;
  readonly ratePerSecond: number;
  readonly fairShareAbove: number;
  readonly reject: 'reset' | 'close';
  readonly onRemoval: Removal;
  readonly proxy: { readonly accept: 'v1' | 'v2' | 'any'; readonly require: boolean } | null;
  readonly routes: readonly RouteSpec[];
}

export interface ConfigVersion {
  /** false: the file carries an unknown key, so the reload must fail and change nothing. */
  readonly valid: boolean;
  readonly maxConnections: number;
  readonly listeners: readonly ListenerSpec[];
  /**
   * Final SIGHUP only: a block list this long (10.100.0.0 upwards, no client of ours) makes the
   * reload take a few hundred ms, and an extra listener binds "localhost:P" (a lookup on the
   * thread pool), so a SIGTERM sent meanwhile arrives while the reload is in flight.
   */
  readonly slow?: { readonly blockList: number };
}

export type HelloForm = 'whole' | 'records1' | 'tiny' | 'truncated' | 'malformed';

export type ClientOp =
  | { readonly op: 'connect'; readonly target: number; readonly src: string; readonly halfOpen: boolean }
  /** `unnamed`: a well-formed header that names no client (v1 UNKNOWN, v2 LOCAL): the balancer is the client. */
  | { readonly op: 'proxy'; readonly version: 'v1' | 'v2'; readonly form: 'valid' | 'unnamed' | 'truncated' | 'malformed'; readonly source: string; readonly tiny: boolean; readonly variant: number }
  | { readonly op: 'hello'; readonly sni: string | null; readonly form: HelloForm; readonly pad: number; readonly variant: number }
  | { readonly op: 'bytes'; readonly n: number; readonly pieces: number }
  | { readonly op: 'garbage'; readonly n: number; readonly variant: number }
  | { readonly op: 'pause'; readonly ms: number }
  | { readonly op: 'wait'; readonly ms: number }
  | { readonly op: 'end' }
  | { readonly op: 'reset' }
  | { readonly op: 'destroy' };

export type Step =
  | { readonly kind: 'client'; readonly client: number; readonly do: ClientOp }
  | { readonly kind: 'wait'; readonly ms: number }
  /** Clients first..first+count-1 connect at once (sources in turn), then each runs `script`. */
  | { readonly kind: 'burst'; readonly first: number; readonly count: number; readonly target: number; readonly sources: readonly string[]; readonly script: readonly ClientOp[] }
  /** Writes configs[version] and sends SIGHUP; `await` = wait for the outcome before going on. */
  | { readonly kind: 'reload'; readonly version: number; readonly await: boolean }
  /** Pool server `backend` (0..3) dies (listening socket closed, its connections reset) or comes back on its port. */
  | { readonly kind: 'backend'; readonly backend: number; readonly up: boolean }
  /**
   * POST /backends/state. `backend` 'unknown' names no backend of any config; `bad` sends a broken
   * request instead (no state, an unknown state, no backend, or a GET); `route` (with its listener)
   * narrows it, and a route that does not exist must give 404. `await` = wait for the answer.
   */
  | {
      readonly kind: 'state';
      readonly backend: PoolName | 'unknown';
      readonly state: 'ready' | 'drain' | 'maintenance';
      readonly listener: string | null;
      readonly route: string | null;
      readonly bad: 'nostate' | 'badstate' | 'nobackend' | 'get' | null;
      readonly await: boolean;
    };

export interface Plan {
  readonly format: 1;
  readonly seed: number;
  /** How many bind addresses the configs refer to. */
  readonly addresses: number;
  readonly configs: readonly ConfigVersion[];
  readonly steps: readonly Step[];
  /**
   * After the counts returned to 0: open `openAtTerm` clients, optionally SIGHUP to `hupVersion`,
   * then SIGTERM `termAfterMs` later.
   */
  readonly final: {
    readonly openAtTerm: number;
    readonly hupVersion: number | null;
    readonly termAfterMs: number;
    /** POST /backends/state drain for this pool backend, not waited for, just before SIGTERM. */
    readonly stateAtTerm?: PoolName | null;
  };
}

export interface GenerateOptions {
  /** Sum of the global waits: roughly how long the steps take. */
  readonly budgetMs?: number;
  /** Probability that the plan contains a queue flood (thousands of queued clients). */
  readonly floodChance?: number;
  /**
   * false: a reload never hands an address from one listener to another in one step (it stays or
   * goes free first), to look past failures of that kind. Default true.
   */
  readonly moveBinds?: boolean;
}

const ADDRESSES = 6;
/** Client source addresses; 127.0.0.1 and 127.0.0.2 are the trusted balancers of PROXY listeners. */
export const SOURCES = ['127.0.0.1', '127.0.0.2', '127.0.0.3', '127.0.0.4', '127.0.0.5', '127.0.0.6'] as const;
export const TRUSTED = ['127.0.0.1', '127.0.0.2'] as const;
const UNTRUSTED = ['127.0.0.3', '127.0.0.4', '127.0.0.5', '127.0.0.6'] as const;
/** Real clients named in PROXY headers: few, so per-client limits are reached. */
const REAL_CLIENTS = ['10.0.0.1', '10.0.0.2', '192.0.2.7'] as const;

/** Routes a listener may have (by name; the SNI names are fixed, the backends too). */
const ROUTE_CATALOG: ReadonlyArray<{ name: string; sni: string[]; backends: BackendName[] }> = [
  { name: 'echo', sni: ['echo.test'], backends: ['echo'] },
  { name: 'talk', sni: ['talk.test'], backends: ['talker'] },
  { name: 'silent', sni: ['silent.test'], backends: ['silent'] },
  { name: 'dead', sni: ['dead.test'], backends: ['closed'] },
  { name: 'slow', sni: ['slow.test'], backends: ['blackhole', 'echo'] },
  { name: 'wild', sni: ['*.wild.test'], backends: ['echo', 'talker'] },
];
const SNI_CHOICES: ReadonlyArray<string | null> = ['echo.test', 'talk.test', 'silent.test', 'dead.test', 'slow.test', 'a.wild.test', 'unknown.test', null];

/** The generator's view of the daemon while it writes steps. */
class Generator {
  readonly rng: Rng;
  /**
   * Every choice about the pool backends (routes, clients, deaths, runtime states) comes from this
   * second generator, so a seed's other steps are the same as before the pool existed.
   */
  readonly prng: Rng;
  /** Pool client scripts still to be interleaved (advanced by prng). */
  private readonly poolActive: Array<{ client: number; ops: ClientOp[] }> = [];
  /** Which pool servers (p0..p3) are up at this point of the plan. */
  private readonly poolUp = [true, true, true, true];
  readonly configs: ConfigVersion[] = [];
  readonly steps: Step[] = [];
  /** The version in force (the last valid one reloaded). */
  current: ConfigVersion;
  private listenerSerial = 0;
  private nextClient = 0;
  /** Client scripts still to be interleaved. */
  private readonly active: Array<{ client: number; ops: ClientOp[] }> = [];
  elapsed = 0;
  flooded = false;
  readonly moveBinds: boolean;

  constructor(seed: number, moveBinds: boolean) {
    this.rng = new Rng(seed);
    this.prng = new Rng((seed ^ 0x5eed17) >>> 0);
    this.moveBinds = moveBinds;
    const names: Array<[string, ListenerKind]> = [['a', 'sni'], ['b', 'pp'], ['c', 'plain']];
    if (this.rng.chance(0.5)) names.push([this.freshName(), this.rng.pick(['sni', 'pp', 'plain'] as const)]);
    const listeners = names.map(([name, kind]) => this.makeListener(name, kind, []));
    this.current = { valid: true, maxConnections: this.pickMaxConnections(), listeners: this.assignBinds(listeners, new Map()) };
    this.configs.push(this.current);
  }

  freshName(): string {
    return `n${++this.listenerSerial}`;
  }

  pickMaxConnections(): number {
    return this.rng.weighted([[0, 3], [4, 1], [8, 1], [16, 1]]);
  }

  makeListener(name: string, kind: ListenerKind, binds: number[], flood = false): ListenerSpec {
    const r = this.rng;
    const routes: RouteSpec[] = [];
    if (kind !== 'plain') {
      for (const entry of ROUTE_CATALOG) {
        if (!r.chance(0.6) && !(flood && entry.name === 'silent')) continue;
        routes.push({
          name: entry.name,
          sni: entry.sni,
          default: false,
          backends: entry.backends,
          maxConnections: r.chance(0.12) ? r.int(1, 3) : 0,
          onRemoval: r.chance(0.3) ? r.pick(['keep', 'drain', 'close'] as const) : null,
        });
      }
    }
    if (kind === 'plain' || r.chance(0.7) || routes.length === 0) {
      routes.push({
        name: 'fallback',
        sni: [],
        default: true,
        backends: [r.weighted([['echo', 4], ['talker', 2], ['silent', 1], ['closed', 1]] as const)],
        maxConnections: r.chance(0.1) ? r.int(1, 3) : 0,
        onRemoval: r.chance(0.3) ? r.pick(['keep', 'drain', 'close'] as const) : null,
      });
    }
    if (kind !== 'plain' && this.prng.chance(0.75)) routes.push(this.poolRoute());
    return {
      name,
      kind,
      binds,
      workers: flood ? 1 : r.pick([1, 2, 4, 8, 16]),
      queue: flood ? 2000 : r.pick([0, 2, 4, 8, 16]),
      queueTimeoutMs: flood ? TIMEOUTS.floodQueueMs : TIMEOUTS.queueMs,
      maxPerIp: flood ? 0 : r.chance(0.5) ? 0 : r.pick([2, 3, 5]),
      ratePerSecond: flood ? 0 : r.chance(0.12) ? r.pick([10, 30]) : 0,
      fairShareAbove: flood ? 0 : r.pick([0, 80, 50]),
      reject: r.pick(['reset', 'close'] as const),
      onRemoval: r.pick(['keep', 'drain', 'close'] as const),
      proxy: kind === 'pp' ? { accept: r.weighted([['any', 2], ['v1', 1], ['v2', 1]] as const), require: r.chance(0.5) } : null,
      routes,
    };
  }

  /**
   * Gives every listener at least one address: each address stays with its previous owner
   * (when that listener is kept) with probability 0.6, else moves to a random listener or to none.
   * Without moveBinds an address only stays or goes free, and a new listener that finds no address
   * that was free before is left out of this version.
   */
  assignBinds(listeners: ListenerSpec[], previous: Map<number, string>): ListenerSpec[] {
    const r = this.rng;
    const owner = new Map<number, string | null>();
    let names = listeners.map((l) => l.name);
    const mayTake = (a: number, name: string): boolean => this.moveBinds || previous.get(a) === undefined || previous.get(a) === name;
    for (let a = 0; a < ADDRESSES; a++) {
      const before = previous.get(a);
      if (before !== undefined && names.includes(before) && r.chance(0.6)) owner.set(a, before);
      else {
        const to = r.chance(0.25) ? null : r.pick(names);
        owner.set(a, to !== null && mayTake(a, to) ? to : null);
      }
    }
    const held = (name: string): number[] => [...owner].filter(([, o]) => o === name).map(([a]) => a);
    for (const name of [...names]) {
      if (held(name).length > 0) continue;
      const free = [...owner].filter(([a, o]) => o === null && mayTake(a, name)).map(([a]) => a);
      // With moves, 6 addresses for at most 5 listeners: some address is free or some listener has two.
      const donor = this.moveBinds ? names.find((n) => held(n).length >= 2) : undefined;
      if (free.length > 0) owner.set(r.pick(free), name);
      else if (donor !== undefined) owner.set(r.pick(held(donor)), name);
      else names = names.filter((n) => n !== name);
    }
    return listeners.filter((l) => names.includes(l.name)).map((l) => ({ ...l, binds: held(l.name) }));
  }

  /** The route to the pool backends ("pool.test"). */
  poolRoute(): RouteSpec {
    const p = this.prng;
    return {
      name: 'pool',
      sni: ['pool.test'],
      default: false,
      backends: [],
      maxConnections: p.chance(0.1) ? p.int(2, 4) : 0,
      onRemoval: p.chance(0.3) ? p.pick(['keep', 'drain', 'close'] as const) : null,
      pool: this.poolSpec(),
    };
  }

  /** A backend table (weights, backups, caps, maybe the black hole), a balance mode, checks, ejection. */
  poolSpec(): PoolSpec {
    const p = this.prng;
    const names: PoolName[] = p.shuffle(['p0', 'p1', 'p2', 'p3'] as PoolName[]).slice(0, p.int(1, 4));
    if (p.chance(0.35)) names.push('hole');
    const members = names.map((backend, i) => ({
      backend,
      weight: p.weighted([[1, 4], [2, 1], [3, 1]] as const),
      backup: i > 0 && p.chance(0.25), // the first is a primary: a route needs one
      maxConnections: p.chance(0.4) ? p.int(1, 3) : 0,
    }));
    const balance = p.pick(['round_robin', 'least_conn', 'random_two', 'source_hash'] as const);
    return {
      balance,
      onAllDown: p.pick(['panic', 'refuse'] as const),
      slowStartMs: balance !== 'source_hash' && p.chance(0.4) ? p.pick([200, 1000, 5000]) : 0,
      members,
      check: p.chance(0.6)
        ? { type: p.pick(['tcp', 'send_expect'] as const), intervalMs: p.pick([50, 100, 200]), timeoutMs: p.pick([100, 200, 300]), rise: p.int(1, 2), fall: p.int(1, 3) }
        : null,
      ejection: p.chance(0.7) ? { failures: p.int(1, 3), baseMs: p.pick([50, 100, 300]), maxShare: p.pick([50, 100]) } : null,
    };
  }

  /** Pool routes of a new version: some get a new table or check definition, some go, some come. */
  repool(listeners: ListenerSpec[]): ListenerSpec[] {
    const p = this.prng;
    return listeners.map((l) => {
      if (l.kind === 'plain') return l;
      const i = l.routes.findIndex((r) => r.pool !== undefined);
      if (i < 0) return p.chance(0.3) ? { ...l, routes: [...l.routes, this.poolRoute()] } : l;
      const what = p.weighted([['same', 5], ['table', 3], ['remove', 1]] as const);
      if (what === 'same') return l;
      if (what === 'remove' && l.routes.length > 1) return { ...l, routes: l.routes.filter((_, j) => j !== i) };
      return { ...l, routes: l.routes.map((r, j) => (j === i ? { ...r, pool: this.poolSpec() } : r)) };
    });
  }

  /** Listeners of the version in force with a pool route. */
  private poolListeners(): ListenerSpec[] {
    return this.current.listeners.filter((l) => l.routes.some((r) => r.pool !== undefined));
  }

  /** After each main action, maybe one pool action: a client, a burst, a death or return, a runtime state. */
  poolAction(): void {
    const p = this.prng;
    const action = p.weighted([['none', 60], ['client', 22], ['advance', this.poolActive.length > 0 ? 25 : 0], ['burst', 3], ['backend', 2], ['state', 6]] as const);
    const listeners = this.poolListeners();
    if (action === 'advance') this.poolAdvance();
    else if (action === 'client' && listeners.length > 0) {
      // Connect, PROXY header and ClientHello in a row (the hello is what routes it); the rest interleaved.
      const ops = this.poolScript(p.pick(listeners));
      const client = this.newClientId();
      const hello = ops.findIndex((op) => op.op === 'hello');
      for (const op of ops.slice(0, hello + 1)) this.steps.push({ kind: 'client', client, do: op });
      if (ops.length > hello + 1) this.poolActive.push({ client, ops: ops.slice(hello + 1) });
    } else if (action === 'burst' && listeners.length > 0) {
      this.poolBurst(p.pick(listeners));
    } else if (action === 'backend') {
      const i = p.int(0, 3);
      this.poolUp[i] = !this.poolUp[i];
      this.steps.push({ kind: 'backend', backend: i, up: this.poolUp[i]! });
    } else if (action === 'state') {
      const step = this.stateStep();
      this.steps.push(step);
      // Right after a drain or maintenance, a crowd that must all go elsewhere.
      if (step.kind === 'state' && step.state !== 'ready' && step.bad === null && step.await && listeners.length > 0 && p.chance(0.5)) this.poolBurst(p.pick(listeners));
    }
  }

  /** Many pool clients at once on listener `l`: each sends its hello, holds a moment, then FIN or RST. */
  private poolBurst(l: ListenerSpec): void {
    const p = this.prng;
    const script: ClientOp[] = [];
    const sources = l.kind === 'pp' ? [p.pick(TRUSTED)] : p.shuffle([...SOURCES]).slice(0, p.int(1, 6));
    if (l.kind === 'pp') script.push({ op: 'proxy', version: p.pick(['v1', 'v2'] as const), form: 'valid', source: p.pick(REAL_CLIENTS), tiny: false, variant: p.int(0, 9) });
    script.push(this.poolHello(), { op: 'wait', ms: p.int(100, 700) }, p.pick([{ op: 'end' }, { op: 'reset' }] as const));
    const count = p.int(3, 16);
    const first = this.nextClient;
    this.nextClient += count;
    this.steps.push({ kind: 'burst', first, count, target: p.pick(l.binds), sources, script });
  }


  private poolHello(): ClientOp {
    const p = this.prng;
    return { op: 'hello', sni: 'pool.test', form: p.weighted([['whole', 4], ['tiny', 1]] as const), pad: 0, variant: p.int(0, 99) };
  }

  /** A pool client: connect, a PROXY header on a PROXY listener, the ClientHello, traffic, an ending. */
  private poolScript(l: ListenerSpec): ClientOp[] {
    const p = this.prng;
    const src = l.kind === 'pp' && p.chance(0.8) ? p.pick(TRUSTED) : p.pick(SOURCES);
    const ops: ClientOp[] = [{ op: 'connect', target: p.pick(l.binds), src, halfOpen: p.chance(0.3) }];
    if (l.kind === 'pp' && (TRUSTED as readonly string[]).includes(src)) {
      ops.push({ op: 'proxy', version: p.pick(['v1', 'v2'] as const), form: 'valid', source: p.pick(REAL_CLIENTS), tiny: false, variant: p.int(0, 9) });
    }
    ops.push(this.poolHello());
    for (let i = p.int(0, 3); i > 0; i--) {
      const what = p.weighted([['bytes', 3], ['wait', 3], ['pause', 1]] as const);
      if (what === 'bytes') ops.push({ op: 'bytes', n: p.int(1, 5000), pieces: p.int(1, 3) });
      else if (what === 'wait') ops.push({ op: 'wait', ms: p.int(20, 400) });
      else ops.push({ op: 'pause', ms: p.int(50, 300) });
    }
    const last = p.weighted([['end', 4], ['reset', 2], ['abandon', 2]] as const);
    if (last !== 'abandon') ops.push({ op: last });
    return ops;
  }

  poolAdvance(): void {
    if (this.poolActive.length === 0) return;
    const i = this.prng.int(0, this.poolActive.length - 1);
    const script = this.poolActive[i]!;
    this.steps.push({ kind: 'client', client: script.client, do: script.ops.shift()! });
    if (script.ops.length === 0) this.poolActive.splice(i, 1);
  }

  get poolPending(): number {
    return this.poolActive.length;
  }

  /** POST /backends/state: mostly a pool backend in every route, sometimes one route, an unknown backend, a broken request. */
  private stateStep(): Step {
    const p = this.prng;
    const kind = p.weighted([['all', 8], ['route', 2], ['unknown', 1], ['bad', 1], ['noroute', 1]] as const);
    const state = p.weighted([['ready', 2], ['drain', 3], ['maintenance', 3]] as const);
    const listeners = this.poolListeners();
    const inForce = [...new Set(listeners.flatMap((l) => l.routes.flatMap((r) => r.pool?.members.map((m) => m.backend) ?? [])))];
    const backend = inForce.length > 0 && p.chance(0.8) ? p.pick(inForce) : p.pick(POOL);
    const one = listeners.length > 0 ? p.pick(listeners).name : null;
    const step = { kind: 'state', backend, state, listener: null, route: null, bad: null, await: p.chance(0.8) } as const;
    if (kind === 'unknown') return { ...step, backend: 'unknown' };
    if (kind === 'bad') return { ...step, bad: p.pick(['nostate', 'badstate', 'nobackend', 'get'] as const) };
    if (kind === 'noroute') return { ...step, listener: this.current.listeners[0]!.name, route: 'nosuchroute' };
    if (kind === 'route' && one !== null) return { ...step, listener: one, route: 'pool' };
    return step;
  }

  /** The next config: listeners kept (possibly changed), removed, added; binds moved. */
  nextConfig(opts: { flood?: boolean } = {}): ConfigVersion {
    const r = this.rng;
    const prev = this.current;
    const previousOwner = new Map<number, string>();
    for (const l of prev.listeners) for (const a of l.binds) previousOwner.set(a, l.name);
    let listeners: ListenerSpec[] = [];
    for (const l of prev.listeners) {
      if (prev.listeners.length > 1 && r.chance(0.15)) continue; // removed
      if (r.chance(0.5)) listeners.push(l);
      else {
        const fresh = this.makeListener(l.name, l.kind, []);
        // Half the time only the routes change, half the time only the numbers.
        listeners.push(r.chance(0.5) ? { ...l, routes: fresh.routes } : { ...fresh, routes: l.routes, proxy: l.proxy });
      }
    }
    // At least one listener is kept, so that without moveBinds some listener still has an address.
    if (listeners.length === 0) listeners.push(prev.listeners[0]!);
    if (listeners.length < 5 && r.chance(0.3)) listeners.push(this.makeListener(this.freshName(), r.pick(['sni', 'pp', 'plain'] as const), []));
    if (opts.flood) {
      const i = listeners.findIndex((l) => l.kind === 'sni');
      const flood = this.makeListener(i >= 0 ? listeners[i]!.name : this.freshName(), 'sni', [], true);
      if (i >= 0) listeners[i] = flood;
      else if (listeners.length < 5) listeners.push(flood);
      else listeners[0] = { ...flood, name: this.freshName() };
    }
    listeners = this.repool(this.assignBinds(listeners, previousOwner));
    return { valid: true, maxConnections: r.chance(0.5) ? prev.maxConnections : this.pickMaxConnections(), listeners };
  }

  reload(config: ConfigVersion, wait: boolean): void {
    this.configs.push(config);
    this.steps.push({ kind: 'reload', version: this.configs.length - 1, await: wait });
    if (config.valid) this.current = config;
  }

  /** An address to connect to: usually one the current config binds, sometimes any. */
  pickTarget(): { target: number; listener: ListenerSpec | null } {
    const r = this.rng;
    if (r.chance(0.08)) {
      const target = r.int(0, ADDRESSES - 1);
      return { target, listener: this.current.listeners.find((l) => l.binds.includes(target)) ?? null };
    }
    const listener = r.pick(this.current.listeners);
    return { target: r.pick(listener.binds), listener };
  }

  newClientId(): number {
    return this.nextClient++;
  }

  get clientCount(): number {
    return this.nextClient;
  }

  /** One hostile client's whole script, its first op (connect) included. */
  clientScript(target: number, listener: ListenerSpec | null): ClientOp[] {
    const r = this.rng;
    const kind = listener?.kind ?? 'sni';
    const src = r.pick(SOURCES);
    const ops: ClientOp[] = [{ op: 'connect', target, src, halfOpen: r.chance(0.5) }];
    const ending = (): ClientOp => r.weighted([[{ op: 'end' }, 3], [{ op: 'reset' }, 3], [{ op: 'destroy' }, 1]] as const);
    // A client may leave at any point: right after connect (queued, or waiting for its first bytes) ...
    if (r.chance(0.08)) return [...ops, ending()];
    let localWait = 0;
    const wait = (max: number): void => {
      const ms = Math.min(r.int(0, max), 1500 - localWait);
      if (ms <= 0) return;
      localWait += ms;
      ops.push({ op: 'wait', ms });
    };
    if (r.chance(0.25)) wait(150);
    const trusted = (TRUSTED as readonly string[]).includes(src);
    if (kind === 'pp' ? r.chance(trusted ? 0.8 : 0.25) : r.chance(0.04)) {
      ops.push(this.proxyOp());
      if (r.chance(0.1)) return [...ops, ending()]; // ... during the handshake ...
      if (r.chance(0.2)) wait(200);
    }
    const main = kind === 'plain' ? r.weighted([['bytes', 6], ['nothing', 2], ['tls', 1], ['garbage', 1]] as const) : r.weighted([['tls', 6], ['bytes', 2], ['garbage', 1], ['nothing', 1]] as const);
    if (main === 'tls') ops.push(this.helloOp());
    else if (main === 'bytes') ops.push({ op: 'bytes', n: r.int(1, 3000), pieces: r.int(1, 4) });
    else if (main === 'garbage') ops.push({ op: 'garbage', n: r.int(1, 600), variant: r.int(0, 3) });
    // ... while connecting or relaying (several ops of traffic, slow reads and pauses) ...
    const traffic = r.int(0, 4);
    let paused = 0;
    for (let i = 0; i < traffic; i++) {
      if (r.chance(0.1)) return [...ops, ending()];
      const what = r.weighted([['bytes', 3], ['pause', 2], ['wait', 2]] as const);
      if (what === 'bytes') ops.push({ op: 'bytes', n: r.int(1, 20_000), pieces: r.int(1, 5) });
      else if (what === 'pause' && paused < 1200) {
        const ms = r.int(100, 800);
        paused += ms;
        ops.push({ op: 'pause', ms });
      } else wait(400);
    }
    // ... and at the end: FIN (then maybe RST while half-closed), RST, or nothing (left to the deadlines).
    const last = r.weighted([['end', 35], ['reset', 20], ['destroy', 10], ['abandon', 35]] as const);
    if (last === 'end') {
      ops.push({ op: 'end' });
      if (r.chance(0.25)) {
        wait(600);
        ops.push({ op: 'reset' });
      }
    } else if (last !== 'abandon') ops.push({ op: last });
    return ops;
  }

  proxyOp(): ClientOp {
    const r = this.rng;
    return {
      op: 'proxy',
      version: r.pick(['v1', 'v2'] as const),
      form: r.weighted([['valid', 6], ['unnamed', 1.5], ['truncated', 1.5], ['malformed', 1.5]] as const),
      source: r.pick(REAL_CLIENTS),
      tiny: r.chance(0.2),
      variant: r.int(0, 9),
    };
  }

  helloOp(sni?: string | null, form?: HelloForm, pad?: number): ClientOp {
    const r = this.rng;
    return {
      op: 'hello',
      sni: sni !== undefined ? sni : r.pick(SNI_CHOICES),
      form: form ?? r.weighted([['whole', 40], ['tiny', 15], ['records1', 15], ['truncated', 15], ['malformed', 15]] as const),
      pad: pad ?? (r.chance(0.1) ? r.int(200, 6000) : 0),
      variant: r.int(0, 99),
    };
  }

  /** Starts a client: its connect becomes a step now, the rest is interleaved later. */
  startClient(): void {
    const { target, listener } = this.pickTarget();
    const ops = this.clientScript(target, listener);
    const client = this.newClientId();
    this.steps.push({ kind: 'client', client, do: ops[0]! });
    if (ops.length > 1) this.active.push({ client, ops: ops.slice(1) });
  }

  /** Emits the next op of a random started client. */
  advance(): void {
    if (this.active.length === 0) return;
    const i = this.rng.int(0, this.active.length - 1);
    const script = this.active[i]!;
    this.steps.push({ kind: 'client', client: script.client, do: script.ops.shift()! });
    if (script.ops.length === 0) this.active.splice(i, 1);
  }

  get pending(): number {
    return this.active.length;
  }

  wait(ms: number): void {
    this.steps.push({ kind: 'wait', ms });
    this.elapsed += ms;
  }

  /** Many clients at once with one small script: fills workers and queues, frees them together. */
  burst(): void {
    const r = this.rng;
    const { target, listener } = this.pickTarget();
    const kind = listener?.kind ?? 'sni';
    const menu: Array<readonly [ClientOp[], number]> = [
      [[], 2], // hold: no byte at all (client_hello or queue_timeout)
      [[this.helloOp('silent.test', 'whole')], 3], // holds a worker until idle
      [[this.helloOp('talk.test', 'whole'), { op: 'pause', ms: r.int(100, 600) }], 2],
      [[this.helloOp('echo.test', 'whole'), { op: 'bytes', n: r.int(1, 5000), pieces: 1 }, { op: 'end' }], 2],
      [[{ op: 'end' }], 1],
      [[{ op: 'reset' }], 1],
      [[this.helloOp(null, 'malformed'), { op: 'end' }], 1],
      [[this.helloOp('echo.test', 'whole'), { op: 'end' }], 1],
      [[{ op: 'bytes', n: r.int(1, 100), pieces: 1 }, { op: 'wait', ms: r.int(50, 400) }, { op: 'reset' }], 1],
      // More than routing reads (16 KB) while queued, then more bytes (and maybe FIN) later.
      [[this.helloOp(r.pick(SNI_CHOICES), r.pick(['records1', 'malformed'] as const), r.int(2800, 6000)), { op: 'wait', ms: r.int(100, 400) }, { op: 'bytes', n: 4096, pieces: 1 }, ...(r.chance(0.5) ? [{ op: 'end' } as const] : [])], 1],
    ];
    let script = r.weighted(menu);
    if (kind === 'pp' && r.chance(0.6)) {
      // Balancers naming the same real client, or none (then the balancer is the client): the
      // per-client limit must hold either way.
      const form = r.weighted([['valid', 3], ['unnamed', 1]] as const);
      script = [{ op: 'proxy', version: r.pick(['v1', 'v2'] as const), form, source: r.pick(REAL_CLIENTS), tiny: false, variant: 0 }, ...script];
    }
    const sources = kind === 'pp' && r.chance(0.6) ? [r.pick(TRUSTED)] : r.shuffle([...SOURCES]).slice(0, r.int(1, 3));
    const count = r.int(3, 24);
    const first = this.nextClient;
    this.nextClient += count;
    this.steps.push({ kind: 'burst', first, count, target, sources, script });
  }

  /**
   * A queue flood: one worker held, then 1,400-1,800 clients that each send a malformed hello and
   * FIN while queued, then the held worker is released so every queued client starts (and is
   * refused) in a row.
   */
  flood(): void {
    const r = this.rng;
    this.flooded = true;
    let listener = this.current.listeners.find((l) => l.queue >= 1000);
    if (listener === undefined) {
      this.reload(this.nextConfig({ flood: true }), true);
      listener = this.current.listeners.find((l) => l.queue >= 1000);
      if (listener === undefined) return; // without moveBinds the flood listener may find no address
    }
    const target = listener.binds[0]!;
    const holder = this.newClientId();
    this.steps.push({ kind: 'client', client: holder, do: { op: 'connect', target, src: '127.0.0.6', halfOpen: false } });
    this.steps.push({ kind: 'client', client: holder, do: this.helloOp('silent.test', 'whole') });
    this.wait(100);
    const count = r.int(1400, 1800);
    const first = this.nextClient;
    this.nextClient += count;
    this.steps.push({ kind: 'burst', first, count, target, sources: [...UNTRUSTED], script: [this.helloOp(null, 'malformed'), { op: 'end' }] });
    this.wait(r.int(50, 300));
    this.steps.push({ kind: 'client', client: holder, do: { op: 'reset' } });
    this.wait(300);
  }
}

/** The plan for `seed`: the same seed always gives the same plan. */
export function generatePlan(seed: number, opts: GenerateOptions = {}): Plan {
  const budget = opts.budgetMs ?? 2500;
  const g = new Generator(seed, opts.moveBinds ?? true);
  const r = g.rng;
  const floodAt = r.chance(opts.floodChance ?? 0.3) ? r.int(0, budget - 500) : -1;
  while (g.elapsed < budget) {
    if (floodAt >= 0 && !g.flooded && g.elapsed >= floodAt) {
      g.flood();
      continue;
    }
    const action = r.weighted([
      ['start', 25],
      ['advance', g.pending > 0 ? 45 : 0],
      ['wait', 15],
      ['burst', 4],
      ['reload', 3],
    ] as const);
    if (action === 'start') g.startClient();
    else if (action === 'advance') g.advance();
    else if (action === 'wait') g.wait(r.pick([5, 10, 20, 50, 100, 200]));
    else if (action === 'burst') g.burst();
    else {
      // Two reloads back to back, the first not waited for. The daemon reads the file when each
      // reload runs, so the first may load either file: both are valid.
      const quick = g.moveBinds && r.chance(0.15); // (the daemon may skip the first file: a move)
      const invalid = !quick && r.chance(0.12);
      if (quick) g.reload(g.nextConfig(), false);
      const next = g.nextConfig();
      g.reload(invalid ? { ...g.current, valid: false } : next, true);
    }
    g.poolAction();
  }
  while (g.pending > 0) {
    if (r.chance(0.15)) g.wait(r.pick([5, 20, 50]));
    else g.advance();
  }
  while (g.poolPending > 0) g.poolAdvance();
  let hupVersion: number | null = null;
  let termAfterMs = 0;
  if (r.chance(0.3)) {
    const slow = r.chance(0.5);
    g.configs.push(slow ? { ...g.nextConfig(), slow: { blockList: 20_000 } } : g.nextConfig());
    hupVersion = g.configs.length - 1;
    termAfterMs = r.pick([0, 0, 5, 20, 50]);
  }
  return {
    format: 1,
    seed,
    addresses: ADDRESSES,
    configs: g.configs,
    steps: g.steps,
    final: { openAtTerm: r.chance(0.4) ? r.int(1, 3) : 0, hupVersion, termAfterMs, stateAtTerm: g.prng.chance(0.3) ? g.prng.pick(POOL) : null },
  };
}

/** The plan as JSON, one step per line (readable in a terminal, valid JSON to replay). */
export function planToJson(plan: Plan): string {
  const head = { ...plan, configs: undefined, steps: undefined };
  const configs = plan.configs.map((c) => `    ${JSON.stringify(c)}`).join(',\n');
  const steps = plan.steps.map((s) => `    ${JSON.stringify(s)}`).join(',\n');
  const fields = Object.entries(head)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `  ${JSON.stringify(k)}: ${JSON.stringify(v)}`);
  return `{\n${fields.join(',\n')},\n  "configs": [\n${configs}\n  ],\n  "steps": [\n${steps}\n  ]\n}\n`;
}

// ---- wire bytes: ClientHellos, PROXY headers, garbage --------------------------------------------

const u8 = (n: number): Buffer => Buffer.from([n & 0xff]);
const u16 = (n: number): Buffer => Buffer.from([(n >> 8) & 0xff, n & 0xff]);
const u24 = (n: number): Buffer => Buffer.from([(n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]);

/** `n` bytes from a PRNG seeded with `seed` (the plan stays small: bytes are derived, not stored). */
function derivedBytes(n: number, seed: number): Buffer {
  const next = mulberry32(seed);
  const out = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(next() * 256);
  return out;
}

/** A ClientHello handshake message (type + length + body) with an optional SNI and padding. */
function helloMessage(sni: string | null, pad: number, variant: number, opts: { type?: number; badSniLength?: boolean } = {}): Buffer {
  const extensions: Buffer[] = [];
  if (sni !== null) {
    const name = Buffer.from(sni, 'ascii');
    const list = Buffer.concat([u8(0), u16(name.length), name]);
    const data = Buffer.concat([u16(list.length + (opts.badSniLength ? 40 : 0)), list]);
    extensions.push(Buffer.concat([u16(0), u16(data.length), data]));
  }
  extensions.push(Buffer.concat([u16(16), u16(5), u16(3), u8(2), Buffer.from('h2')])); // ALPN h2
  if (pad > 0) extensions.push(Buffer.concat([u16(21), u16(pad), Buffer.alloc(pad)]));
  const ext = Buffer.concat(extensions);
  const body = Buffer.concat([
    u16(0x0303),
    derivedBytes(32, variant + 1),
    u8(0),
    u16(4),
    u16(0x1301),
    u16(0x1302),
    u8(1),
    u8(0),
    u16(ext.length),
    ext,
  ]);
  return Buffer.concat([u8(opts.type ?? 1), u24(body.length), body]);
}

function tlsRecord(fragment: Buffer, length = fragment.length): Buffer {
  return Buffer.concat([u8(0x16), u16(0x0301), u16(length), fragment]);
}

/** The writes a `hello` op makes, and the gap between them (ms; 0 = the next event-loop turn). */
export function helloWrites(op: Extract<ClientOp, { op: 'hello' }>): { pieces: Buffer[]; gapMs: number } {
  const v = op.variant;
  switch (op.form) {
    case 'whole':
      return { pieces: [tlsRecord(helloMessage(op.sni, op.pad, v))], gapMs: 0 };
    case 'records1': {
      // The handshake message as 1-byte TLS records (legal, and the slowest to reassemble).
      const message = helloMessage(op.sni, op.pad, v);
      const records = Buffer.concat([...message].map((byte) => tlsRecord(Buffer.from([byte]))));
      return { pieces: splitEvery(records, v % 2 === 0 ? records.length : 97), gapMs: 0 };
    }
    case 'tiny': {
      const wire = tlsRecord(helloMessage(op.sni, op.pad, v));
      const size = Math.max(1 + (v % 7), Math.ceil(wire.length / 200));
      return { pieces: splitEvery(wire, size), gapMs: v % 3 };
    }
    case 'truncated': {
      const wire = tlsRecord(helloMessage(op.sni, op.pad, v));
      return { pieces: [wire.subarray(0, 1 + (v % Math.min(wire.length - 1, 80)))], gapMs: 0 };
    }
    case 'malformed': {
      const message = helloMessage(op.sni ?? 'echo.test', op.pad, v, { type: v % 4 === 0 ? 2 : 1, badSniLength: v % 4 === 1 });
      if (v % 4 === 2) return { pieces: [tlsRecord(derivedBytes(64, v), 64)], gapMs: 0 }; // a record of junk
      if (v % 4 === 3) return { pieces: [tlsRecord(message, 0x4800)], gapMs: 0 }; // record longer than TLS allows
      return { pieces: [tlsRecord(message)], gapMs: 0 };
    }
  }
}

/** The bytes of a `proxy` op. */
export function proxyBytes(op: Extract<ClientOp, { op: 'proxy' }>): Buffer {
  const fields = { source: { address: op.source, port: 40000 + op.variant }, destination: { address: '127.0.0.11', port: 443 } };
  const valid = op.version === 'v1' ? writeProxyHeaderV1(fields) : writeProxyHeaderV2(fields);
  if (op.form === 'valid') return valid;
  if (op.form === 'unnamed') return op.version === 'v1' ? Buffer.from('PROXY UNKNOWN\r\n', 'latin1') : writeProxyHeaderV2Local();
  if (op.form === 'truncated') return valid.subarray(0, 1 + (op.variant * 7) % (valid.length - 1));
  if (op.version === 'v1') {
    const lines = ['PROXY TCP4 10.0.0.1 127.0.0.11 99999 443\r\n', 'PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n', `PROXY ${'A'.repeat(120)}\r\n`, 'PROXY TCP6 10.0.0.1 127.0.0.11 1 2\r\n', 'PROXY UNKNOWN\n'];
    return Buffer.from(lines[op.variant % lines.length]!, 'latin1');
  }
  const bad = Buffer.from(valid);
  if (op.variant % 3 === 0) bad[12] = 0x31; // version 3
  else if (op.variant % 3 === 1) bad[13] = 0x55; // no such family
  else bad.writeUInt16BE(0xfff0, 14); // declares far more than it sends
  return bad;
}

/** Bytes that are neither TLS nor PROXY (or only look like the start of one). */
export function garbageBytes(op: Extract<ClientOp, { op: 'garbage' }>): Buffer {
  switch (op.variant % 4) {
    case 0:
      return Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'.repeat(Math.ceil(op.n / 27))).subarray(0, Math.max(1, op.n));
    case 1: {
      const b = derivedBytes(Math.max(1, op.n), op.n);
      b[0] = 0x80; // an SSLv2-style first byte
      return b;
    }
    case 2:
      return Buffer.concat([Buffer.from('\r\n\r\n\0\r\nQUI'), derivedBytes(op.n, 7)]); // most of a v2 signature
    default:
      return Buffer.concat([Buffer.from('PROXY'), derivedBytes(op.n, 9)]); // v1 without its space
  }
}

function splitEvery(buf: Buffer, size: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < buf.length; i += size) out.push(buf.subarray(i, i + size));
  return out;
}

// ---- the environment: bind addresses, backends, config files --------------------------------------

/** What runPlan needs of a test context: somewhere to register cleanup. node:test's `t` is one. */
export interface Scope {
  after(fn: () => unknown): void;
}

/** A Scope for scripts: run() calls every registered cleanup, last registered first. */
export class Cleanups implements Scope {
  private readonly fns: Array<() => unknown> = [];
  after(fn: () => unknown): void {
    this.fns.push(fn);
  }
  async run(): Promise<void> {
    while (this.fns.length > 0) {
      try {
        await this.fns.pop()!();
      } catch {
        /* cleanup is best effort */
      }
    }
  }
}

interface Env {
  readonly binds: readonly string[];
  /** The port of the "localhost" listener of a slow final reload. */
  readonly latePort: number;
  readonly adminPort: number;
  readonly backends: Readonly<Record<BackendName, string>>;
  /** The pool backends' addresses ("hole" is the blackhole). */
  readonly pool: Readonly<Record<PoolName, string>>;
  readonly poolServers: readonly PoolServer[];
}

/**
 * A pool backend (p0..p3): echoes, answers a check's "PING" with "+PONG", and keeps its own books:
 * when it accepted each proxied connection (first byte 0x16, a ClientHello; a check sends "PING" or
 * nothing) and how many it held at once. It can die (listening socket closed, every connection
 * reset) and come back on the same port.
 */
export class PoolServer {
  private server: net.Server | null = null;
  private readonly sockets = new Set<net.Socket>();
  private readonly proxied = new Set<net.Socket>();
  /** Date.now() of the accept of every proxied connection. */
  readonly accepts: number[] = [];
  /** Every proxied connection: accepted at, closed at (0 = still open). */
  readonly held: Array<{ at: number; closedAt: number }> = [];
  peak = 0;
  /** Most proxied connections the configs allow at once (set by the run); Infinity = no bound. */
  cap = Infinity;
  /** Moments it held more than `cap` proxied connections for longer than a close takes to arrive. */
  readonly over: Array<{ at: number; open: number }> = [];

  constructor(
    readonly name: string,
    readonly port: number,
  ) {}

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Listens (again); false when the port could not be bound. */
  async up(): Promise<boolean> {
    if (this.server !== null) return true;
    const server = net.createServer((socket) => this.accept(socket));
    const ok = await new Promise<boolean>((resolve) => {
      server.once('error', () => resolve(false));
      server.listen({ host: '127.0.0.1', port: this.port }, () => resolve(true));
    });
    if (!ok) return false;
    server.on('error', () => {});
    this.server = server;
    return true;
  }

  /** Dies: no more accepts (connects are refused), every open connection reset. */
  down(): void {
    this.server?.close();
    this.server = null;
    for (const socket of this.sockets) socket.resetAndDestroy();
  }

  private accept(socket: net.Socket): void {
    const at = Date.now();
    this.sockets.add(socket);
    let kind: 'unknown' | 'proxied' | 'check' = 'unknown';
    socket.on('error', () => {});
    socket.on('close', () => {
      this.sockets.delete(socket);
      this.proxied.delete(socket);
    });
    socket.on('end', () => socket.end());
    socket.on('data', (chunk: Buffer) => {
      if (kind === 'unknown') {
        kind = chunk[0] === 0x16 ? 'proxied' : 'check';
        if (kind === 'proxied') this.opened(socket, at);
        else if (chunk.subarray(0, 4).toString('latin1') === 'PING') return void socket.end('+PONG\r\n');
      }
      if (socket.writable) socket.write(chunk);
    });
  }

  private opened(socket: net.Socket, at: number): void {
    this.accepts.push(at);
    const held = { at, closedAt: 0 };
    this.held.push(held);
    socket.once('close', () => (held.closedAt = Date.now()));
    this.proxied.add(socket);
    this.peak = Math.max(this.peak, this.proxied.size);
    if (this.proxied.size <= this.cap) return;
    // The proxy's close of an earlier connection and this accept can reach this process in either
    // order: over the cap only if the connections open now are still open a moment later.
    const open = [...this.proxied];
    setTimeout(() => {
      const still = open.filter((s) => this.proxied.has(s)).length;
      if (still > this.cap) this.over.push({ at, open: still });
    }, 100).unref();
  }

  stop(): void {
    this.down();
  }
}

/** Bytes the talker backend sends on each connection before its FIN. */
const TALK_BYTES = 1 << 20;

/** Sends TALK_BYTES as fast as the connection takes them (respecting backpressure), then FIN. */
function talker(socket: net.Socket): void {
  socket.resume();
  const chunk = Buffer.alloc(64 * 1024, 0x74);
  let left = TALK_BYTES;
  const pump = (): void => {
    while (left > 0 && !socket.destroyed) {
      const n = Math.min(left, chunk.length);
      left -= n;
      if (!socket.write(n === chunk.length ? chunk : chunk.subarray(0, n))) {
        socket.once('drain', pump);
        return;
      }
    }
    if (!socket.destroyed) socket.end();
  };
  pump();
}

/** Reads and never answers; FIN answered with FIN. */
function silent(socket: net.Socket): void {
  socket.resume();
  socket.on('end', () => socket.end());
}

function lowestEphemeralPort(): number {
  try {
    const low = Number.parseInt(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0] ?? '', 10);
    return Number.isFinite(low) && low > 12000 ? low : 32768;
  } catch {
    return 32768;
  }
}

/**
 * A free port on `host` below the ephemeral range: an ephemeral port could be taken by some
 * outgoing connection between now and the reload that binds it.
 */
async function freePort(host: string): Promise<number> {
  const high = lowestEphemeralPort() - 1;
  for (let attempt = 0; attempt < 100; attempt++) {
    const port = 20000 + Math.floor(Math.random() * (high - 20000));
    const server = net.createServer();
    const ok = await new Promise<boolean>((resolve) => {
      server.once('error', () => resolve(false));
      server.listen({ host, port, exclusive: true }, () => resolve(true));
    });
    if (ok) {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      return port;
    }
  }
  throw new Error(`no free port found on ${host}`);
}

async function prepareEnv(scope: Scope, plan: Plan): Promise<Env> {
  const t = scope as unknown as TestContext; // the support helpers only call t.after()
  const [echoServer, talkServer, silentServer, closed, blackhole] = await Promise.all([
    startBackend(t, echo),
    startBackend(t, talker),
    startBackend(t, silent),
    closedPort(),
    startBlackhole(t),
  ]);
  const poolServers: PoolServer[] = [];
  for (const name of ['p0', 'p1', 'p2', 'p3']) {
    const server = new PoolServer(name, await freePort('127.0.0.1'));
    if (!(await server.up())) throw new Error(`pool backend ${name} could not listen on ${server.address}`);
    scope.after(() => server.stop());
    poolServers.push(server);
  }
  const binds: string[] = [];
  for (let i = 0; i < plan.addresses; i++) {
    const host = `127.0.0.${11 + i}`;
    binds.push(`${host}:${await freePort(host)}`);
  }
  return {
    binds,
    latePort: await freePort('127.0.0.1'),
    adminPort: await freePort('127.0.0.1'),
    backends: {
      echo: `127.0.0.1:${echoServer.port}`,
      talker: `127.0.0.1:${talkServer.port}`,
      silent: `127.0.0.1:${silentServer.port}`,
      closed: `127.0.0.1:${closed}`,
      blackhole: `127.0.0.1:${blackhole.port}`,
    },
    pool: { p0: poolServers[0]!.address, p1: poolServers[1]!.address, p2: poolServers[2]!.address, p3: poolServers[3]!.address, hole: `127.0.0.1:${blackhole.port}` },
    poolServers,
  };
}

const q = (s: string): string => JSON.stringify(s);

/** The TOML file of one config version. */
export function renderConfig(config: ConfigVersion, env: Env): string {
  const out: string[] = [
    '[limits]',
    `max_connections = ${config.maxConnections}`,
    '[timeouts]',
    `connect = "${TIMEOUTS.connectMs}ms"`,
    `client_hello = "${TIMEOUTS.clientHelloMs}ms"`,
    `idle = "${TIMEOUTS.idleMs}ms"`,
    `half_close = "${TIMEOUTS.halfCloseMs}ms"`,
    `max_lifetime = "${TIMEOUTS.maxLifetimeMs}ms"`,
    '[logging]',
    'level = "info"',
    '[admin]',
    `listen = "127.0.0.1:${env.adminPort}"`,
    '[shutdown]',
    `drain_timeout = "${TIMEOUTS.drainMs}ms"`,
  ];
  if (config.slow !== undefined) {
    const n = config.slow.blockList;
    const blocked = Array.from({ length: n }, (_, i) => `"10.${100 + ((i >> 16) & 127)}.${(i >> 8) & 255}.${i & 255}"`);
    out.push('[firewall]', `block = [${blocked.join(', ')}]`);
    out.push('[[listeners]]', 'name = "late"', `bind = ["localhost:${env.latePort}"]`, '  [[listeners.routes]]', '  name = "fallback"', '  default = true', `  backends = [${q(env.backends.echo)}]`);
  }
  config.listeners.forEach((l, i) => {
    out.push(
      '',
      '[[listeners]]',
      `name = ${q(l.name)}`,
      `bind = [${l.binds.map((b) => q(env.binds[b]!)).join(', ')}]`,
      `workers = ${l.workers}`,
      `queue = ${l.queue}`,
      `queue_timeout = "${l.queueTimeoutMs}ms"`,
      `reject = ${q(l.reject)}`,
      `on_removal = ${q(l.onRemoval)}`,
    );
    if (!config.valid && i === 0) out.push('wrokers = 3 # deliberately invalid: the reload must be refused');
    out.push('  [listeners.limits]', `  max_connections_per_ip = ${l.maxPerIp}`, `  fair_share_above = ${l.fairShareAbove}`);
    if (l.ratePerSecond > 0) out.push(`  connection_rate_per_ip = { count = ${l.ratePerSecond}, per = "1s" }`);
    if (l.proxy !== null) {
      out.push('  [listeners.proxy_protocol]', `  accept = ${q(l.proxy.accept)}`, `  trusted = [${TRUSTED.map(q).join(', ')}]`, `  require = ${l.proxy.require}`);
    }
    for (const r of l.routes) {
      out.push('  [[listeners.routes]]', `  name = ${q(r.name)}`);
      if (r.sni.length > 0) out.push(`  sni = [${r.sni.map(q).join(', ')}]`);
      if (r.default) out.push('  default = true');
      const pool = r.pool;
      if (pool === undefined) out.push(`  backends = [${r.backends.map((b) => q(env.backends[b])).join(', ')}]`);
      else {
        const entry = (m: PoolMember): string => `{ address = ${q(env.pool[m.backend])}, weight = ${m.weight}, backup = ${m.backup}, max_connections = ${m.maxConnections} }`;
        out.push(`  backends = [${pool.members.map(entry).join(', ')}]`, `  balance = ${q(pool.balance)}`, `  on_all_down = ${q(pool.onAllDown)}`);
        if (pool.slowStartMs > 0) out.push(`  slow_start = "${pool.slowStartMs}ms"`);
      }
      if (r.onRemoval !== null) out.push(`  on_removal = ${q(r.onRemoval)}`);
      if (r.maxConnections > 0) out.push('    [listeners.routes.limits]', `    max_connections = ${r.maxConnections}`);
      if (pool?.check) {
        const c = pool.check;
        out.push('    [listeners.routes.health_check]', `    type = ${q(c.type)}`, `    interval = "${c.intervalMs}ms"`, `    timeout = "${c.timeoutMs}ms"`, `    rise = ${c.rise}`, `    fall = ${c.fall}`);
        if (c.type === 'send_expect') out.push(`    send = ${q('PING\r\n')}`, `    expect = ${q('+PONG')}`);
      }
      if (pool?.ejection) {
        const e = pool.ejection;
        out.push('    [listeners.routes.ejection]', `    consecutive_failures = ${e.failures}`, `    base_time = "${e.baseMs}ms"`, `    max_time = "1s"`, `    max_share = ${e.maxShare}`);
      }
    }
  });
  return `${out.join('\n')}\n`;
}

// ---- the run ---------------------------------------------------------------------------------------

export interface RunOptions {
  /** Added to every deadline the proxy is held to (timer lateness, event-loop turns, sampling); default 2000. */
  readonly slackMs?: number;
  /** Progress lines, for the fuzz script. */
  readonly progress?: (line: string) => void;
}

export interface RunResult {
  readonly seed: number;
  /** One line per invariant that failed; empty when the run passed. */
  readonly failures: string[];
  readonly durationMs: number;
  /** What the run did: clients, reloads, how connections ended. */
  readonly summary: string;
  /** The daemon's last log lines and its stderr, for a failure report. */
  readonly diagnostics: string;
}

const delay = (ms: number): Promise<void> => new Promise((resolve) => (ms <= 0 ? setImmediate(resolve) : setTimeout(resolve, ms)));

/** `promise`'s value, or `fallback` once `ms` have passed. */
async function within<T>(promise: Promise<T>, ms: number, fallback: T): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([promise, new Promise<T>((resolve) => (timer = setTimeout(() => resolve(fallback), Math.max(0, ms))))]);
  } finally {
    clearTimeout(timer);
  }
}

/** One client connection as the adversary sees it. */
class Client {
  socket: net.Socket | null = null;
  src = '';
  target = -1;
  connectedAt = 0;
  lastActAt = 0;
  /** When the proxy ended the connection as seen from here (FIN, error or close); 0 = not yet. */
  endedAt = 0;
  endedHow = '';
  /** The client reset or destroyed its socket before the proxy ended it. */
  selfClosed = false;
  pausedMs = 0;
  connectError: string | null = null;
  bytesIn = 0;
  readonly ops: string[] = [];
  lane: Promise<void> = Promise.resolve();
  readonly ended: Promise<void>;
  private wake!: () => void;

  constructor(readonly id: number) {
    this.ended = new Promise((resolve) => (this.wake = resolve));
  }

  markEnded(how: string): void {
    if (this.endedAt !== 0) return;
    this.endedAt = Date.now();
    this.endedHow = how;
    this.wake();
  }

  get usable(): boolean {
    return this.socket !== null && !this.socket.destroyed && this.socket.writable;
  }
}

interface LimitsOfListener {
  readonly kind: ListenerKind;
  workers: number;
  queue: number;
  queueMs: number;
  perIp: number;
  readonly routes: Map<string, number>;
}

interface StatsListener {
  name: string;
  bind: string[];
  draining: boolean;
  busy: number;
  queued: number;
  active: number;
  activeClients?: number;
  routedActive?: number;
  routes: Array<{ name: string; active: number }>;
  topClients: Array<{ client: string; active: number }>;
}
interface Stats {
  active: number;
  slotsBusy?: number | null;
  /** Event-loop threads of the daemon (absent before threads existed). */
  threads?: number;
  listeners: StatsListener[];
}
interface ConnInfo {
  id: number;
  listener: string;
  route: string | null;
  client: string;
  via: string | null;
  state: string;
  ageMs: number;
  bytesFromClient: number;
  bytesFromBackend: number;
}

/** A row of GET /backends. */
interface BackendRow {
  listener: string;
  route: string;
  backend: string;
  health: string;
  state: string;
  active: number;
}

/**
 * How long after a drain or maintenance was acknowledged a pool server may still see a connection
 * the proxy dialled before it. The proxy picks and dials in one turn of its loop, and a loopback
 * handshake completes in the kernel at once, so such a connection is accepted before the answer is
 * even sent; but this process may handle the accept and the answer in either order, within one
 * turn of its own loop (a long one while a flood connects).
 */
const IN_FLIGHT_DIAL_MS = 150;

/** An HTTP request to the admin API (POST /backends/state is its one write). */
function adminRequest(port: number, method: string, urlPath: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

/** The entries (listener/route/weight/backup/max) that name `address` in a version: a runtime state lasts while these stay. */
function entriesOf(config: ConfigVersion, name: PoolName): string {
  const out: string[] = [];
  for (const l of config.listeners) {
    for (const r of l.routes) for (const m of r.pool?.members ?? []) if (m.backend === name) out.push(`${l.name}/${r.name}/${m.weight}/${m.backup}/${m.maxConnections}`);
  }
  return out.sort().join(' ');
}

const OUTCOME_OK = 'configuration reloaded';
const OUTCOME_FAILED = /^reload failed/;
const MAX_FAILURES = 40;

class Run {
  readonly failures: string[] = [];
  private readonly failedKeys = new Set<string>();
  private readonly clients = new Map<number, Client>();
  private readonly plan: Plan;
  private readonly slack: number;
  private readonly progress: (line: string) => void;
  private readonly startedAt = Date.now();
  private readonly limits = new Map<string, LimitsOfListener>();
  private maxQueueMs: number = TIMEOUTS.queueMs;
  private globalMax = 0;
  private proxy: CliProxy | null = null;
  private env: Env | null = null;
  private inForce: ConfigVersion;
  private readonly reloadsSent: Array<{ version: number; valid: boolean }> = [];
  private readonly outcomes: Array<Record<string, unknown>> = [];
  private outcomeCursor = 0;
  private reloadTracking = true;
  private sigtermSent = false;
  private exitedEarly = false;
  private stopSampling = false;
  private baselineFds = -1;
  private baselineKinds = new Map<string, number>();
  private readonly idleSeen = new Map<number, { bytes: number; since: number }>();
  private readonly closingSeen = new Map<number, number>();
  private endings = '';
  private samples = 0;
  /**
   * Drain or maintenance of a pool backend in every route, acknowledged at `from`: no proxied
   * connection may reach it from `from` + IN_FLIGHT_DIAL_MS until `to` (a "ready" for it was sent,
   * or a reload that changes its entries). `reloads`: reloads sent before the POST (all of them
   * must have taken effect before it, or the routes it applied to are not known).
   */
  private readonly windows: Array<{ backend: PoolName; state: string; sentAt: number; from: number; to: number; reloads: number; dropped: number }> = [];
  /** Per listener/route/address: the largest max_connections any version gives it (Infinity = uncapped). */
  private readonly rowCaps = new Map<string, number>();
  private readonly posts: Array<Promise<void>> = [];
  private postsSent = 0;
  private postsOk = 0;
  private windowsChecked = 0;
  /**
   * When a reload last dropped a route of a pool backend: connections of a removed route keep
   * going under on_removal "keep", and a runtime state applies to the routes in force only.
   */
  private readonly dropped = new Map<PoolName, number>();
  private deaths = 0;
  /** The last valid version sent with SIGHUP (a runtime state ends when a reload changes its backend's entries). */
  private lastSent: ConfigVersion;
  /** Listeners and routes a reload removed under on_removal "close" or "drain" (in every version that had them). */
  private readonly removals: Array<{ listener: string; route: string | null; at: number; policy: 'close' | 'drain' }> = [];

  constructor(plan: Plan, opts: RunOptions) {
    this.plan = plan;
    this.slack = opts.slackMs ?? 2000;
    this.progress = opts.progress ?? (() => {});
    this.inForce = plan.configs[0]!;
    this.lastSent = this.inForce;
    // Upper bounds over every version: connections keep the limits of the version that admitted them.
    let unlimitedGlobal = false;
    for (const config of plan.configs) {
      if (!config.valid) continue;
      if (config.maxConnections === 0) unlimitedGlobal = true;
      this.globalMax = Math.max(this.globalMax, config.maxConnections);
      for (const l of config.listeners) {
        const perIp = l.maxPerIp === 0 ? Infinity : l.maxPerIp;
        const seen = this.limits.get(l.name);
        this.maxQueueMs = Math.max(this.maxQueueMs, l.queueTimeoutMs);
        if (seen === undefined) {
          this.limits.set(l.name, { kind: l.kind, workers: l.workers, queue: l.queue, queueMs: l.queueTimeoutMs, perIp, routes: new Map() });
        } else {
          seen.workers = Math.max(seen.workers, l.workers);
          seen.queue = Math.max(seen.queue, l.queue);
          seen.queueMs = Math.max(seen.queueMs, l.queueTimeoutMs);
          seen.perIp = Math.max(seen.perIp, perIp);
        }
        const routes = this.limits.get(l.name)!.routes;
        for (const r of l.routes) routes.set(r.name, Math.max(routes.get(r.name) ?? 0, r.maxConnections === 0 ? Infinity : r.maxConnections));
      }
    }
    if (unlimitedGlobal) this.globalMax = Infinity;
  }

  fail(message: string, key: string = message): void {
    if (this.failedKeys.has(key)) return;
    this.failedKeys.add(key);
    if (this.failures.length === MAX_FAILURES) this.failures.push('... more failures left out');
    if (this.failures.length >= MAX_FAILURES) return;
    this.failures.push(message);
    this.progress(`  FAIL ${message}`);
  }

  private since(at: number): string {
    return `+${at - this.startedAt} ms`;
  }

  private get pid(): number {
    return this.proxy!.pid;
  }

  // ---- the whole run ----

  async execute(scope: Scope): Promise<void> {
    const plan = this.plan;
    this.env = await prepareEnv(scope, plan);
    this.setPoolCaps();
    const first = plan.configs[0]!;
    this.proxy = await startCli(scope as unknown as TestContext, renderConfig(first, this.env), { ready: first.listeners.map((l) => l.name), admin: true });
    void this.proxy.exited.then((r) => {
      if (this.sigtermSent) return;
      this.exitedEarly = true;
      this.fail(`the daemon exited before SIGTERM (${r.code !== null ? `code ${r.code}` : r.signal})`, 'exited');
    });
    await this.takeBaseline();
    const sampler = this.sample();
    const hardDeadline = Date.now() + plan.steps.reduce((ms, s) => ms + (s.kind === 'wait' ? s.ms : 0), 0) + 30_000;
    await this.runSteps(hardDeadline);
    await within(Promise.all(this.posts), 6000, []);
    await this.settleClients();
    this.stopSampling = true;
    await sampler;
    if (!this.exitedEarly) {
      await this.checkZero();
      await this.checkDescriptors();
      await this.checkListening('at the end');
    }
    await this.finish();
    this.checkLogs();
    this.checkPool();
  }

  // ---- the pool backends ----

  /**
   * Each pool server's bound: the sum over every listener/route that ever has it of the largest
   * max_connections a version gives that entry (the cap is per route); unbounded if any is uncapped.
   */
  private setPoolCaps(): void {
    const env = this.env!;
    const perServer = new Map<string, Map<string, number>>();
    for (const config of this.plan.configs) {
      if (!config.valid) continue;
      for (const l of config.listeners) {
        for (const r of l.routes) {
          for (const m of r.pool?.members ?? []) {
            const cap = m.maxConnections === 0 ? Infinity : m.maxConnections;
            const row = `${l.name}/${r.name}/${env.pool[m.backend]}`;
            this.rowCaps.set(row, Math.max(this.rowCaps.get(row) ?? 0, cap));
            const keys = perServer.get(m.backend) ?? new Map<string, number>();
            keys.set(`${l.name}/${r.name}`, Math.max(keys.get(`${l.name}/${r.name}`) ?? 0, cap));
            perServer.set(m.backend, keys);
          }
        }
      }
    }
    for (const server of env.poolServers) {
      const keys = perServer.get(server.name);
      server.cap = keys === undefined ? 0 : [...keys.values()].reduce((a, b) => a + b, 0);
    }
  }

  private async poolBackend(step: Extract<Step, { kind: 'backend' }>): Promise<void> {
    const server = this.env!.poolServers[step.backend]!;
    if (!step.up) {
      this.deaths++;
      server.down();
    } else if (!(await server.up())) this.progress(`  pool backend ${server.name} could not listen again on ${server.address}`);
  }

  /** POST /backends/state as the step says; checks the answer and opens or ends no-connection windows. */
  private async postState(step: Extract<Step, { kind: 'state' }>): Promise<void> {
    const env = this.env!;
    const address = step.backend === 'unknown' ? '127.0.0.1:1' : env.pool[step.backend];
    const params = new URLSearchParams();
    if (step.bad !== 'nobackend') params.set('backend', address);
    if (step.bad === 'badstate') params.set('state', 'offline');
    else if (step.bad !== 'nostate') params.set('state', step.state);
    if (step.listener !== null) params.set('listener', step.listener);
    if (step.route !== null) params.set('route', step.route);
    const urlPath = `/backends/state?${params}`;
    this.collectOutcomes();
    const reloads = this.reloadsSent.length;
    const settled = this.outcomes.length === reloads;
    const sentAt = Date.now();
    this.postsSent++;
    if (step.state === 'ready' && step.backend !== 'unknown' && step.bad === null) {
      for (const w of this.windows) if (w.backend === step.backend && w.to > sentAt) w.to = sentAt;
    }
    const ask = async (): Promise<void> => {
      const res = await within(
        adminRequest(env.adminPort, step.bad === 'get' ? 'GET' : 'POST', urlPath).catch((err: NodeJS.ErrnoException) => ({ status: -1, body: err.code ?? err.message })),
        5000,
        null,
      );
      const ackAt = Date.now();
      const what = `${step.bad === 'get' ? 'GET' : 'POST'} ${urlPath}`;
      if (res === null) return this.fail(`${what}: no answer within 5 s`, 'post-timeout');
      if (res.status === -1) {
        if (!this.sigtermSent) this.fail(`${what}: ${res.body}`, `post-error:${res.body}`);
        return;
      }
      let expected: number[];
      if (step.bad === 'get') expected = [405];
      else if (step.bad !== null) expected = [400];
      else if (step.backend === 'unknown' || step.route === 'nosuchroute') expected = [404];
      else if (!settled || this.reloadsSent.length !== reloads) expected = [200, 404]; // which routes are in force is not known
      else {
        // The black hole is also the first backend of the catalog's "slow" route.
        const named = (r: RouteSpec): boolean => (r.pool?.members.some((m) => m.backend === step.backend) ?? false) || (step.backend === 'hole' && r.backends.includes('blackhole'));
        const has = this.inForce.listeners.some((l) => (step.listener === null || l.name === step.listener) && l.routes.some((r) => (step.route === null || r.name === step.route) && named(r)));
        expected = [has ? 200 : 404];
      }
      if (!expected.includes(res.status)) this.fail(`${what} answered ${res.status} (${res.body.trim().slice(0, 200)}), expected ${expected.join(' or ')}`, `post:${step.bad}:${step.backend === 'unknown'}:${res.status}`);
      if (res.status !== 200) return;
      this.postsOk++;
      if (step.bad === null && step.backend !== 'unknown' && step.backend !== 'hole' && step.state !== 'ready' && step.listener === null && this.reloadsSent.length === reloads) {
        this.windows.push({ backend: step.backend, state: step.state, sentAt, from: ackAt, to: Infinity, reloads, dropped: this.dropped.get(step.backend) ?? 0 });
      }
    };
    if (step.await) await ask();
    else this.posts.push(ask());
  }

  /** A reload that changes a pool backend's entries (or removes them) gives it back its "ready": its windows end. */
  private reloadSent(config: ConfigVersion): void {
    if (!config.valid) return;
    const now = Date.now();
    const keys = (c: ConfigVersion, name: PoolName): string[] => entriesOf(c, name).split(' ').filter((e) => e !== '').map((e) => e.split('/').slice(0, 2).join('/'));
    for (const name of POOL) {
      const kept = new Set(keys(config, name));
      if ([...keys(this.inForce, name), ...keys(this.lastSent, name)].some((k) => !kept.has(k))) this.dropped.set(name, now);
    }
    for (const w of this.windows) {
      if (w.to <= now) continue;
      const after = entriesOf(config, w.backend);
      if (after !== entriesOf(this.inForce, w.backend) || after !== entriesOf(this.lastSent, w.backend)) w.to = now;
    }
    this.lastSent = config;
  }

  /**
   * After the run: no proxied connection reached a drained or maintained backend (beyond the dial
   * in flight), and no pool server ever held more connections than every route's caps together.
   */
  private checkPool(): void {
    const env = this.env!;
    for (const w of this.windows) {
      // Every reload sent before the POST must have been in force when it was sent.
      const loggedAt = (o: Record<string, unknown>): number => (typeof o.time === 'number' ? o.time : Date.parse(String(o.time)));
      const unsettled = this.outcomes.length < w.reloads || this.outcomes.slice(0, w.reloads).some((o) => !(loggedAt(o) < w.sentAt));
      if (unsettled) continue;
      const server = env.poolServers.find((x) => x.name === w.backend)!;
      const late = server.accepts.filter((at) => at > w.from + IN_FLIGHT_DIAL_MS && at < w.to);
      this.windowsChecked++;
      // Maintenance also ends what the backend still holds, after drain_timeout.
      const bound = w.from + TIMEOUTS.drainMs + this.slack;
      if (w.state === 'maintenance' && w.to > bound) {
        const since = w.dropped;
        const kept = server.held.filter((h) => h.at > since && h.at < w.from && (h.closedAt === 0 || h.closedAt > bound));
        if (kept.length > 0) this.fail(`pool backend ${w.backend} still held ${kept.length} connection(s) ${TIMEOUTS.drainMs + this.slack} ms after its "maintenance" was acknowledged at ${this.since(w.from)} (drain_timeout ${TIMEOUTS.drainMs} ms)`, `maint:${w.backend}:${w.from}`);
      }
      if (late.length > 0) {
        this.fail(
          `pool backend ${w.backend} (${server.address}) accepted ${late.length} proxied connection(s) after its "${w.state}" was acknowledged at ${this.since(w.from)} (first at ${this.since(late[0]!)}; the state lasted until ${w.to === Infinity ? 'the end' : this.since(w.to)})`,
          `window:${w.backend}:${w.from}`,
        );
      }
    }
    for (const server of env.poolServers) {
      if (server.over.length > 0) {
        const o = server.over[0]!;
        this.fail(`pool backend ${server.name} held ${o.open} proxied connections at ${this.since(o.at)}, more than the max_connections of its routes allow together (${server.cap})`, `over:${server.name}`);
      }
    }
  }

  // ---- admin API ----

  private async admin(path: string): Promise<string> {
    const res = await within(
      adminGet({ port: this.env!.adminPort }, path).catch((err: NodeJS.ErrnoException) => ({ status: -1, body: err.code ?? err.message })),
      5000,
      null,
    );
    if (res === null) throw new Error(`GET ${path}: no answer within 5 s`);
    if (res.status !== 200) throw new Error(`GET ${path}: ${res.status === -1 ? res.body : `status ${res.status}`}`);
    return res.body;
  }

  private async stats(): Promise<Stats> {
    return JSON.parse(await this.admin('/stats')) as Stats;
  }

  private async connections(): Promise<{ total: number; connections: ConnInfo[] }> {
    return JSON.parse(await this.admin('/connections?limit=10000')) as { total: number; connections: ConnInfo[] };
  }

  // ---- descriptors ----

  /**
   * Open descriptors of the daemon, less its listening sockets (reloads change how many there are)
   * and its sockets to the pool backends (active health checks come and go on their own). One
   * reading of the descriptors and one of the socket tables, so a check that opens or closes
   * meanwhile is counted at most once.
   */
  private descriptors(): number {
    const env = this.env!;
    const poolPorts = new Set(Object.values(env.pool).map((a) => Number(a.split(':')[1]).toString(16).toUpperCase().padStart(4, '0')));
    const sockets: string[] = [];
    let others = 0;
    for (const fd of readdirSync(`/proc/${this.pid}/fd`)) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${this.pid}/fd/${fd}`));
        if (m !== null) sockets.push(m[1]!);
        else others++;
      } catch {
        /* closed while we looked */
      }
    }
    const skip = new Set<string>();
    for (const table of ['tcp', 'tcp6']) {
      for (const row of readFileSync(`/proc/${this.pid}/net/${table}`, 'utf8').split('\n').slice(1)) {
        const cols = row.trim().split(/\s+/);
        if (cols.length >= 10 && (cols[3] === '0A' || poolPorts.has(cols[2]!.split(':').pop()!))) skip.add(cols[9]!);
      }
    }
    return others + sockets.filter((inode) => !skip.has(inode)).length;
  }

  /** The daemon's TCP sockets as "local>remote state" (hex, as /proc/net/tcp has them), for a report. */
  private tcpSockets(): string[] {
    const inodes = new Set<string>();
    for (const fd of readdirSync(`/proc/${this.pid}/fd`)) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${this.pid}/fd/${fd}`));
        if (m !== null) inodes.add(m[1]!);
      } catch {
        /* closed while we looked */
      }
    }
    const out: string[] = [];
    const listed = new Set<string>();
    for (const table of ['tcp', 'tcp6', 'udp', 'udp6', 'unix']) {
      for (const row of readFileSync(`/proc/${this.pid}/net/${table}`, 'utf8').split('\n').slice(1)) {
        const cols = row.trim().split(/\s+/);
        const inode = table === 'unix' ? cols[6] : cols[9];
        if (inode === undefined || !inodes.has(inode)) continue;
        listed.add(inode);
        if (table.startsWith('tcp') && cols[3] !== '0A') out.push(`${cols[1]}>${cols[2]} ${cols[3]}`);
        else if (!table.startsWith('tcp')) out.push(`${table} ${cols.slice(1, 3).join('>')}`);
      }
    }
    const unlisted = [...inodes].filter((i) => !listed.has(i)).length;
    if (unlisted > 0) out.push(`${unlisted} in no table (closed by the peer or never connected, descriptor still open)`);
    return out;
  }

  /** The daemon's sockets whose peer is a pool backend (a check, once no client is left). */
  private checkSockets(): number {
    const env = this.env!;
    const ports = new Set(Object.values(env.pool).map((a) => Number(a.split(':')[1]).toString(16).toUpperCase().padStart(4, '0')));
    const inodes = new Set<string>();
    for (const fd of readdirSync(`/proc/${this.pid}/fd`)) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${this.pid}/fd/${fd}`));
        if (m !== null) inodes.add(m[1]!);
      } catch {
        /* closed while we looked */
      }
    }
    let n = 0;
    for (const row of readFileSync(`/proc/${this.pid}/net/tcp`, 'utf8').split('\n').slice(1)) {
      const cols = row.trim().split(/\s+/);
      if (cols.length >= 10 && inodes.has(cols[9]!) && ports.has(cols[2]!.split(':')[1]!)) n++;
    }
    return n;
  }

  private async takeBaseline(): Promise<void> {
    await this.stats();
    await this.admin('/metrics');
    await this.connections();
    // The admin connections close a moment after their responses: wait for two equal readings.
    // A health check's socket may be counted while it opens or after its peer closed it (in no
    // socket table yet or any more): the baseline is the lowest of a few readings after that.
    let last = this.descriptors();
    for (let i = 0; i < 20; i++) {
      await delay(50);
      const now = this.descriptors();
      if (now === last) break;
      last = now;
    }
    for (let i = 0; i < 6; i++) {
      await delay(30);
      last = Math.min(last, this.descriptors());
    }
    this.baselineFds = last;
    this.baselineKinds = this.descriptorKinds();
  }

  // ---- steps ----

  private client(id: number): Client {
    let c = this.clients.get(id);
    if (c === undefined) {
      c = new Client(id);
      this.clients.set(id, c);
    }
    return c;
  }

  private enqueue(c: Client, op: ClientOp): Promise<void> {
    const next = c.lane.then(() => this.runOp(c, op)).catch((err: Error) => this.fail(`client ${c.id} ${op.op}: ${err.stack ?? err.message}`, `op:${op.op}:${err.message}`));
    c.lane = next;
    return next;
  }

  private async runSteps(hardDeadline: number): Promise<void> {
    for (const step of this.plan.steps) {
      if (this.exitedEarly) return;
      if (Date.now() > hardDeadline) {
        this.fail('the steps did not finish within their time bound');
        return;
      }
      switch (step.kind) {
        case 'client':
          void this.enqueue(this.client(step.client), step.do);
          break;
        case 'wait':
          await delay(step.ms);
          break;
        case 'burst': {
          const burst: Client[] = [];
          const connects: Array<Promise<void>> = [];
          for (let i = 0; i < step.count; i++) {
            const c = this.client(step.first + i);
            burst.push(c);
            connects.push(this.enqueue(c, { op: 'connect', target: step.target, src: step.sources[i % step.sources.length]!, halfOpen: false }));
          }
          await within(Promise.all(connects), 8000, []);
          for (const c of burst) for (const op of step.script) void this.enqueue(c, op);
          if (step.count > 100) this.progress(`  burst of ${step.count} connected`);
          break;
        }
        case 'reload':
          await this.reload(step.version, step.await);
          break;
        case 'backend':
          await this.poolBackend(step);
          break;
        case 'state':
          await this.postState(step);
          break;
      }
    }
  }

  private async runOp(c: Client, op: ClientOp): Promise<void> {
    c.ops.push(op.op);
    switch (op.op) {
      case 'connect':
        return this.connect(c, op);
      case 'proxy': {
        const bytes = proxyBytes(op);
        return this.writePieces(c, op.tiny ? splitEvery(bytes, 1) : [bytes], 0);
      }
      case 'hello': {
        const { pieces, gapMs } = helloWrites(op);
        return this.writePieces(c, pieces, gapMs);
      }
      case 'bytes':
        return this.writePieces(c, splitEvery(Buffer.alloc(op.n, 0x61 + (c.id % 26)), Math.ceil(op.n / op.pieces)), 1);
      case 'garbage':
        return this.writePieces(c, [garbageBytes(op)], 0);
      case 'pause': {
        const socket = c.socket;
        if (socket === null || socket.destroyed) return;
        socket.pause();
        await delay(op.ms);
        c.pausedMs += op.ms;
        socket.resume();
        c.lastActAt = Date.now();
        return;
      }
      case 'wait':
        return delay(op.ms);
      case 'end':
        if (c.usable) {
          c.socket!.end();
          c.lastActAt = Date.now();
        }
        return;
      case 'reset':
      case 'destroy': {
        const socket = c.socket;
        if (socket === null || socket.destroyed) return;
        if (c.endedAt === 0) c.selfClosed = true;
        if (op.op === 'reset') socket.resetAndDestroy();
        else socket.destroy();
        c.markEnded(op.op);
        return;
      }
    }
  }

  private async connect(c: Client, op: Extract<ClientOp, { op: 'connect' }>): Promise<void> {
    const address = this.env!.binds[op.target]!;
    const colon = address.lastIndexOf(':');
    c.src = op.src;
    c.target = op.target;
    const socket = net.connect({ host: address.slice(0, colon), port: Number(address.slice(colon + 1)), localAddress: op.src, allowHalfOpen: op.halfOpen });
    c.socket = socket;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => (c.bytesIn += chunk.length));
    socket.on('end', () => c.markEnded('FIN'));
    socket.on('error', (err: NodeJS.ErrnoException) => {
      if (c.connectedAt === 0) c.connectError = err.code ?? 'error';
      c.markEnded(err.code ?? 'error');
    });
    socket.on('close', () => c.markEnded('close'));
    const connected = await within(
      once(socket, 'connect').then(
        () => true,
        () => false,
      ),
      3000,
      false,
    );
    if (connected) {
      c.connectedAt = c.lastActAt = Date.now();
      return;
    }
    c.connectError ??= 'connect timeout';
    socket.destroy();
    c.markEnded('not connected');
  }

  private async writePieces(c: Client, pieces: Buffer[], gapMs: number): Promise<void> {
    for (let i = 0; i < pieces.length; i++) {
      if (!c.usable) return;
      c.socket!.write(pieces[i]!);
      c.lastActAt = Date.now();
      if (i < pieces.length - 1) await delay(gapMs);
    }
  }

  // ---- reloads ----

  private async reload(version: number, wait: boolean): Promise<void> {
    const config = this.plan.configs[version]!;
    this.proxy!.writeConfig(renderConfig(config, this.env!));
    this.reloadsSent.push({ version, valid: config.valid });
    this.reloadSent(config);
    process.kill(this.pid, 'SIGHUP');
    if (!wait) {
      // A SIGHUP sent while the previous one is still pending would merge into it (standard
      // signals do not queue): the next step waits until the kernel has delivered this one.
      await this.untilDelivered(1);
      return;
    }
    if (!this.reloadTracking) return;
    const deadline = Date.now() + 8000;
    const firstNew = this.outcomes.length;
    while (this.outcomes.length < this.reloadsSent.length) {
      this.collectOutcomes();
      if (this.outcomes.length >= this.reloadsSent.length || this.exitedEarly) break;
      if (Date.now() > deadline) {
        this.fail(`no outcome was logged within 8 s of the SIGHUP that loads version ${version}`);
        this.reloadTracking = false;
        return;
      }
      await delay(20);
    }
    if (this.exitedEarly) return;
    const before = this.inForce;
    // Reloads sent back to back (only the last one waited for) may each have read any file of the
    // group; the generator makes such groups all valid.
    const last = this.outcomes.length - 1;
    const group = this.reloadsSent.slice(firstNew).map((sent) => sent.version).join(', ');
    for (let i = firstNew; i <= last; i++) {
      const sent = this.reloadsSent[i]!;
      const outcome = this.outcomes[i]!;
      const ok = outcome.msg === OUTCOME_OK;
      const which = i === last && i === firstNew ? `the reload to version ${sent.version}` : `a reload of the back-to-back SIGHUPs for versions ${group}`;
      if (sent.valid && ok) this.inForce = this.plan.configs[sent.version]!;
      else if (sent.valid) this.fail(`${which} (a valid file) failed: ${JSON.stringify(outcome.err ?? outcome.msg)}`);
      else if (ok) this.fail(`${which} (an invalid file) was accepted`);
    }
    if (this.inForce !== before) this.recordRemovals(before, this.inForce, Date.now());
    await this.checkListening(`after the reload to version ${version}`);
  }

  /** What a reload from `before` to `after` removed, for the on_removal check of the sampler. */
  private recordRemovals(before: ConfigVersion, after: ConfigVersion, at: number): void {
    for (const l of before.listeners) {
      const kept = after.listeners.find((x) => x.name === l.name);
      const removed = kept === undefined ? [null] : l.routes.filter((r) => !kept.routes.some((x) => x.name === r.name)).map((r) => r.name);
      for (const route of removed) {
        const policy = this.uniformPolicy(l.name, route);
        if (policy === 'close' || policy === 'drain') this.removals.push({ listener: l.name, route, at, policy });
      }
    }
  }

  /**
   * The on_removal of a route (route = null: of a whole listener) when every version of the plan
   * that has it agrees, else null: a connection keeps the policy of the version that admitted it,
   * which the sampler cannot tell apart.
   */
  private uniformPolicy(listener: string, route: string | null): Removal | null {
    const seen = new Set<Removal>();
    for (const config of this.plan.configs) {
      const l = config.valid ? config.listeners.find((x) => x.name === listener) : undefined;
      if (l === undefined) continue;
      if (route === null) seen.add(l.onRemoval);
      for (const r of l.routes) if (route === null || r.name === route) seen.add(r.onRemoval ?? l.onRemoval);
    }
    return seen.size === 1 ? [...seen][0]! : null;
  }

  /** Waits (at most 1 s) until signal `signo` is no longer pending for the daemon (Linux /proc). */
  private async untilDelivered(signo: number): Promise<void> {
    const bit = 1n << BigInt(signo - 1);
    const deadline = Date.now() + 1000;
    while (Date.now() < deadline) {
      let status: string;
      try {
        status = readFileSync(`/proc/${this.pid}/status`, 'utf8');
      } catch {
        return;
      }
      const masks = [...status.matchAll(/^(?:ShdPnd|SigPnd):\s*([0-9a-f]+)$/gm)].map((m) => BigInt(`0x${m[1]}`));
      if (masks.every((mask) => (mask & bit) === 0n)) return;
      await delay(1);
    }
  }

  private collectOutcomes(): void {
    const lines = this.proxy!.lines;
    for (; this.outcomeCursor < lines.length; this.outcomeCursor++) {
      const line = lines[this.outcomeCursor]!;
      if (line.msg === OUTCOME_OK || OUTCOME_FAILED.test(String(line.msg))) this.outcomes.push(line);
    }
  }

  /** The daemon listens on exactly the binds of the version in force (and the admin API). */
  private async checkListening(when: string): Promise<void> {
    if (!this.reloadTracking) return; // which version is in force is no longer known
    const env = this.env!;
    const expected = new Map(this.inForce.listeners.map((l) => [l.name, l.binds.map((b) => env.binds[b]!).sort()]));
    let stats: Stats;
    try {
      stats = await this.stats();
    } catch (err) {
      return this.fail(`admin API ${when}: ${(err as Error).message}`);
    }
    const actual = new Map(stats.listeners.filter((l) => !l.draining).map((l) => [l.name, [...l.bind].sort()]));
    const show = (m: Map<string, string[]>): string => JSON.stringify(Object.fromEntries([...m].sort()));
    if (show(expected) !== show(actual)) this.fail(`${when}: listeners and binds are ${show(actual)}, the file says ${show(expected)}`, `binds:${when}`);
    // With several event-loop threads each binds every address (SO_REUSEPORT): compare the ports.
    const ports = [...new Set(listeningPorts(this.pid))];
    const wanted = [...this.inForce.listeners.flatMap((l) => l.binds.map((b) => Number(env.binds[b]!.split(':')[1]))), env.adminPort].sort((a, b) => a - b);
    if (JSON.stringify(ports) !== JSON.stringify(wanted)) this.fail(`${when}: the process listens on ports ${ports.join(',')}, expected ${wanted.join(',')}`, `ports:${when}`);
  }

  // ---- sampling while the steps run ----

  private async sample(): Promise<void> {
    while (!this.stopSampling && !this.exitedEarly) {
      try {
        const stats = await this.stats();
        // The daemon takes its snapshot somewhere between sending and arrival: durations are
        // measured from the arrival of the first sample to the sending of the later one, so a
        // slow answer can only shorten them.
        const sent = Date.now();
        const conns = await this.connections();
        this.checkSample(stats, conns.connections, sent, Date.now());
        this.checkBackends(JSON.parse(await this.admin('/backends')) as BackendRow[]);
        this.samples++;
      } catch (err) {
        if (!this.exitedEarly) this.fail(`admin API while running: ${(err as Error).message}`, 'admin-running');
      }
      await delay(200);
    }
  }

  private checkSample(stats: Stats, conns: ConnInfo[], sent: number, arrived: number): void {
    const slack = this.slack;
    // With one event-loop thread /stats and /connections are each computed in one turn of the
    // loop that changes the counts, so counts that must agree are compared exactly. With more,
    // the threads' views are taken at slightly different moments: only the bounds are checked.
    const oneThread = (stats.threads ?? 1) === 1;
    for (const l of stats.listeners) {
      const lim = this.limits.get(l.name);
      if (lim === undefined) {
        this.fail(`/stats lists a listener "${l.name}" that no config has`, `unknown:${l.name}`);
        continue;
      }
      if (l.busy < 0 || l.queued < 0 || l.active < 0) this.fail(`listener ${l.name}: a negative count (busy ${l.busy}, queued ${l.queued}, active ${l.active})`, `neg:${l.name}`);
      if (oneThread && ((l.routedActive ?? 0) > l.active || (l.activeClients ?? 0) > l.active)) {
        this.fail(`listener ${l.name}: ${l.routedActive} routed and ${l.activeClients} clients active, but only ${l.active} connections open`, `sums:${l.name}`);
      }
      if (l.busy > lim.workers) this.fail(`listener ${l.name}: ${l.busy} workers busy, more than any version allowed (${lim.workers})`, `busy:${l.name}`);
      if (l.queued > lim.queue) this.fail(`listener ${l.name}: ${l.queued} queued, more than any version allowed (${lim.queue})`, `queued:${l.name}`);
      for (const r of l.routes) {
        const max = lim.routes.get(r.name) ?? Infinity;
        if (r.active > max) this.fail(`listener ${l.name} route ${r.name}: ${r.active} active, over its max_connections (${max})`, `route:${l.name}:${r.name}`);
      }
      for (const c of l.topClients) {
        if (c.active > lim.perIp) this.fail(`listener ${l.name}: client ${c.client} holds ${c.active} connections, over max_connections_per_ip (${lim.perIp})`, `perip:${l.name}:${c.client}`);
      }
    }
    if (typeof stats.slotsBusy === 'number') {
      if (stats.slotsBusy > this.globalMax) this.fail(`${stats.slotsBusy} global worker slots busy, over max_connections (${this.globalMax})`, 'slots');
      const busy = stats.listeners.reduce((sum, l) => sum + l.busy, 0);
      if (oneThread && stats.slotsBusy !== busy) this.fail(`the global slot pool counts ${stats.slotsBusy} busy, the listeners ${busy}`, 'slots-sum');
    }
    const perClient = new Map<string, number>();
    const hello = TIMEOUTS.clientHelloMs;
    for (const c of conns) {
      const lim = this.limits.get(c.listener);
      const qt = lim?.queueMs ?? this.maxQueueMs;
      const where = `connection ${c.id} (listener ${c.listener}, client ${c.client}, route ${c.route ?? '-'})`;
      const bound =
        c.state === 'queued' ? qt : c.state === 'handshake' ? qt + hello : c.state === 'connecting' ? qt + hello + 2 * TIMEOUTS.connectMs : qt + TIMEOUTS.maxLifetimeMs;
      if (c.ageMs > bound + slack) this.fail(`${where} is ${c.state} at age ${c.ageMs} ms, past its deadline (${bound} ms)`, `age:${c.id}`);
      if (c.state === 'relaying' || c.state === 'closing') {
        const bytes = c.bytesFromClient + c.bytesFromBackend;
        const seen = this.idleSeen.get(c.id);
        if (seen === undefined || seen.bytes !== bytes) this.idleSeen.set(c.id, { bytes, since: arrived });
        else if (sent - seen.since > TIMEOUTS.idleMs + slack) this.fail(`${where} moved no byte for at least ${sent - seen.since} ms (idle = ${TIMEOUTS.idleMs} ms)`, `idle:${c.id}`);
      }
      if (c.state === 'closing') {
        const since = this.closingSeen.get(c.id) ?? arrived;
        this.closingSeen.set(c.id, since);
        if (sent - since > TIMEOUTS.halfCloseMs + slack) this.fail(`${where} half-closed for at least ${sent - since} ms (half_close = ${TIMEOUTS.halfCloseMs} ms)`, `half:${c.id}`);
      }
      for (const rm of this.removals) {
        // Admitted before the reload for certain: even taken at arrival, its age reaches back past it.
        if (c.listener !== rm.listener || (rm.route !== null && c.route !== rm.route) || arrived - c.ageMs >= rm.at) continue;
        const bound = rm.policy === 'close' ? 0 : TIMEOUTS.drainMs;
        if (sent > rm.at + bound + slack) {
          this.fail(`${where}, admitted before its ${rm.route === null ? 'listener' : 'route'} was removed with on_removal = "${rm.policy}", is still open ${sent - rm.at} ms after that reload`, `removal:${c.id}`);
        }
      }
      const ip = c.client.replace(/:\d+$/, '').replace(/^\[|\]$/g, '');
      // A trusted balancer's connection has no client of its own until its PROXY header names one.
      const awaitingHeader = lim?.kind === 'pp' && (TRUSTED as readonly string[]).includes(ip) && (c.state === 'queued' || c.state === 'handshake');
      if (!awaitingHeader) perClient.set(`${c.listener} ${ip}`, (perClient.get(`${c.listener} ${ip}`) ?? 0) + 1);
    }
    for (const [key, n] of oneThread ? perClient : []) {
      const [listener, ip] = key.split(' ') as [string, string];
      const max = this.limits.get(listener)?.perIp ?? Infinity;
      if (n > max) this.fail(`listener ${listener}: client ${ip} has ${n} open connections in /connections, over max_connections_per_ip (${max})`, `perip-registry:${key}`);
    }
  }

  /** /backends answers while traffic flows, and no row is negative or over its max_connections. */
  private checkBackends(rows: BackendRow[]): void {
    if (!Array.isArray(rows)) return this.fail(`/backends answered ${JSON.stringify(rows).slice(0, 200)}, not a list`, 'backends-shape');
    for (const row of rows) {
      const cap = this.rowCaps.get(`${row.listener}/${row.route}/${row.backend}`) ?? Infinity;
      if (row.active < 0 || row.active > cap) {
        this.fail(`/backends: ${row.backend} of ${row.listener}/${row.route} has ${row.active} active connections (max_connections ${cap})`, `row:${row.listener}/${row.route}/${row.backend}`);
      }
    }
  }

  // ---- after the steps: every client ended within its deadlines ----

  /** The latest moment the proxy may end this client's connection. */
  private deadlineOf(c: Client): number {
    const qt = this.maxQueueMs;
    const chain = qt + TIMEOUTS.clientHelloMs + 2 * TIMEOUTS.connectMs + TIMEOUTS.idleMs + TIMEOUTS.halfCloseMs;
    return Math.min(c.connectedAt + qt + TIMEOUTS.maxLifetimeMs + c.pausedMs, c.lastActAt + chain) + this.slack;
  }

  private describeClient(c: Client): string {
    const address = this.env!.binds[c.target] ?? '?';
    const port = c.socket?.localPort ?? '?';
    const ended = c.endedAt === 0 ? 'still open' : `ended (${c.endedHow}) at ${this.since(c.endedAt)}`;
    return `client ${c.id} ${c.src}:${port} -> ${address} [${c.ops.join(' ')}] connected ${this.since(c.connectedAt)}, last act ${this.since(c.lastActAt)}, paused ${c.pausedMs} ms, deadline ${this.since(this.deadlineOf(c))}, ${ended}`;
  }

  private async settleClients(): Promise<void> {
    const all = [...this.clients.values()];
    await within(Promise.all(all.map((c) => c.lane)), 20_000, []);
    const watched = all.filter((c) => c.connectedAt > 0 && !c.selfClosed);
    const latest = Math.max(0, ...watched.map((c) => this.deadlineOf(c)));
    await within(Promise.all(watched.map((c) => c.ended)), latest - Date.now() + 100, []);
    const late = watched.filter((c) => (c.endedAt === 0 ? Infinity : c.endedAt) > this.deadlineOf(c));
    if (late.length > 0) {
      let registry = '';
      try {
        const conns = (await this.connections()).connections;
        const mine = new Set(late.map((c) => `${c.src}:${c.socket?.localPort}`));
        registry = conns.filter((x) => mine.has(x.client)).slice(0, 5).map((x) => JSON.stringify(x)).join('; ');
      } catch {
        /* the daemon may be gone */
      }
      this.fail(
        `${late.length} client connection(s) outlived their deadlines: ${late.slice(0, 5).map((c) => this.describeClient(c)).join(' | ')}${registry === '' ? '' : ` | in /connections: ${registry}`}`,
        'late-clients',
      );
    }
    for (const c of all) c.socket?.destroy();
  }

  // ---- once every client is gone: every count at zero ----

  private async zeroProblems(): Promise<string[]> {
    const problems: string[] = [];
    const stats = await this.stats();
    if (stats.active !== 0) problems.push(`/stats active = ${stats.active}`);
    if (typeof stats.slotsBusy === 'number' && stats.slotsBusy !== 0) problems.push(`/stats slotsBusy = ${stats.slotsBusy}`);
    for (const l of stats.listeners) {
      if (l.draining) problems.push(`removed listener ${l.name} is still listed (active ${l.active})`);
      if (l.busy !== 0) problems.push(`${l.name}.busy = ${l.busy}`);
      if (l.queued !== 0) problems.push(`${l.name}.queued = ${l.queued}`);
      if (l.active !== 0) problems.push(`${l.name}.active = ${l.active}`);
      if (typeof l.activeClients === 'number' && l.activeClients !== 0) problems.push(`${l.name}.activeClients = ${l.activeClients}`);
      if (typeof l.routedActive === 'number' && l.routedActive !== 0) problems.push(`${l.name}.routedActive = ${l.routedActive}`);
      for (const r of l.routes) if (r.active !== 0) problems.push(`${l.name}.routes.${r.name}.active = ${r.active}`);
      if (l.topClients.length > 0) problems.push(`${l.name}.topClients = ${JSON.stringify(l.topClients.slice(0, 5))}`);
    }
    const conns = await this.connections();
    if (conns.total !== 0) problems.push(`/connections total = ${conns.total}: ${conns.connections.slice(0, 5).map((c) => JSON.stringify(c)).join('; ')}`);
    for (const row of JSON.parse(await this.admin('/backends')) as BackendRow[]) {
      if (row.active !== 0) problems.push(`/backends ${row.listener}/${row.route} ${row.backend} active = ${row.active}`);
    }
    const samples = parseExposition(await this.admin('/metrics')).samples;
    for (const s of samples) {
      if (!['smartproxy_connections_active', 'smartproxy_workers_busy', 'smartproxy_queue_depth', 'smartproxy_backend_connections_active'].includes(s.name) || s.value === 0) continue;
      problems.push(`${s.name}${JSON.stringify(s.labels)} = ${s.value}`);
    }
    const by = (name: string): string => {
      const totals = new Map<string, number>();
      for (const s of samples) if (s.name === name) totals.set(s.labels.reason ?? '', (totals.get(s.labels.reason ?? '') ?? 0) + s.value);
      return [...totals].filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]).map(([reason, n]) => `${reason} ${n}`).join(', ');
    };
    this.endings = `closed: ${by('smartproxy_connections_closed_total') || 'none'}; refused at accept or later: ${by('smartproxy_rejections_total') || 'none'}`;
    return problems;
  }

  private async checkZero(): Promise<void> {
    const deadline = Date.now() + 4000;
    let problems: string[] = [];
    for (;;) {
      try {
        problems = await this.zeroProblems();
      } catch (err) {
        problems = [`admin API: ${(err as Error).message}`];
      }
      if (problems.length === 0 || Date.now() > deadline || this.exitedEarly) break;
      await delay(100);
    }
    if (problems.length > 0) this.fail(`counts did not return to 0 once every client was gone: ${problems.slice(0, 12).join('; ')}`);
  }

  private async checkDescriptors(): Promise<void> {
    const deadline = Date.now() + 3000;
    let now = this.descriptors();
    while (now !== this.baselineFds && Date.now() < deadline) {
      await delay(100);
      now = this.descriptors();
    }
    if (now !== this.baselineFds) {
      const kinds = this.descriptorKinds();
      this.fail(`the daemon holds ${now} descriptors (listening sockets aside), ${this.baselineFds} after start-up: ${JSON.stringify(Object.fromEntries(kinds))} (at start-up ${JSON.stringify(Object.fromEntries(this.baselineKinds))}); its TCP sockets: ${this.tcpSockets().join(', ')}`);
    }
  }

  private descriptorKinds(): Map<string, number> {
    {
      const kinds = new Map<string, number>();
      for (const fd of readdirSync(`/proc/${this.pid}/fd`)) {
        let target = '?';
        try {
          target = readlinkSync(`/proc/${this.pid}/fd/${fd}`).replace(/\[\d+\]$/, '');
        } catch {
          /* closed meanwhile */
        }
        kinds.set(target, (kinds.get(target) ?? 0) + 1);
      }
      return kinds;
    }
  }

  // ---- the end: SIGTERM (maybe right after a SIGHUP, maybe with clients open) ----

  private async finish(): Promise<void> {
    const proxy = this.proxy!;
    if (this.exitedEarly) return;
    const open: Client[] = [];
    const { openAtTerm, hupVersion } = this.plan.final;
    if (openAtTerm > 0) {
      const target = this.inForce.listeners[0]!.binds[0]!;
      for (let i = 0; i < openAtTerm; i++) {
        const c = new Client(-1 - i);
        open.push(c);
        await this.enqueue(c, { op: 'connect', target, src: UNTRUSTED[i % UNTRUSTED.length]!, halfOpen: false });
        await this.enqueue(c, { op: 'hello', sni: 'echo.test', form: 'whole', pad: 0, variant: i });
      }
    }
    if (hupVersion !== null) {
      proxy.writeConfig(renderConfig(this.plan.configs[hupVersion]!, this.env!));
      process.kill(this.pid, 'SIGHUP');
      if (this.plan.final.termAfterMs > 0) await delay(this.plan.final.termAfterMs);
    }
    // A runtime state no longer bounds anything once the file may change and the daemon stops.
    const now = Date.now();
    for (const w of this.windows) w.to = Math.min(w.to, now);
    const stateAtTerm = this.plan.final.stateAtTerm ?? null;
    if (stateAtTerm !== null) {
      const urlPath = `/backends/state?backend=${encodeURIComponent(this.env!.pool[stateAtTerm])}&state=drain`;
      void adminRequest(this.env!.adminPort, 'POST', urlPath).catch(() => {}); // answered or not: the daemon is stopping
    }
    this.sigtermSent = true;
    process.kill(this.pid, 'SIGTERM');
    const bound = TIMEOUTS.drainMs + 4000 + this.slack;
    const exit = await within(proxy.exited, bound, null);
    if (exit === null) {
      const hup = hupVersion === null ? '' : ` (sent ${this.plan.final.termAfterMs} ms after a SIGHUP${this.plan.configs[hupVersion]!.slow !== undefined ? ' to a slow file binding localhost' : ''})`;
      this.fail(`the daemon was still running ${bound} ms after SIGTERM${hup}${openAtTerm > 0 ? ` with ${openAtTerm} connection(s) open` : ''}`);
      process.kill(this.pid, 'SIGKILL');
      await proxy.exited;
    } else if (exit.code !== 0) {
      this.fail(`the daemon exited with ${exit.code !== null ? `code ${exit.code}` : exit.signal} after SIGTERM`);
    }
    for (const c of open) {
      await within(c.ended, 1000, undefined);
      if (c.endedAt === 0) this.fail(`a client open at SIGTERM was not closed when the daemon exited: ${this.describeClient(c)}`);
      c.socket?.destroy();
    }
  }

  private checkLogs(): void {
    const proxy = this.proxy;
    if (proxy === null) return;
    for (const line of proxy.lines) {
      const level = typeof line.level === 'number' ? line.level : (LOG_LEVELS[String(line.level)] ?? 0);
      const msg = String(line.msg);
      const err = line.err as { stack?: string; message?: string } | undefined;
      const detail = err !== undefined ? `: ${(err.stack ?? err.message ?? JSON.stringify(err)).slice(0, 1200)}` : '';
      if (level >= 60 || /uncaught|unhandled|\bbug\b/i.test(msg)) this.fail(`log line at level ${level}: ${msg}${detail}`, `log:${msg}:${detail.slice(0, 200)}`);
      else if (level >= 50 && !/^reload (rejected|failed)/.test(msg)) this.fail(`error log line: ${msg} ${JSON.stringify(line).slice(0, 600)}`, `log:${msg}`);
    }
    const stderr = proxy
      .stderr()
      .split('\n')
      .filter((l) => l.trim() !== '' && !/ExperimentalWarning|--trace-warnings|^\s+at /.test(l));
    if (stderr.length > 0) this.fail(`the daemon wrote to stderr: ${stderr.slice(0, 10).join(' / ').slice(0, 1500)}`);
  }

  // ---- reporting ----

  summary(): string {
    const all = [...this.clients.values()];
    const connected = all.filter((c) => c.connectedAt > 0).length;
    const applied = this.outcomes.filter((o) => o.msg === OUTCOME_OK).length;
    const refusedReloads = this.outcomes.length - applied;
    const flood = this.plan.steps.find((s) => s.kind === 'burst' && s.count > 100);
    return (
      `${all.length} clients (${connected} connected), ${this.reloadsSent.length} reloads (${applied} applied, ${refusedReloads} refused)` +
      `${flood !== undefined && flood.kind === 'burst' ? `, a flood of ${flood.count}` : ''}, ${this.samples} admin samples, ${this.postsSent} backend states posted (${this.postsOk} applied, ${this.windowsChecked} drain/maintenance windows checked), ` +
      `${this.deaths} pool backend deaths, pool accepts ${this.env?.poolServers.map((x) => `${x.name} ${x.accepts.length} (peak ${x.peak})`).join(', ') ?? '-'}; ${this.endings}`
    );
  }

  diagnostics(): string {
    const proxy = this.proxy;
    if (proxy === null) return '(the daemon did not start)';
    const tail = proxy.lines.slice(-15).map((l) => `    ${JSON.stringify(l).slice(0, 400)}`);
    const stderr = proxy.stderr().trim();
    return [`daemon log, last ${tail.length} lines:`, ...tail, stderr === '' ? 'stderr: (empty)' : `stderr:\n${stderr.slice(-3000)}`].join('\n');
  }

  /** Ends whatever the run still has going (the sampler, client sockets), however it ended. */
  stop(): void {
    this.stopSampling = true;
    for (const c of this.clients.values()) c.socket?.destroy();
  }
}

/** Runs one plan against a fresh daemon; cleanup (daemon, backends) is registered on `scope`. */
export async function runPlan(scope: Scope, plan: Plan, opts: RunOptions = {}): Promise<RunResult> {
  const run = new Run(plan, opts);
  const started = Date.now();
  try {
    await run.execute(scope);
  } catch (err) {
    run.fail(`the run itself failed: ${(err as Error).stack ?? String(err)}`);
  } finally {
    run.stop();
  }
  return { seed: plan.seed, failures: run.failures, durationMs: Date.now() - started, summary: run.summary(), diagnostics: run.diagnostics() };
}

/** A failure report: what failed, the daemon's last words, how to replay, and the plan itself. */
export function formatFailure(plan: Plan, result: RunResult): string {
  return [
    `seed ${plan.seed}: ${result.failures.length} invariant(s) failed`,
    ...result.failures.map((f) => `  - ${f}`),
    `run: ${result.summary}`,
    result.diagnostics,
    `replay: npm run fuzz -- --seed ${plan.seed} --count 1   (or save the plan below and: npm run fuzz -- --plan FILE)`,
    'plan:',
    planToJson(plan),
  ].join('\n');
}

/** What a plan exercises, as a phrase for a test name: "13 reloads (17 binds moved), a flood of 1,418, ...". */
export function describePlan(plan: Plan): string {
  const reloads = plan.steps.filter((s): s is Extract<Step, { kind: 'reload' }> => s.kind === 'reload');
  let moved = 0;
  for (let i = 1; i < plan.configs.length; i++) {
    const [before, after] = [plan.configs[i - 1]!, plan.configs[i]!];
    if (!before.valid || !after.valid) continue;
    for (const l of after.listeners) {
      for (const b of l.binds) {
        const owner = before.listeners.find((o) => o.binds.includes(b));
        if (owner !== undefined && owner.name !== l.name) moved++;
      }
    }
  }
  const clients = plan.steps.reduce((n, s) => n + (s.kind === 'burst' ? s.count : s.kind === 'client' && s.do.op === 'connect' ? 1 : 0), 0);
  const flood = plan.steps.find((s) => s.kind === 'burst' && s.count > 100);
  const parts = [`${clients.toLocaleString('en')} hostile clients`];
  const invalid = reloads.filter((r) => !plan.configs[r.version]!.valid).length;
  const quick = reloads.filter((r) => !r.await).length;
  if (reloads.length > 0) {
    const extras = [moved > 0 ? `${moved} binds moved` : '', invalid > 0 ? `${invalid} invalid` : '', quick > 0 ? `${quick} back to back` : ''].filter((x) => x !== '');
    parts.push(`${reloads.length} reloads${extras.length > 0 ? ` (${extras.join(', ')})` : ''}`);
  }
  if (flood !== undefined && flood.kind === 'burst') parts.push(`a flood of ${flood.count.toLocaleString('en')} queued clients`);
  const balances = new Set(plan.configs.flatMap((c) => c.listeners.flatMap((l) => l.routes.flatMap((r) => (r.pool === undefined ? [] : [r.pool.balance])))));
  const states = plan.steps.filter((s) => s.kind === 'state').length;
  const deaths = plan.steps.filter((s) => s.kind === 'backend' && !s.up).length;
  if (balances.size > 0) parts.push(`pool routes (${[...balances].sort().join(', ')}) with ${states} runtime states and ${deaths} backend deaths`);
  if (plan.final.openAtTerm > 0) parts.push(`SIGTERM with ${plan.final.openAtTerm} open`);
  if (plan.final.hupVersion !== null) {
    const slow = plan.configs[plan.final.hupVersion]!.slow !== undefined ? 'a slow ' : '';
    parts.push(plan.final.termAfterMs === 0 ? `${slow}SIGHUP then SIGTERM at once` : `${slow}SIGHUP then SIGTERM ${plan.final.termAfterMs} ms later`);
  }
  return parts.join(', ');
}
