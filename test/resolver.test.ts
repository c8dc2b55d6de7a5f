// Backend host-name resolution against a real DNS server on loopback UDP: answers, TTLs,
// failures that keep the last good answer, and that retain() and close() really stop queries.
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { BackendResolver, type BackendResolverOptions, type ResolvedAddresses } from '../src/backends/resolver.ts';
import { startDnsServer, type DnsServer } from './support/dns-server.ts';

/** No test waits longer than this for an event that does not come. */
const BOUNDED = { timeout: 10_000 };

interface Logged {
  readonly obj: Record<string, unknown>;
  readonly msg: string;
}

interface Setup {
  readonly dns: DnsServer;
  readonly resolver: BackendResolver;
  readonly warns: Logged[];
  readonly infos: Logged[];
  /** The next onChange call (or the oldest one not yet taken). */
  nextChange(): Promise<{ host: string; current: ResolvedAddresses }>;
  /** onChange calls not yet taken by nextChange(). */
  readonly pendingChanges: number;
}

/** A DNS server, and a resolver pointed at it with short timeouts; both closed after the test. */
async function setup(t: TestContext, opts: Partial<BackendResolverOptions> = {}, dns?: DnsServer): Promise<Setup> {
  if (dns === undefined) {
    const server = await startDnsServer();
    t.after(() => server.close());
    dns = server;
  }
  const warns: Logged[] = [];
  const infos: Logged[] = [];
  const changes: Array<{ host: string; current: ResolvedAddresses }> = [];
  const waiters: Array<(change: { host: string; current: ResolvedAddresses }) => void> = [];
  const resolver = new BackendResolver({
    servers: [dns.address],
    onChange: (host, current) => {
      const waiter = waiters.shift();
      if (waiter !== undefined) waiter({ host, current });
      else changes.push({ host, current });
    },
    log: {
      warn: (obj, msg) => warns.push({ obj: obj as Record<string, unknown>, msg }),
      info: (obj, msg) => infos.push({ obj: obj as Record<string, unknown>, msg }),
    },
    minTtlMs: 100,
    retryMs: 200,
    timeoutMs: 200,
    tries: 1,
    ...opts,
  });
  t.after(() => resolver.close());
  return {
    dns,
    resolver,
    warns,
    infos,
    nextChange: () => {
      const queued = changes.shift();
      if (queued !== undefined) return Promise.resolve(queued);
      return new Promise((resolve) => waiters.push(resolve));
    },
    get pendingChanges() {
      return changes.length;
    },
  };
}

test('a host with A and AAAA records resolves to both families, IPv4 first, sorted and deduplicated', BOUNDED, async (t) => {
  const { dns, resolver, warns } = await setup(t);
  dns.set('api.test', { a: ['10.0.0.10', '10.0.0.2', '10.0.0.2'], aaaa: ['2001:db8::2', '2001:db8::1'], ttl: 60 });

  const first = await resolver.watch('api.test');
  assert.deepEqual(first.addresses, ['10.0.0.2', '10.0.0.10', '2001:db8::1', '2001:db8::2']);
  assert.equal(first.ok, true);
  assert.equal(first.error, null);
  assert.equal(first.expiresAt - first.resolvedAt, 60_000);
  assert.deepEqual(dns.queries('api.test'), { a: 1, aaaa: 1 });

  // Watching it again gives the current answer without a query.
  assert.equal(await resolver.watch('api.test'), first);
  assert.equal(resolver.current('api.test'), first);
  assert.deepEqual(dns.queries('api.test'), { a: 1, aaaa: 1 });
  assert.equal(warns.length, 0);
});

test('a host with A records only resolves without a failure (AAAA with no data is an answer)', BOUNDED, async (t) => {
  const { dns, resolver, warns } = await setup(t);
  dns.set('v4only.test', { a: ['192.0.2.7'], aaaa: [], ttl: 60 });
  const first = await resolver.watch('v4only.test');
  assert.deepEqual(first.addresses, ['192.0.2.7']);
  assert.equal(first.ok, true);
  assert.equal(warns.length, 0);
});

