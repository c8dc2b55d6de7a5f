// One connection from one event loop to the Redis that holds the cluster-wide counts, and the
// three server-side scripts that are the whole protocol. Each call is one EVALSHA (ioredis loads
// the script on NOSCRIPT), is given up after `timeout` (our own timer: see timed()), and
// fails at once while the connection is down (no offline queue: a call queued behind a dead
// connection would hold a client for nothing). Each call is written at once: ioredis's
// auto-pipelining (one write per tick) builds a Pipeline per flush, which measured 105 µs of
// daemon CPU per admitted connection against 45 µs without (scripts/cluster-cost.ts); releases
// are batched per tick by the caller instead (cluster.ts), and a release or renewal call carries
// up to KEYS_PER_CALL clients in one script run: renewing 20,000 clients one call each cost 12-18
// µs of daemon CPU and 10-12 µs of Redis CPU per client, one call per 256 clients 1-2.5 and 4.5-5.5
// (measured on loopback, Redis 7). So a held client costs Redis one HSET per renewal, not a call.
// Those calls name keys of many slots: with Redis Cluster (not supported yet) they would be
// grouped by slot.
//
// Keys, one pair per (listener, client), with a hash tag so both land in one Redis Cluster slot:
//   <prefix>{<listener>/<client key>}:c   hash: "<field>" -> connections it holds,
//                                         "<field>#e" -> when that count expires (ms, Redis
//                                         clock); the key expires after lease_ttl unused
//   <prefix>{<listener>/<client key>}:r   hash: bucket number -> connections started in it
//   <prefix>probe:<field>                 written by the recovery probe, expires in a second
// <field> is "<instance>/<connection id>/<thread>", the id random per store connection: a
// restarted process (or a reload that reconnects) never adds to the count of one that is gone,
// whose field simply expires. Time is Redis's own (TIME), so the instances' clocks do not matter.
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Redis } from 'ioredis';
import type { ClusterConfig } from '../config/types.ts';
import { parseRedisUrl, redactRedisUrl } from './redis-url.ts';

/** Why a store call failed, as the metric label `kind`. */
export const STORE_ERROR_KINDS = ['timeout', 'connection', 'auth', 'oom', 'readonly', 'script', 'other'] as const;
export type StoreErrorKind = (typeof STORE_ERROR_KINDS)[number];

/** A call not answered within `timeout` (our timer; ioredis's commandTimeout is only a backstop). */
export class StoreTimeoutError extends Error {
  readonly code = 'SP_STORE_TIMEOUT';
  constructor(ms: number) {
    super(`store call not answered within ${ms} ms`);
  }
}

/**
 * ioredis's commandTimeout, a backstop only (it frees ioredis's queue under a Redis that stays
 * silent): our own timer (timed()) gives up first, and an event loop blocked for less than this
 * still reads an answer that came meanwhile.
 */
function backstopMs(timeoutMs: number): number {
  return Math.max(10 * timeoutMs, 1000);
}

/**
 * ioredis rejects with plain Errors (no code) for its own timeout and a closed stream, with an
 * AbortError (or its subclass MaxRetriesPerRequestError) for calls in flight when the connection
 * dropped, with "Ready check failed: <Redis's error>" when the connection's INFO is refused, and
 * with a ReplyError whose first word is Redis's error code (NOAUTH, WRONGPASS, OOM...) for the
 * server's refusals. Those words and class names are stable codes, so matching them is not
 * matching prose.
 */
export function storeErrorKind(err: unknown): StoreErrorKind {
  if (err instanceof StoreTimeoutError) return 'timeout';
  let message = err instanceof Error ? err.message : String(err);
  if (message === 'Command timed out') return 'timeout';
  const name = err instanceof Error ? err.name : '';
  if (name === 'AbortError' || name === 'MaxRetriesPerRequestError') return 'connection';
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (message.startsWith("Stream isn't writeable") || message === 'Connection is closed.' || (code !== undefined && code.startsWith('E'))) return 'connection';
  const readyCheck = 'Ready check failed: ';
  if (message.startsWith(readyCheck)) message = message.slice(readyCheck.length);
  const word = message.split(' ', 1)[0] ?? '';
  if (word === 'NOAUTH' || word === 'WRONGPASS' || word === 'NOPERM') return 'auth';
  if (word === 'OOM') return 'oom';
  if (word === 'READONLY' || word === 'MASTERDOWN' || word === 'LOADING') return 'readonly';
  if (word === 'ERR' || word === 'NOSCRIPT' || word === 'BUSY') return 'script';
  return 'other';
}

