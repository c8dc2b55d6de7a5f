// What the cost scripts (refusal-cost.ts, cluster-cost.ts) measure a daemon with: its CPU time from
// /proc and a free loopback port to give it.
import { readFileSync } from 'node:fs';
import net from 'node:net';

const TICKS = 100; // USER_HZ

/** User + system CPU of process `pid` so far, in ms (/proc/PID/stat, Linux). */
export function cpuMs(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / TICKS;
}

/** A port on 127.0.0.1 that was free a moment ago. */
export async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}
