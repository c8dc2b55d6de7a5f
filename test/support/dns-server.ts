// A tiny authoritative DNS server on loopback UDP, for resolver tests (RFC 1035, section 4).
//
// It answers A and AAAA from a mutable table, NXDOMAIN for names it does not know, and NOERROR
// with no answers (what resolvers report as ENODATA) for a known name without that type. A mode
// makes it answer SERVFAIL, or drop queries so the client times out. It counts queries per name
// and type. Anything it cannot parse is ignored: a test server must never crash on a packet.
// It binds 127.0.0.1 only.
import dgram from 'node:dgram';
import ipaddr from 'ipaddr.js';

export interface DnsRecords {
  readonly a: readonly string[];
  readonly aaaa: readonly string[];
  /** Seconds, for every record of the name. */
  readonly ttl: number;
  /** Seconds for the AAAA records when they differ from `ttl`. */
  readonly aaaaTtl?: number;
}

/** answer: from the table; servfail: RCODE 2 to everything; drop: no reply at all. */
export type DnsMode = 'answer' | 'servfail' | 'drop';

export interface QueryCounts {
  a: number;
  aaaa: number;
}

export interface DnsServer {
  readonly port: number;
  /** "127.0.0.1:<port>", as BackendResolver's `servers` takes it. */
  readonly address: string;
  /** Sets (or, with null, removes) a name's records; names compare case-insensitively. */
  set(name: string, records: DnsRecords | null): void;
  /** Sets the mode for every name, for one name, or for one name's A or AAAA queries; the most specific one set applies. */
  mode(mode: DnsMode, name?: string, type?: 'A' | 'AAAA'): void;
  /** Queries received for `name` (all names when omitted), dropped ones included. */
  queries(name?: string): QueryCounts;
  /** Resolves at the next query for `name` (of `type`, or either), once it has been answered or dropped. */
  nextQuery(name: string, type?: 'A' | 'AAAA'): Promise<void>;
  close(): Promise<void>;
}

const TYPE_A = 1;
const TYPE_AAAA = 28;
const CLASS_IN = 1;
const RCODE_NOERROR = 0;
const RCODE_SERVFAIL = 2;
const RCODE_NXDOMAIN = 3;
const RCODE_NOTIMP = 4;
const RCODE_REFUSED = 5;

/** One question, as parsed from a query. `question` is its raw bytes, echoed in the reply. */
export interface ParsedQuery {
  readonly id: number;
  readonly rd: boolean;
  readonly opcode: number;
  readonly name: string;
  readonly type: number;
  readonly qclass: number;
  readonly question: Buffer;
}

/** Parses a query with exactly one question; null for anything else (responses, truncated or compressed names). Pure. */
export function parseQuery(buf: Buffer): ParsedQuery | null {
  if (buf.length < 12 + 5) return null;
  const id = buf.readUInt16BE(0);
  const flags = buf.readUInt16BE(2);
  if ((flags & 0x8000) !== 0) return null; // QR set: a response, not a query
  if (buf.readUInt16BE(4) !== 1) return null; // QDCOUNT: one question, as every resolver sends
  const labels: string[] = [];
  let at = 12;
  let nameLength = 0;
  for (;;) {
    if (at >= buf.length) return null;
    const len = buf[at]!;
    at++;
    if (len === 0) break;
    if ((len & 0xc0) !== 0) return null; // a pointer or a reserved label type: queries do not compress
    nameLength += len + 1;
    if (nameLength > 255 || at + len > buf.length) return null;
    labels.push(buf.toString('latin1', at, at + len));
    at += len;
  }
  if (at + 4 > buf.length) return null;
  const type = buf.readUInt16BE(at);
  const qclass = buf.readUInt16BE(at + 2);
  at += 4;
  return {
    id,
    rd: (flags & 0x0100) !== 0,
    opcode: (flags >> 11) & 0x0f,
    name: labels.join('.').toLowerCase(),
    type,
    qclass,
    question: buf.subarray(12, at),
  };
}

