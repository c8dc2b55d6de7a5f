// Client-side helpers shared by the operations tests: read an exact reply, one echo round trip,
// the outcome of a connect attempt.
import assert from 'node:assert/strict';
import type net from 'node:net';
import { connect, readAll } from './harness.ts';

/** Reads exactly `expected` from the socket (then pauses it so nothing is lost). */
export function expectData(socket: net.Socket, expected: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let got = '';
    const onData = (chunk: Buffer): void => {
      got += chunk.toString('latin1');
      if (got.length < expected.length) return;
      cleanup();
      socket.pause();
      if (got === expected) resolve();
      else reject(new assert.AssertionError({ message: 'unexpected data', actual: got, expected }));
    };
    const onEnd = (): void => {
      cleanup();
      reject(new assert.AssertionError({ message: 'socket ended early', actual: got, expected }));
    };
    const cleanup = (): void => {
      socket.off('data', onData);
      socket.off('close', onEnd);
      socket.off('error', onEnd);
    };
    socket.on('data', onData);
    socket.on('close', onEnd);
    socket.on('error', onEnd);
    socket.resume();
  });
}

/** One echo round trip on a new connection; resolves with what went wrong, or null. */
export async function echoRoundTrip(port: number, message: string): Promise<string | null> {
  let socket: net.Socket;
  try {
    socket = await connect(port);
  } catch (err) {
    return `connect: ${(err as NodeJS.ErrnoException).code}`;
  }
  const result = readAll(socket);
  socket.end(message);
  const { data, error } = await result;
  if (error !== null) return `relay: ${error.code}`;
  if (data.toString() !== message) return `relay: got ${JSON.stringify(data.toString())}`;
  return null;
}

/** Resolves with the error code a connect attempt fails with (or "connected"). */
export async function connectOutcome(port: number): Promise<string> {
  try {
    const socket = await connect(port);
    socket.destroy();
    return 'connected';
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? 'error';
  }
}

/**
 * How a new connection that sends one byte and ends is treated: "refused" when nothing listens,
 * "reset" when the proxy turns it away (an RST, possibly before connect completes), "relayed" when
 * the byte comes back from the echo backend, "closed" for anything else.
 */
export async function admission(port: number, opts: { localAddress?: string } = {}): Promise<'refused' | 'reset' | 'relayed' | 'closed'> {
  let socket: net.Socket;
  try {
    socket = await connect(port, opts);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ECONNREFUSED') return 'refused';
    assert.equal(code, 'ECONNRESET');
    return 'reset';
  }
  const result = readAll(socket);
  socket.end('x');
  const { data, error } = await result;
  if (error?.code === 'ECONNRESET') return 'reset';
  return data.toString() === 'x' ? 'relayed' : 'closed';
}
