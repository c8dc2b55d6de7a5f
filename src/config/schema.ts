// The shape of the TOML file as zod schemas. Every table is a strict object (zod's plain object
// silently drops unknown keys, which hides typos). Leaves parse as they validate: durations
// become milliseconds, addresses become HostPort, SNI patterns are lower-cased. Global defaults
// live here; listener-level keys stay optional so load.ts can tell "inherit" from "set".
// Rules that look at more than one value (duplicates, overlaps) are in rules.ts.
import * as z from 'zod';
import { formatValue, wrongTypeMessage } from './issues.ts';
import { isUnitError, parseCidr, parseDuration, parseHostPort, parseSniPattern } from './units.ts';
import type { AdminListen, HostPort } from './types.ts';
import { MAX_THREADS } from '../governance/shared-counts.ts';
import { parseRedisUrl, redactRedisUrl } from '../cluster/redis-url.ts';

// Error param for a schema: our wording when the value has the wrong type or is missing.
function expecting(description: string) {
  return {
    error: (issue: z.core.$ZodRawIssue) =>
      issue.code === 'invalid_type' || issue.code === 'invalid_union'
        ? wrongTypeMessage(issue.input, description)
        : undefined,
  };
}

function reject(ctx: z.RefinementCtx, message: string, input: string): never {
  ctx.addIssue({ code: 'custom', message, input });
  return z.NEVER;
}

const DURATION = 'a duration such as "5s", "250ms" or "1m30s"';

/** A duration string -> milliseconds; `positive` refuses 0. */
function duration(options: { positive: boolean }) {
  return z.string(expecting(DURATION)).transform((text, ctx): number => {
    const ms = parseDuration(text);
    if (isUnitError(ms)) return reject(ctx, `${formatValue(text)} is not a duration (${ms.error})`, text);
    if (options.positive && ms === 0) return reject(ctx, `must be greater than 0, got ${formatValue(text)}`, text);
    return ms;
  });
}

function hostPort(opts: { allowPortZero?: boolean } = {}) {
  return z.string(expecting('host:port such as "127.0.0.1:8443"')).transform((text, ctx): HostPort => {
    const parsed = parseHostPort(text, opts);
    if (isUnitError(parsed)) return reject(ctx, `${formatValue(text)} is not host:port (${parsed.error})`, text);
    return parsed;
  });
}

/** An address or CIDR, kept as written once it is known to parse. */
function cidr() {
  return z.string(expecting('an address or CIDR such as "10.0.0.0/8"')).transform((text, ctx): string => {
    const parsed = parseCidr(text);
    if (isUnitError(parsed)) return reject(ctx, `${formatValue(text)} is not an address or CIDR (${parsed.error})`, text);
    return text;
  });
}

function sniPattern() {
  return z.string(expecting('a server name such as "api.example.com"')).transform((text, ctx): string => {
    const parsed = parseSniPattern(text);
    if (isUnitError(parsed)) return reject(ctx, `${formatValue(text)} is not a server name or "*." pattern (${parsed.error})`, text);
    return parsed;
  });
}

const NAME = /^[A-Za-z0-9_.-]{1,64}$/;

function name() {
  return z.string(expecting('a name')).regex(NAME, {
    error: (issue) => `${formatValue(issue.input)} is not a valid name (1-64 letters, digits, "_", "." or "-")`,
  });
}

/** `key = "x"` or `key = ["x", "y"]`, always a list after parsing. */
function oneOrMany<Out>(element: z.ZodType<Out, string>, description: string, options: { nonEmpty: boolean }) {
  const list = z.array(element);
  return z.union([element.transform((value): Out[] => [value]), options.nonEmpty ? list.min(1) : list], expecting(description));
}

/**
 * Every count has a ceiling, so no value that passes check-config can crash or bloat the daemon
 * (an unbounded rate count once passed validation and failed on the first connection).
 */
export const MAX_COUNT = 10_000_000;
/** max_tracked_ips: each tracked client costs a table entry (see README, Memory). */
export const MAX_TRACKED_IPS = 10_000_000;

function count() {
  return z.int(expecting('a whole number')).min(0).max(MAX_COUNT);
}