test('two watch() calls during the first resolution share its one query', BOUNDED, async (t) => {
  const { dns, resolver } = await setup(t);
  dns.set('api.test', { a: ['10.0.0.1'], aaaa: [], ttl: 60 });
  const [x, y] = await Promise.all([resolver.watch('api.test'), resolver.watch('api.test')]);
  assert.equal(x, y);
  assert.deepEqual(dns.queries('api.test'), { a: 1, aaaa: 1 });
});

test('the host is re-resolved when its TTL runs out, not before, and the changed set is reported', BOUNDED, async (t) => {
  const { dns, resolver, nextChange } = await setup(t);
  dns.set('api.test', { a: ['10.0.0.1'], aaaa: [], ttl: 1 });
  const first = await resolver.watch('api.test');
  const started = Date.now();
  dns.set('api.test', { a: ['10.0.0.1', '10.0.0.3'], aaaa: ['2001:db8::3'], ttl: 60 });
  assert.deepEqual(dns.queries('api.test'), { a: 1, aaaa: 1 });

  const change = await nextChange();
  assert.equal(change.host, 'api.test');
  assert.deepEqual(change.current.addresses, ['10.0.0.1', '10.0.0.3', '2001:db8::3']);
  assert.equal(change.current.ok, true);
  // The new set can only come from a new query: it came no earlier than the 1 s TTL.
  assert.ok(Date.now() - started >= 1000 - 50, `re-resolved after ${Date.now() - started} ms`);
  assert.ok(change.current.resolvedAt >= first.expiresAt);
  assert.deepEqual(dns.queries('api.test'), { a: 2, aaaa: 2 });
  assert.equal(resolver.current('api.test'), change.current);
});

test('an unchanged answer after the TTL is not reported', BOUNDED, async (t) => {
  const s = await setup(t);
  s.dns.set('api.test', { a: ['10.0.0.1'], aaaa: [], ttl: 0 }); // re-resolved every 100 ms (minTtlMs)
  await s.resolver.watch('api.test');
  await s.dns.nextQuery('api.test', 'A');
  await s.dns.nextQuery('api.test', 'A'); // by this second re-resolution the first one's answer has been handled
  assert.equal(s.pendingChanges, 0);
});

test('the shortest TTL of the answer decides, clamped to minTtlMs and maxTtlMs', BOUNDED, async (t) => {
  const { dns, resolver } = await setup(t, { minTtlMs: 300, maxTtlMs: 5000 });
  dns.set('mixed.test', { a: ['10.0.0.1'], aaaa: ['2001:db8::1'], ttl: 60, aaaaTtl: 2 });
  dns.set('zero.test', { a: ['10.0.0.1'], aaaa: [], ttl: 0 });
  dns.set('long.test', { a: ['10.0.0.1'], aaaa: [], ttl: 86_400 });
  const span = (r: ResolvedAddresses) => r.expiresAt - r.resolvedAt;
  assert.equal(span(await resolver.watch('mixed.test')), 2000);
  assert.equal(span(await resolver.watch('zero.test')), 300);
  assert.equal(span(await resolver.watch('long.test')), 5000);
});

for (const [mode, code] of [
  ['servfail', 'ESERVFAIL'],
  ['drop', 'ETIMEOUT'],
] as const) {
  test(`a server that ${mode === 'drop' ? 'stops answering' : 'answers SERVFAIL'} leaves the last good answer with ok=false and one warning, and recovery is reported and logged`, BOUNDED, async (t) => {
    const { dns, resolver, warns, infos, nextChange } = await setup(t);
    dns.set('api.test', { a: ['10.0.0.1', '10.0.0.2'], aaaa: [], ttl: 0 });
    const first = await resolver.watch('api.test');

    dns.mode(mode);
    const failing = await nextChange();
    assert.deepEqual(failing.current.addresses, first.addresses);
    assert.equal(failing.current.ok, false);
    assert.equal(failing.current.error, code);
    assert.equal(failing.current.resolvedAt, first.resolvedAt);
    assert.equal(warns.length, 1);
    assert.equal(warns[0]!.obj['host'], 'api.test');
    assert.equal(warns[0]!.obj['error'], code);

    // Retried every retryMs; the retries neither warn again nor report a change.
    const queried = dns.queries('api.test').a;
    for (let i = 0; i < 3; i++) await dns.nextQuery('api.test', 'A');
    assert.equal(dns.queries('api.test').a, queried + 3);
    assert.equal(warns.length, 1);
    assert.equal(resolver.current('api.test')!.ok, false);

    dns.mode('answer');
    const recovered = await nextChange();
    assert.deepEqual(recovered.current.addresses, first.addresses);
    assert.equal(recovered.current.ok, true);
    assert.equal(recovered.current.error, null);
    assert.equal(warns.length, 1);
    assert.equal(infos.length, 1);
    assert.equal(infos[0]!.obj['host'], 'api.test');
  });
}