// Rate: the local table's approximation (governance/client-table.ts), now one window for every
// instance: RATE_BUCKETS + 1 buckets of per / RATE_BUCKETS, summed over those that overlap
// (now - per, now]. Concurrency: the sum of every instance's unexpired count. A refusal counts
// nothing; concurrency is asked first, as locally.
// KEYS: concurrency hash, rate hash. ARGV: field, max (0 = off), rate count (0 = off), per ms, lease ttl ms.
// Returns 0 admitted (and counted), 1 over max_connections_per_ip, 2 over connection_rate_per_ip.
export const ADMIT_SCRIPT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local field = ARGV[1]
local max = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local per = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
if max > 0 then
  local all = redis.call('HGETALL', KEYS[1])
  local counts, expires = {}, {}
  for i = 1, #all, 2 do
    local f = all[i]
    if string.sub(f, -2) == '#e' then expires[string.sub(f, 1, -3)] = tonumber(all[i + 1]) else counts[f] = tonumber(all[i + 1]) end
  end
  local sum = 0
  for f, n in pairs(counts) do
    local e = expires[f]
    if e == nil or e <= now then redis.call('HDEL', KEYS[1], f, f .. '#e') else sum = sum + n end
  end
  if sum >= max then return 1 end
end
if rate > 0 then
  local width = per / 10
  local b = math.floor(now / width)
  local all = redis.call('HGETALL', KEYS[2])
  local sum = 0
  for i = 1, #all, 2 do
    if tonumber(all[i]) < b - 10 then redis.call('HDEL', KEYS[2], all[i]) else sum = sum + tonumber(all[i + 1]) end
  end
  if sum >= rate then return 2 end
  redis.call('HINCRBY', KEYS[2], string.format('%d', b), 1)
  redis.call('PEXPIRE', KEYS[2], math.ceil(per + width) + 1000)
end
if max > 0 then
  redis.call('HINCRBY', KEYS[1], field, 1)
  redis.call('HSET', KEYS[1], field .. '#e', string.format('%d', now + ttl))
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
end
return 0
`;

// Gives back n connections of this field, per client. A missing field (Redis restarted, or the
// count expired) stays missing: the next renewal writes what this instance holds.
// KEYS: concurrency hashes. ARGV: field, then n per key.
export const RELEASE_SCRIPT = `
local field = ARGV[1]
for i, key in ipairs(KEYS) do
  local v = redis.call('HGET', key, field)
  if v then
    local left = tonumber(v) - tonumber(ARGV[i + 1])
    if left <= 0 then redis.call('HDEL', key, field, field .. '#e') else redis.call('HSET', key, field, left) end
  end
end
return #KEYS
`;

// Writes this field's count per client as this instance knows it (0 deletes it) and pushes its
// expiry on: the renewal that keeps a live instance's counts, and the repair after Redis lost them.
// KEYS: concurrency hashes. ARGV: field, lease ttl ms, then the count per key.
export const RENEW_SCRIPT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local field = ARGV[1]
local ttl = tonumber(ARGV[2])
local expiry = string.format('%d', now + ttl)
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[i + 2])
  if n <= 0 then
    redis.call('HDEL', key, field, field .. '#e')
  else
    redis.call('HSET', key, field, n, field .. '#e', expiry)
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  end
end
return #KEYS
`;

/**
 * Clients per release or renewal call. A script blocks Redis while it runs (about 5 µs a client):
 * 128 keep a call near half a millisecond, so the other instances' admissions wait little.
 */