function percent() {
  return z.number(expecting('a percentage from 0 to 100')).min(0).max(100);
}

function bool() {
  return z.boolean(expecting('true or false'));
}

function onRemoval() {
  return z.enum(['keep', 'drain', 'close']);
}

function firewall() {
  return z.strictObject({
    allow: z.array(cidr(), expecting('a list of addresses or CIDRs')).default([]),
    block: z.array(cidr(), expecting('a list of addresses or CIDRs')).default([]),
  });
}

function table(description: string) {
  return expecting(`a table (${description})`);
}

const globalLimits = z.strictObject(
  {
    max_connections: count().default(10_000),
    max_connections_per_ip: count().default(0),
    connection_rate_per_ip: z
      .strictObject({ count: count().default(0), per: duration({ positive: true }).default(10_000) }, table('{ count = 0, per = "10s" }'))
      .prefault({}),
    fair_share_above: percent().default(80),
    ipv6_prefix: z.int(expecting('a prefix length from 1 to 128')).min(1).max(128).default(64),
    max_tracked_ips: z.int(expecting('a whole number')).min(1).max(MAX_TRACKED_IPS).default(100_000),
  },
  table('[limits]'),
);

const listenerLimits = z.strictObject(
  {
    max_connections_per_ip: count().optional(),
    connection_rate_per_ip: z
      .strictObject({ count: count().optional(), per: duration({ positive: true }).optional() }, table('{ count = 0, per = "10s" }'))
      .optional(),
    fair_share_above: percent().optional(),
  },
  table('[listeners.limits]'),
);

const globalTimeouts = z.strictObject(
  {
    connect: duration({ positive: true }).default(5_000),
    client_hello: duration({ positive: true }).default(5_000),
    idle: duration({ positive: false }).default(600_000),
    half_close: duration({ positive: false }).default(30_000),
    max_lifetime: duration({ positive: false }).default(0),
    max_lifetime_jitter: percent().default(0),
  },
  table('[timeouts]'),
);

const listenerTimeouts = z.strictObject(
  {
    connect: duration({ positive: true }).optional(),
    client_hello: duration({ positive: true }).optional(),
    idle: duration({ positive: false }).optional(),
    half_close: duration({ positive: false }).optional(),
    max_lifetime: duration({ positive: false }).optional(),
    max_lifetime_jitter: percent().optional(),
  },
  table('[listeners.timeouts]'),
);

// Node can only bind a unix socket path of at most 107 bytes (sun_path is 108 with the NUL).
const MAX_UNIX_PATH_BYTES = 107;

const adminListen = z
  .string(expecting('host:port or "unix:/path/to.sock"'))
  .transform((text, ctx): AdminListen => {
    if (text.startsWith('unix:')) {
      const path = text.slice('unix:'.length);
      if (!path.startsWith('/')) {
        return reject(ctx, `${formatValue(text)}: the socket path must be absolute (e.g. "unix:/run/smartproxy/admin.sock")`, text);
      }
      if (Buffer.byteLength(path) > MAX_UNIX_PATH_BYTES) {
        return reject(ctx, `${formatValue(text)}: the socket path is longer than ${MAX_UNIX_PATH_BYTES} bytes`, text);
      }
      return { kind: 'unix', path };
    }
    const address = parseHostPort(text);
    if (isUnitError(address)) return reject(ctx, `${formatValue(text)} is not host:port or "unix:/path" (${address.error})`, text);
    return { kind: 'tcp', address };
  });

const proxyProtocolAccept = z.strictObject(
  {
    accept: z.enum(['v1', 'v2', 'any']).default('any'),
    trusted: z.array(cidr(), expecting('a list of addresses or CIDRs allowed to send a PROXY header')).min(1),
    require: bool().default(true),
  },
  table('[listeners.proxy_protocol]'),
);

/** Most backends one route can list (a host name may resolve to more: see MAX_RESOLVED_ADDRESSES). */
export const MAX_BACKENDS_PER_ROUTE = 256;

