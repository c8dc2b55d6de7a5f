// Helpers for the audit regression tests (issue 13): hostile byte sequences, PROXY v2 headers the
// writer does not make, bounded waits, and connects to an explicit host.
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { connect } from './harness.ts';
import { V2_SIGNATURE } from '../../src/proxy-protocol/types.ts';

const u8 = (n: number): Buffer => Buffer.from([n & 0xff]);
const u16 = (n: number): Buffer => Buffer.from([(n >> 8) & 0xff, n & 0xff]);
const u24 = (n: number): Buffer => Buffer.from([(n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]);

/** A minimal but well-formed TLS 1.2-style ClientHello record carrying one server_name. */
export function clientHello(sni: string): Buffer {
  const name = Buffer.from(sni, 'ascii');
  const serverName = Buffer.concat([u16(0), u16(name.length + 5), u16(name.length + 3), u8(0), u16(name.length), name]);
  const body = Buffer.concat([
    u16(0x0303), // legacy_version
    randomBytes(32), // random
    u8(0), // empty session id
    u16(2),
    u16(0x1301), // one cipher suite
    u8(1),
    u8(0), // null compression
    u16(serverName.length),
    serverName,
  ]);
  const handshake = Buffer.concat([u8(1), u24(body.length), body]);
  return Buffer.concat([u8(0x16), u16(0x0301), u16(handshake.length), handshake]);
}

/** `length` bytes that open a TLS handshake record declaring 65535 bytes: more than any record may hold. */
export function oversizedRecord(length: number): Buffer {
  const out = Buffer.alloc(length, 0x41);
  Buffer.from([0x16, 0x03, 0x01, 0xff, 0xff]).copy(out);
  return out;
}

/** A v2 PROXY header with command PROXY and family UNSPEC (no address block). */
export function proxyV2Unspec(): Buffer {
  const out = Buffer.alloc(16);
  V2_SIGNATURE.copy(out, 0);
  out[12] = 0x21; // version 2, PROXY
  out[13] = 0x00; // UNSPEC, UNSPEC
  return out;
}

/** A v2 PROXY header with command PROXY over AF_UNIX stream sockets (216-byte address block). */
export function proxyV2Unix(): Buffer {
  const out = Buffer.alloc(16 + 216);
  V2_SIGNATURE.copy(out, 0);
  out[12] = 0x21; // version 2, PROXY
  out[13] = 0x31; // AF_UNIX, STREAM
  out.writeUInt16BE(216, 14);
  out.write('/run/balancer/client.sock', 16, 'latin1');
  out.write('/run/balancer/listen.sock', 16 + 108, 'latin1');
  return out;
}

/** Resolves after `ms` (for scenarios that need real time to pass, never to wait for an event). */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits up to `ms` for `predicate`; resolves with whether it held (never fails the test). */
export async function settle(predicate: () => boolean, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) return false;
    await delay(5);
  }
  return true;
}

/** `promise`, or a rejection naming `what` once `ms` have passed. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** The error code a connect to host:port fails with, or "connected". */
export async function connectOutcomeAt(host: string, port: number): Promise<string> {
  try {
    const socket = await connect(port, { host });
    socket.destroy();
    return 'connected';
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? 'error';
  }
}

/** One echo round trip to host:port; resolves with what went wrong, or null. */
export async function echoAt(host: string, port: number, message: string): Promise<string | null> {
  let socket: net.Socket;
  try {
    socket = await connect(port, { host });
  } catch (err) {
    return `connect: ${(err as NodeJS.ErrnoException).code}`;
  }
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let error: string | null = null;
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.on('error', (e: NodeJS.ErrnoException) => (error = `relay: ${e.code}`));
    socket.on('close', () => {
      const got = Buffer.concat(chunks).toString();
      resolve(error ?? (got === message ? null : `relay: got ${JSON.stringify(got)}`));
    });
    socket.end(message);
  });
}

/** Distinct ports nobody listens on (bound then released). */
export async function freePorts(n: number): Promise<number[]> {
  const servers: net.Server[] = [];
  for (let i = 0; i < n; i++) {
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    servers.push(server);
  }
  // Held together, so the kernel hands out n different ports.
  const ports = servers.map((s) => (s.address() as net.AddressInfo).port);
  await Promise.all(servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
  return ports;
}

/**
 * Opens `n` connections to `port`, `batch` at a time; each sends `bytes` and then FIN as soon as
 * it is connected. Every socket has an error handler.
 */
export async function openMany(port: number, n: number, bytes: Buffer, batch = 100): Promise<net.Socket[]> {
  const sockets: net.Socket[] = [];
  for (let i = 0; i < n; i += batch) {
    const group = await Promise.all(
      Array.from({ length: Math.min(batch, n - i) }, async () => {
        const socket = await connect(port);
        socket.on('error', () => {}); // the proxy may reset it
        socket.end(bytes);
        return socket;
      }),
    );
    sockets.push(...group);
  }
  return sockets;
}

/** Waits until the async `predicate` holds, checking every 20 ms; fails after `ms`. */
export async function untilAsync(predicate: () => Promise<boolean>, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await delay(20);
  }
}

/** True when `promise` settles within `ms`, false when it is still pending then. */
export async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  const result = await Promise.race([promise.then(() => true as const, () => true as const), timeout]);
  clearTimeout(timer);
  return result;
}

/**
 * Resolves when the peer ends the connection: FIN ('end') or reset/close, whichever comes first.
 * A socket opened with allowHalfOpen stays open after the peer's FIN, so 'close' alone would not
 * show a proxy that closed its side.
 */
export function ended(socket: net.Socket): Promise<void> {
  return new Promise((resolve) => {
    socket.on('error', () => {});
    socket.once('end', () => resolve());
    socket.once('close', () => resolve());
    socket.resume();
  });
}