/** Builds the reply to `query`: header, the question echoed, then one answer per address. Pure. */
export function encodeReply(query: ParsedQuery, rcode: number, answers: readonly { type: number; ttl: number; address: string }[]): Buffer {
  const header = Buffer.alloc(12);
  header.writeUInt16BE(query.id, 0);
  // QR=1, the query's opcode, AA=1 (authoritative), RD copied, RA=0.
  header.writeUInt16BE(0x8000 | (query.opcode << 11) | 0x0400 | (query.rd ? 0x0100 : 0) | rcode, 2);
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(answers.length, 6);
  const records = answers.map(({ type, ttl, address }) => {
    const rdata = Buffer.from(ipaddr.parse(address).toByteArray());
    const rr = Buffer.alloc(12 + rdata.length);
    rr.writeUInt16BE(0xc00c, 0); // the name: a pointer to the question's name at offset 12
    rr.writeUInt16BE(type, 2);
    rr.writeUInt16BE(CLASS_IN, 4);
    rr.writeUInt32BE(ttl, 6);
    rr.writeUInt16BE(rdata.length, 10);
    rdata.copy(rr, 12);
    return rr;
  });
  return Buffer.concat([header, query.question, ...records]);
}

function typeName(type: number): string {
  return type === TYPE_A ? 'A' : type === TYPE_AAAA ? 'AAAA' : String(type);
}

/** Starts the server on 127.0.0.1, port 0. */
export async function startDnsServer(): Promise<DnsServer> {
  const table = new Map<string, DnsRecords>();
  const modes = new Map<string, DnsMode>(); // keys: '' (every name), 'name', 'name/A', 'name/AAAA'
  const counts = new Map<string, QueryCounts>();
  const waiters = new Map<string, Array<() => void>>(); // keys as for modes, without ''
  const socket = dgram.createSocket('udp4');
  socket.on('error', () => {}); // a send to a vanished client must not crash the test process

  socket.on('message', (msg, rinfo) => {
    const query = parseQuery(msg);
    if (query === null) return;
    if (query.type === TYPE_A || query.type === TYPE_AAAA) {
      const c = counts.get(query.name) ?? { a: 0, aaaa: 0 };
      if (query.type === TYPE_A) c.a++;
      else c.aaaa++;
      counts.set(query.name, c);
    }
    const reply = answer(query);
    const wake = () => {
      for (const key of [query.name, `${query.name}/${typeName(query.type)}`]) {
        const list = waiters.get(key);
        waiters.delete(key);
        for (const w of list ?? []) w();
      }
    };
    if (reply === null) wake();
    else socket.send(reply, rinfo.port, rinfo.address, wake);
  });

  function answer(query: ParsedQuery): Buffer | null {
    const mode = modes.get(`${query.name}/${typeName(query.type)}`) ?? modes.get(query.name) ?? modes.get('') ?? 'answer';
    if (mode === 'drop') return null;
    if (mode === 'servfail') return encodeReply(query, RCODE_SERVFAIL, []);
    if (query.opcode !== 0) return encodeReply(query, RCODE_NOTIMP, []);
    if (query.qclass !== CLASS_IN) return encodeReply(query, RCODE_REFUSED, []);
    const records = table.get(query.name);
    if (records === undefined) return encodeReply(query, RCODE_NXDOMAIN, []);
    if (query.type === TYPE_A) return encodeReply(query, RCODE_NOERROR, records.a.map((address) => ({ type: TYPE_A, ttl: records.ttl, address })));
    if (query.type === TYPE_AAAA) {
      const ttl = records.aaaaTtl ?? records.ttl;
      return encodeReply(query, RCODE_NOERROR, records.aaaa.map((address) => ({ type: TYPE_AAAA, ttl, address })));
    }
    return encodeReply(query, RCODE_NOERROR, []);
  }

  await new Promise<void>((resolve, reject) => {
    socket.once('error', reject);
    socket.bind(0, '127.0.0.1', () => {
      socket.off('error', reject);
      resolve();
    });
  });
  const port = socket.address().port;
  let closed: Promise<void> | null = null;

  return {
    port,
    address: `127.0.0.1:${port}`,
    set(name, records) {
      const key = name.toLowerCase();
      if (records === null) table.delete(key);
      else table.set(key, records);
    },
    mode(mode, name, type) {
      const key = name === undefined ? '' : name.toLowerCase();
      modes.set(type === undefined ? key : `${key}/${type}`, mode);
    },
    queries(name) {
      if (name !== undefined) return { ...(counts.get(name.toLowerCase()) ?? { a: 0, aaaa: 0 }) };
      const total = { a: 0, aaaa: 0 };
      for (const c of counts.values()) {
        total.a += c.a;
        total.aaaa += c.aaaa;
      }
      return total;
    },
    nextQuery(name, type) {
      const key = type === undefined ? name.toLowerCase() : `${name.toLowerCase()}/${type}`;
      return new Promise<void>((resolve) => {
        const list = waiters.get(key) ?? [];
        list.push(resolve);
        waiters.set(key, list);
      });
    },
    close() {
      closed ??= new Promise<void>((resolve) => socket.close(() => resolve()));
      return closed;
    },
  };
}