/** `"host:port"` or `{ address = "host:port", weight, backup, max_connections }`. */
const backend = z.union(
  [
    hostPort(),
    z.strictObject(
      {
        address: hostPort(),
        weight: z.int(expecting('a weight from 1 to 1000')).min(1).max(1000).default(1),
        backup: bool().default(false),
        max_connections: count().default(0),
      },
      table('{ address = "host:port", weight = 1, backup = false, max_connections = 0 }'),
    ),
  ],
  expecting('"host:port" or { address = "host:port", weight = 1, backup = false, max_connections = 0 }'),
);

const healthCheck = z
  .strictObject(
    {
      type: z.enum(['tcp', 'send_expect', 'tls']).default('tcp'),
      interval: duration({ positive: true }).default(5_000),
      timeout: duration({ positive: true }).default(2_000),
      rise: z.int(expecting('a whole number from 1 to 100')).min(1).max(100).default(2),
      fall: z.int(expecting('a whole number from 1 to 100')).min(1).max(100).default(3),
      jitter: percent().default(10),
      send: z.string(expecting('a string')).max(4096).optional(),
      expect: z.string(expecting('a string')).min(1).max(4096).optional(),
      expect_regex: z
        .string(expecting('a regular expression'))
        .min(1)
        .max(1024)
        .refine((text) => {
          try {
            new RegExp(text);
            return true;
          } catch {
            return false;
          }
        }, { error: (issue) => `${formatValue(issue.input)} is not a valid regular expression` })
        .optional(),
      tls_server_name: z.string(expecting('a server name')).min(1).max(255).optional(),
      tls_verify: bool().default(false),
      proxy_protocol: z.enum(['local', 'none']).optional(),
    },
    table('[listeners.routes.health_check]'),
  );

const ejection = z.strictObject(
  {
    consecutive_failures: z.int(expecting('a whole number from 0 to 1000')).min(0).max(1000).default(3),
    base_time: duration({ positive: true }).default(30_000),
    max_time: duration({ positive: true }).default(300_000),
    max_share: percent().default(50),
  },
  table('[listeners.routes.ejection]'),
);

const route = z.strictObject(
  {
    name: name(),
    sni: oneOrMany(sniPattern(), 'a server name or a list of them', { nonEmpty: false }).optional(),
    default: bool().default(false),
    backends: z.union([backend.transform((b) => [b]), z.array(backend).min(1).max(MAX_BACKENDS_PER_ROUTE)], expecting('host:port, a backend table or a list of them')),
    balance: z.enum(['round_robin', 'least_conn', 'random_two', 'source_hash']).default('round_robin'),
    on_all_down: z.enum(['panic', 'refuse']).default('panic'),
    slow_start: duration({ positive: false }).default(0),
    health_check: healthCheck.optional(),
    ejection: ejection.prefault({}),
    send_proxy_protocol: z.enum(['v1', 'v2']).optional(),
    pass_through_tlvs: z.array(z.int(expecting('a TLV type from 0 to 255')).min(0).max(255), expecting('a list of TLV types')).default([]),
    on_removal: onRemoval().optional(),
    limits: z.strictObject({ max_connections: count().default(0) }, table('[listeners.routes.limits]')).prefault({}),
    firewall: firewall().prefault({}),
  },
  table('[[listeners.routes]]'),
);

const NO_ROUTES = 'a listener needs at least one [[listeners.routes]] table';

const listener = z.strictObject(
  {
    name: name(),
    bind: oneOrMany(hostPort({ allowPortZero: true }), 'host:port or a list of them', { nonEmpty: true }),
    workers: z.int(expecting('a whole number')).min(1).max(MAX_COUNT).default(1024),
    queue: count().default(256),
    queue_timeout: duration({ positive: true }).default(5_000),
    reject: z.enum(['reset', 'close']).default('reset'),
    access_log: bool().default(true),
    ipv6_only: bool().default(true),
    on_removal: onRemoval().optional(),
    timeouts: listenerTimeouts.optional(),
    limits: listenerLimits.optional(),
    firewall: firewall().prefault({}),
    proxy_protocol: proxyProtocolAccept.optional(),
    routes: z
      .array(route, {
        error: (issue) => (issue.input === undefined ? `missing: ${NO_ROUTES}` : wrongTypeMessage(issue.input, '[[listeners.routes]] tables')),
      })
      .min(1, { error: `${NO_ROUTES}, got []` }),
  },
  table('[[listeners]]'),
);