test('an AAAA outage alone keeps the last good IPv6 addresses and is retried after retryMs, not the TTL', BOUNDED, async (t) => {
  const { dns, resolver, warns, nextChange } = await setup(t, { retryMs: 150 });
  dns.set('api.test', { a: ['10.0.0.1'], aaaa: ['2001:db8::1'], ttl: 1 });
  await resolver.watch('api.test');
  dns.mode('servfail', 'api.test', 'AAAA');
  await dns.nextQuery('api.test', 'AAAA'); // the re-resolution at the 1 s TTL, half failed
  const failedAt = Date.now();
  dns.mode('answer', 'api.test', 'AAAA');
  dns.set('api.test', { a: ['10.0.0.1'], aaaa: ['2001:db8::2'], ttl: 60 });

  // The first change is the new IPv6 address: the IPv4-only half answer was never reported.
  const change = await nextChange();
  assert.deepEqual(change.current.addresses, ['10.0.0.1', '2001:db8::2']);
  assert.ok(Date.now() - failedAt < 900, `retried after ${Date.now() - failedAt} ms`);
  assert.equal(warns.length, 0);
});

test('an AAAA outage on the first resolution gives the IPv4 addresses, ok', BOUNDED, async (t) => {
  const { dns, resolver, warns } = await setup(t, { retryMs: 150 });
  dns.set('api.test', { a: ['10.0.0.1'], aaaa: ['2001:db8::1'], ttl: 60 });
  dns.mode('drop', 'api.test', 'AAAA');
  const partial = await resolver.watch('api.test');
  assert.deepEqual(partial.addresses, ['10.0.0.1']);
  assert.equal(partial.ok, true);
  assert.equal(partial.expiresAt - partial.resolvedAt, 150);
  assert.equal(warns.length, 0);
});

test('an unknown name gives ok=false, no addresses and ENOTFOUND, with one warning', BOUNDED, async (t) => {
  const { dns, resolver, warns } = await setup(t);
  const result = await resolver.watch('nowhere.test');
  assert.deepEqual(result.addresses, []);
  assert.equal(result.ok, false);
  assert.equal(result.error, 'ENOTFOUND');
  assert.equal(result.resolvedAt, 0);
  assert.equal(warns.length, 1);
  assert.deepEqual(dns.queries('nowhere.test'), { a: 1, aaaa: 1 });

  // A name with neither A nor AAAA records fails too, as ENODATA.
  dns.set('empty.test', { a: [], aaaa: [], ttl: 60 });
  const empty = await resolver.watch('empty.test');
  assert.equal(empty.ok, false);
  assert.equal(empty.error, 'ENODATA');
});

test('a name that appears later is reported through onChange with ok=true', BOUNDED, async (t) => {
  const { dns, resolver, infos, nextChange } = await setup(t);
  assert.equal((await resolver.watch('later.test')).ok, false);
  dns.set('later.test', { a: ['10.0.0.5'], aaaa: [], ttl: 60 });
  const change = await nextChange();
  assert.deepEqual(change.current.addresses, ['10.0.0.5']);
  assert.equal(change.current.ok, true);
  assert.equal(infos.length, 1);
});

test('an IP literal is its own answer at once, with no query and no re-resolution', BOUNDED, async (t) => {
  const { dns, resolver } = await setup(t);
  for (const literal of ['192.0.2.1', '2001:db8::5']) {
    const result = await resolver.watch(literal);
    assert.deepEqual(result.addresses, [literal]);
    assert.equal(result.ok, true);
    assert.equal(result.expiresAt, Infinity);
    assert.equal(resolver.current(literal), result);
  }
  assert.deepEqual(dns.queries(), { a: 0, aaaa: 0 });
});