const KEYS_PER_CALL = 128;

interface ScriptedRedis extends Redis {
  spAdmit(conc: string, rate: string, field: string, max: number, rateCount: number, perMs: number, ttlMs: number): Promise<number>;
  /** numberOfKeys first: the scripts below take any number of keys. */
  spRelease(numberOfKeys: number, ...keysThenArgs: Array<string | number>): Promise<number>;
  spRenew(numberOfKeys: number, ...keysThenArgs: Array<string | number>): Promise<number>;
}

/** Admission answer of the script: 0 admitted, 1 over the concurrency limit, 2 over the rate. */
export type AdmitCode = 0 | 1 | 2;

/** password_file's content (one trailing newline dropped), or null without one; throws when unreadable. */
export function readPassword(settings: ClusterConfig): string | null {
  if (settings.passwordFile === null) return null;
  try {
    return readFileSync(settings.passwordFile, 'utf8').replace(/\r?\n$/, '');
  } catch (err) {
    throw new Error(`[cluster] password_file ${settings.passwordFile}: cannot read it (${(err as NodeJS.ErrnoException).code ?? 'error'})`);
  }
}

/**
 * What identifies a store: a change of any of these on reload is a new connection, a password
 * rotated in password_file included (kept only as a digest).
 */
export function storeIdentity(settings: ClusterConfig, password: string | null): string {
  const digest = password === null ? null : createHash('sha256').update(password).digest('hex');
  return JSON.stringify([settings.redis, settings.passwordFile, digest, settings.keyPrefix, settings.instance]);
}

export class RedisStore {
  readonly identity: string;
  /** The address as logs may show it. */
  readonly display: string;
  /** This event loop's field in every concurrency hash: one of its own per store connection. */
  readonly field: string;
  private readonly prefix: string;
  private readonly client: ScriptedRedis;
  private timeoutMs: number;
  private closed = false;

  /**
   * Prepares the client (with password_file's content, read by the caller) without connecting:
   * connect() does, once the config that names it is committed.
   */
  constructor(settings: ClusterConfig, filePassword: string | null, thread: number, events: { ready(): void; down(kind: StoreErrorKind): void }) {
    this.identity = storeIdentity(settings, filePassword);
    this.display = redactRedisUrl(settings.redis);
    this.field = `${settings.instance}/${randomBytes(4).toString('hex')}/${thread}`;
    this.timeoutMs = settings.timeoutMs;
    this.prefix = settings.keyPrefix;
    const parsed = parseRedisUrl(settings.redis);
    if (!parsed.ok) throw new Error(`[cluster] redis: ${parsed.error}`); // the schema already checked it
    const target = parsed.target;
    const password = filePassword ?? target.password;
    this.client = new Redis({
      ...(target.path !== undefined ? { path: target.path } : { host: target.host!, port: target.port! }),
      ...(target.tls ? { tls: { servername: target.host } } : {}),
      db: target.db,
      ...(target.username !== undefined ? { username: target.username } : {}),
      ...(password !== undefined ? { password } : {}),
      lazyConnect: true,
      enableOfflineQueue: false,
      enableAutoPipelining: false,
      commandTimeout: backstopMs(settings.timeoutMs),
      connectTimeout: Math.max(1000, settings.timeoutMs),
      maxRetriesPerRequest: 0,
      autoResendUnfulfilledCommands: false,
      // Reconnect for ever, at most once a second: recovery needs no restart.
      retryStrategy: (attempt: number) => Math.min(attempt * 100, 1000),
      connectionName: `smartproxy:${this.field}`,
    }) as ScriptedRedis;
    this.client.defineCommand('spAdmit', { numberOfKeys: 2, lua: ADMIT_SCRIPT });
    this.client.defineCommand('spRelease', { lua: RELEASE_SCRIPT });
    this.client.defineCommand('spRenew', { lua: RENEW_SCRIPT });
    this.client.on('ready', () => {
      if (!this.closed) events.ready();
    });
    this.client.on('error', (err: unknown) => {
      if (!this.closed) events.down(storeErrorKind(err));
    });
    this.client.on('close', () => {
      if (!this.closed) events.down('connection');
    });
  }