/** `[cluster] redis`: checked here, kept as written (the store parses it again when it connects). */
const redisUrl = z.string(expecting('a Redis URL such as "redis://127.0.0.1:6379/0"')).transform((text, ctx): string => {
  const parsed = parseRedisUrl(text);
  // The value shown in a message is the redacted one: a password never reaches check-config's output.
  if (!parsed.ok) return reject(ctx, `${formatValue(redactRedisUrl(text))} is not a Redis address (${parsed.error})`, redactRedisUrl(text));
  return text;
});

/** The smallest lease_ttl: the renewal runs every third of it and must not become a busy loop. */
export const MIN_LEASE_TTL_MS = 300;

const CLUSTER_LIMITS = ['max_connections_per_ip', 'connection_rate_per_ip'] as const;

const cluster = z.strictObject(
  {
    redis: redisUrl,
    password_file: z
      .string(expecting('an absolute file path'))
      .refine((text) => text.startsWith('/'), { error: (issue) => `${formatValue(issue.input)}: the path must be absolute` })
      .optional(),
    instance: name().optional(),
    timeout: duration({ positive: true }).default(20),
    on_store_failure: z.enum(['local', 'open', 'closed']).default('local'),
    lease_ttl: duration({ positive: true })
      .refine((ms) => ms >= MIN_LEASE_TTL_MS, { error: `must be at least ${MIN_LEASE_TTL_MS}ms` })
      .default(15_000),
    key_prefix: z
      .string(expecting('a string'))
      .refine((text) => text.length <= 64, { error: 'must be at most 64 characters' })
      .default('smartproxy:'),
    limits: z.array(z.enum(CLUSTER_LIMITS), expecting('a list of limit names')).default([...CLUSTER_LIMITS]),
  },
  table('[cluster]'),
);

const NO_LISTENERS = 'the file needs at least one [[listeners]] table';

export const configFileSchema = z.strictObject({
  limits: globalLimits.prefault({}),
  timeouts: globalTimeouts.prefault({}),
  firewall: firewall().prefault({}),
  logging: z
    .strictObject(
      {
        level: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal']).default('info'),
        rejection_summary_interval: duration({ positive: true }).default(10_000),
      },
      table('[logging]'),
    )
    .prefault({}),
  admin: z.strictObject({ listen: adminListen, allow_public: bool().default(false) }, table('[admin]')).optional(),
  shutdown: z
    .strictObject(
      {
        drain_timeout: duration({ positive: false }).default(30_000),
        shutdown_delay: duration({ positive: false }).default(0),
      },
      table('[shutdown]'),
    )
    .prefault({}),
  reload: z.strictObject({ on_removal: onRemoval().default('keep') }, table('[reload]')).prefault({}),
  dns: z
    .strictObject(
      {
        servers: z.array(hostPort(), expecting('a list of host:port, e.g. ["127.0.0.1:53"]')).max(16).optional(),
        timeout: duration({ positive: true }).default(2_000),
        min_ttl: duration({ positive: true }).default(1_000),
        max_ttl: duration({ positive: true }).default(3_600_000),
        retry: duration({ positive: true }).default(5_000),
      },
      table('[dns]'),
    )
    .prefault({}),
  process: z
    .strictObject(
      {
        threads: z
          .union([z.literal('auto'), z.int().min(1).max(MAX_THREADS)], expecting(`"auto" or a number of threads from 1 to ${MAX_THREADS}`))
          .default('auto'),
      },
      table('[process]'),
    )
    .prefault({}),
  cluster: cluster.optional(),
  listeners: z
    .array(listener, {
      error: (issue) => (issue.input === undefined ? `missing: ${NO_LISTENERS}` : wrongTypeMessage(issue.input, '[[listeners]] tables')),
    })
    .min(1, { error: `${NO_LISTENERS}, got []` }),
});

/** The file after schema validation: parsed leaves, global defaults filled, listener keys optional. */
export type ConfigFile = z.output<typeof configFileSchema>;
