// Heap cost of one tracked client in the ClientTable, with and without a rate window.
// Run: node --expose-gc --import tsx scripts/measure-client-table.ts
// Key strings are built before the baseline: Node allocates remoteAddress anyway, so what is
// measured is what the table adds (Map slot, entry object, ring).

import { ClientTable, type ClientLimits } from '../src/governance/client-table.ts';

const gc = (globalThis as { gc?: () => void }).gc;
if (gc === undefined) {
  console.error('run with node --expose-gc --import tsx scripts/measure-client-table.ts');
  process.exit(1);
}

const CLIENTS = 100_000;
const keys = Array.from({ length: CLIENTS }, (_, i) => `10.${i >> 16}.${(i >> 8) & 255}.${i & 255}`);

function heapUsed(): number {
  gc!();
  gc!();
  return process.memoryUsage().heapUsed;
}

function measure(label: string, limits: ClientLimits): void {
  let now = 0;
  const table = new ClientTable({ maxTrackedIps: CLIENTS, now: () => now });
  const before = heapUsed();
  for (const key of keys) {
    now += 0.001;
    table.acquire(key, limits);
  }
  const after = heapUsed();
  console.log(`${label.padEnd(34)} ${((after - before) / CLIENTS).toFixed(0).padStart(5)} bytes/client (${table.size} clients)`);
  table.clear();
}

measure('concurrency only (no window)', { maxConnectionsPerIp: 10, connectionRatePerIp: { count: 0, perMs: 0 } });
measure('rate window of 10 starts', { maxConnectionsPerIp: 10, connectionRatePerIp: { count: 10, perMs: 10_000 } });
measure('rate window of 100 starts', { maxConnectionsPerIp: 10, connectionRatePerIp: { count: 100, perMs: 60_000 } });