  /** Starts connecting (and reconnecting for ever); calls fail at once until it is ready. */
  connect(): void {
    this.client.connect().catch(() => {
      // Reported through the 'error' event; ioredis keeps retrying.
    });
  }

  /** A new `timeout` applies to the calls made from now on. */
  setTimeout(ms: number): void {
    this.timeoutMs = ms;
    this.client.options.commandTimeout = backstopMs(ms);
  }

  /**
   * `call`, given up after `timeout`, but never while its answer waits unread. A timer alone would
   * lie after the event loop was blocked: the next turn runs timers before the poll phase that
   * reads the socket, so a call written in the last `timeout` of a stall would time out with its
   * answer already there, and anyone able to stall the event loop (a flood of locally refused
   * connections) could turn the store degraded. So when the timer fires, the verdict waits for
   * this turn's check phase (setImmediate), after the poll phase has read what came.
   */
  private timed<T>(call: Promise<T>): Promise<T> {
    const ms = this.timeoutMs;
    return new Promise<T>((resolve, reject) => {
      let settled = false;
      const timer = setTimeout(() => {
        setImmediate(() => {
          if (settled) return;
          settled = true;
          reject(new StoreTimeoutError(ms));
        });
      }, ms);
      call.then(
        (value) => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          resolve(value);
        },
        (err: unknown) => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          reject(err);
        },
      );
    });
  }

  private keys(tag: string): [string, string] {
    const base = `${this.prefix}{${tag}}`;
    return [`${base}:c`, `${base}:r`];
  }

  admit(tag: string, max: number, rateCount: number, perMs: number, ttlMs: number): Promise<AdmitCode> {
    const [conc, rate] = this.keys(tag);
    return this.timed(this.client.spAdmit(conc, rate, this.field, max, rateCount, perMs, ttlMs) as Promise<AdmitCode>);
  }

  /** Gives back `n` connections per tag: one call per KEYS_PER_CALL tags. */
  release(counts: ReadonlyArray<readonly [tag: string, n: number]>): Promise<void> {
    return this.perKeys(counts, (keys, ns) => this.client.spRelease(keys.length, ...keys, this.field, ...ns));
  }

  /** Writes each tag's count (0 deletes it) and its expiry: one call per KEYS_PER_CALL tags. */
  renew(counts: ReadonlyArray<readonly [tag: string, n: number]>, ttlMs: number): Promise<void> {
    return this.perKeys(counts, (keys, ns) => this.client.spRenew(keys.length, ...keys, this.field, ttlMs, ...ns));
  }

  private async perKeys(counts: ReadonlyArray<readonly [string, number]>, call: (keys: string[], ns: number[]) => Promise<number>): Promise<void> {
    const calls: Array<Promise<number>> = [];
    for (let i = 0; i < counts.length; i += KEYS_PER_CALL) {
      const chunk = counts.slice(i, i + KEYS_PER_CALL);
      calls.push(this.timed(call(chunk.map(([tag]) => this.keys(tag)[0]), chunk.map(([, n]) => n))));
    }
    await Promise.all(calls);
  }

  /**
   * A write like the calls it stands for (the renewal script on a key of its own that expires in a
   * second): a PING would answer while Redis refuses every write (OOM, READONLY, LOADING).
   */
  probe(): Promise<number> {
    return this.timed(this.client.spRenew(1, `${this.prefix}probe:${this.field}`, this.field, 1000, 1));
  }

  /** Disconnects once what was sent is answered (at most a second later); nothing is reported after. */
  close(): void {
    this.closed = true;
    const hard = setTimeout(() => this.client.disconnect(false), 1000);
    hard.unref();
    // After the calls already written (the fields deleted on leaving): Redis answers in order.
    this.client.quit().then(
      () => clearTimeout(hard),
      () => {
        clearTimeout(hard);
        this.client.disconnect(false);
      },
    );
  }
}