test('retain() stops the queries of a host it drops and keeps the others', BOUNDED, async (t) => {
  const { dns, resolver, nextChange } = await setup(t, { minTtlMs: 200 });
  dns.set('dropped.test', { a: ['10.0.0.1'], aaaa: [], ttl: 0 }); // would re-resolve after 200 ms
  dns.set('kept.test', { a: ['10.0.0.2'], aaaa: [], ttl: 1 }); // re-resolves after 1 s
  await resolver.watch('dropped.test');
  await resolver.watch('kept.test');
  resolver.retain(new Set(['kept.test']));
  assert.equal(resolver.current('dropped.test'), undefined);

  dns.set('kept.test', { a: ['10.0.0.3'], aaaa: [], ttl: 60 });
  const change = await nextChange();
  assert.equal(change.host, 'kept.test');
  // By the kept host's 1 s re-resolution, the dropped one would have been queried four times.
  assert.deepEqual(dns.queries('dropped.test'), { a: 1, aaaa: 1 });
});

test('close() cancels queries in flight, stops every timer and leaves no active handle', BOUNDED, async (t) => {
  const dns = await startDnsServer();
  t.after(() => dns.close());
  // An earlier test's server socket finishes closing (its handle goes in the loop's close phase, after immediates).
  for (let i = 0; i < 2; i++) await new Promise((resolve) => setImmediate(resolve));
  const resources = process.getActiveResourcesInfo().sort();

  const closing = await setup(t, { minTtlMs: 200, timeoutMs: 5000 }, dns);
  dns.set('ticking.test', { a: ['10.0.0.1'], aaaa: [], ttl: 0 }); // re-resolves every 200 ms
  await closing.resolver.watch('ticking.test');
  dns.mode('drop', 'silent.test');
  const pending = closing.resolver.watch('silent.test');
  await dns.nextQuery('silent.test');

  const closedAt = Date.now();
  closing.resolver.close();
  closing.resolver.close(); // idempotent
  const cancelled = await pending;
  assert.equal(cancelled.ok, false);
  assert.equal(cancelled.error, 'ECANCELLED');
  assert.ok(Date.now() - closedAt < 1000, 'the query in flight was cancelled, not timed out');
  assert.deepEqual(process.getActiveResourcesInfo().sort(), resources);
  const ticks = dns.queries('ticking.test');

  // A second resolver is the clock: by its 1 s re-resolution, the closed one's 200 ms timer would have fired.
  const clock = await setup(t, {}, dns);
  dns.set('clock.test', { a: ['10.0.0.1'], aaaa: [], ttl: 1 });
  await clock.resolver.watch('clock.test');
  dns.set('clock.test', { a: ['10.0.0.2'], aaaa: [], ttl: 60 });
  await clock.nextChange();
  assert.deepEqual(dns.queries('ticking.test'), ticks);
  assert.equal(closing.pendingChanges, 0);
  assert.equal((await closing.resolver.watch('ticking.test')).error, 'ECANCELLED');
});

test('the DNS server ignores malformed packets and keeps answering', BOUNDED, async (t) => {
  const { dns, resolver } = await setup(t);
  const dgram = await import('node:dgram');
  const socket = dgram.createSocket('udp4');
  t.after(() => socket.close());
  const junk = [Buffer.alloc(0), Buffer.from([1, 2, 3]), Buffer.alloc(40, 0xff), Buffer.from('000001000001000000000000c00c00010001', 'hex')];
  for (const packet of junk) await new Promise<void>((resolve) => socket.send(packet, dns.port, '127.0.0.1', () => resolve()));
  dns.set('api.test', { a: ['10.0.0.1'], aaaa: [], ttl: 60 });
  assert.equal((await resolver.watch('api.test')).ok, true);
});

test('with the system servers, a name DNS does not know is looked up in /etc/hosts (localhost); with servers given, it is not', BOUNDED, async (t) => {
  const system = new BackendResolver({ servers: null, onChange: () => {} });
  t.after(() => system.close());
  const local = await system.watch('localhost');
  assert.equal(local.ok, true);
  assert.ok(local.addresses.includes('127.0.0.1') || local.addresses.includes('::1'), `localhost: ${local.addresses.join(', ')}`);
  assert.ok(local.expiresAt - local.resolvedAt >= 30_000, 'no TTL: looked up again every 30 s at most');
  const { resolver } = await setup(t);
  const viaServer = await resolver.watch('localhost');
  assert.equal(viaServer.ok, false, 'the configured server alone answers');
});
