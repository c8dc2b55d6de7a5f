// Pure TLS ClientHello parser: given every byte a client has sent so far, say whether it is a
// complete ClientHello (and its SNI and ALPN), a prefix of one, not TLS at all, or broken.
// No I/O, no state: the caller owns the socket, the deadline and the buffer.
//
// Specs: RFC 8446 §5.1 (records), §4 (handshake header), §4.1.2 (ClientHello), §4.2 (extensions);
// RFC 6066 §3 (server_name); RFC 7301 §3.1 (ALPN). TLS 1.0-1.2 hellos have the same shape.
//
// Every field is read through a Cursor whose reads are bounds-checked and return null at the end of
// its view, so no input can make this module index past `buf` or throw.

/** The most bytes the caller should ever buffer while waiting for a ClientHello. */
export const MAX_HELLO_BYTES = 16384;

export type HelloResult =
  | { readonly kind: 'need-more' }
  | { readonly kind: 'tls'; readonly sni: string | null; readonly alpn: readonly string[] }
  | { readonly kind: 'not-tls' }
  | { readonly kind: 'malformed'; readonly why: string };

type Malformed = Extract<HelloResult, { kind: 'malformed' }>;
type Parsed<T> = { readonly kind: 'ok'; readonly value: T } | Malformed;

const CONTENT_TYPE_HANDSHAKE = 0x16;
const HANDSHAKE_TYPE_CLIENT_HELLO = 1;
const RECORD_HEADER_BYTES = 5;
const HANDSHAKE_HEADER_BYTES = 4;
// RFC 8446 §5.2: no record, even a protected one, exceeds 2^14 + 256 bytes.
const MAX_RECORD_BYTES = 16384 + 256;
// A handshake message that cannot fit, with one record header and its own header, in the first
// MAX_HELLO_BYTES of the stream will be refused at the cap anyway; saying so at once is the same
// verdict, earlier.
const MAX_MESSAGE_BYTES = MAX_HELLO_BYTES - RECORD_HEADER_BYTES - HANDSHAKE_HEADER_BYTES;
const RANDOM_BYTES = 32;
const MAX_SESSION_ID_BYTES = 32;
const EXTENSION_SERVER_NAME = 0;
const EXTENSION_ALPN = 16;
const NAME_TYPE_HOST_NAME = 0;
const MAX_DNS_NAME_CHARS = 253;
const MAX_DNS_LABEL_CHARS = 63;

const NEED_MORE: HelloResult = Object.freeze({ kind: 'need-more' });
const NOT_TLS: HelloResult = Object.freeze({ kind: 'not-tls' });

function malformed(why: string): Malformed {
  return { kind: 'malformed', why };
}

function ok<T>(value: T): Parsed<T> {
  return { kind: 'ok', value };
}

/** Big-endian reads over one view; a read that would pass the end returns null and moves nothing. */
class Cursor {
  #offset = 0;
  readonly #view: Buffer;

  constructor(view: Buffer) {
    this.#view = view;
  }

  get remaining(): number {
    return this.#view.length - this.#offset;
  }

  u8(): number | null {
    if (this.remaining < 1) return null;
    const value = this.#view.readUInt8(this.#offset);
    this.#offset += 1;
    return value;
  }

  u16(): number | null {
    if (this.remaining < 2) return null;
    const value = this.#view.readUInt16BE(this.#offset);
    this.#offset += 2;
    return value;
  }

  bytes(count: number): Buffer | null {
    if (this.remaining < count) return null;
    const value = this.#view.subarray(this.#offset, this.#offset + count);
    this.#offset += count;
    return value;
  }

  /** As many of the next `count` bytes as the view holds. */
  upTo(count: number): Buffer {
    return this.bytes(Math.min(count, this.remaining)) ?? Buffer.alloc(0);
  }

  /** opaque x<0..2^8-1>: a 1-byte length, then that many bytes. */
  vector8(): Buffer | null {
    const length = this.u8();
    return length === null ? null : this.bytes(length);
  }

  /** opaque x<0..2^16-1>: a 2-byte length, then that many bytes. */
  vector16(): Buffer | null {
    const length = this.u16();
    return length === null ? null : this.bytes(length);
  }
}

/**
 * Pure: bytes in, verdict out. Never throws, never reads past buf.
 * `buf` is everything the client has sent so far; only its first MAX_HELLO_BYTES are looked at,
 * and if those hold no complete ClientHello the verdict is malformed, never need-more.
 * A connection that reads in steps uses a ClientHelloReader instead, so each byte is walked once.
 */
export function parseClientHello(buf: Buffer): HelloResult {
  return new ClientHelloReader().read(buf);
}

/**
 * The same verdicts as parseClientHello, for a stream that arrives in pieces: each call passes
 * everything received so far (the previous call's bytes plus more), and only the records that
 * completed since the last call are walked. A hello sent as 1-byte records (up to ~2,700 in
 * MAX_HELLO_BYTES) then costs work linear in its bytes, not quadratic (issue 13, defect 4).
 * No I/O; the caller owns the socket, the deadline and the buffer.
 */
export class ClientHelloReader {
  /** Stream offset of the first record not yet consumed (its header included). */
  #offset = 0;
  /** Fragments of the complete records consumed so far, in order, and their total length. */
  readonly #fragments: Buffer[] = [];
  #collected = 0;
  #messageLength: number | null = null;
  #verdict: HelloResult | null = null;
  #recordHeadersRead = 0;

  /** Record headers examined so far, re-reads of an incomplete last record included (tests). */
  get recordHeadersRead(): number {
    return this.#recordHeadersRead;
  }

  read(buf: Buffer): HelloResult {
    if (this.#verdict !== null) return this.#verdict;
    // Last-resort net: the parser is written so nothing in it can throw; if a bug ever made it,
    // one connection is refused instead of the daemon dying. The fuzz test asserts it is never hit.
    try {
      const capped = buf.length > MAX_HELLO_BYTES ? buf.subarray(0, MAX_HELLO_BYTES) : buf;
      let verdict = this.#readRecords(capped);
      if (verdict.kind === 'need-more' && buf.length >= MAX_HELLO_BYTES) {
        verdict = malformed(`no complete ClientHello in the first ${MAX_HELLO_BYTES} bytes`);
      }
      if (verdict.kind !== 'need-more') this.#verdict = verdict;
      return verdict;
    } catch (error) {
      return (this.#verdict = malformed(`parser bug: ${String(error)}`));
    }
  }

  /**
   * Walks TLS records from where the last call stopped and reassembles the first handshake
   * message from their fragments (RFC 8446 §5.1 lets it span records). Every decision depends
   * only on bytes before the point it is made, so a verdict other than need-more never changes as
   * more bytes arrive: segmentation cannot change the answer.
   */
  #readRecords(stream: Buffer): HelloResult {
    for (;;) {
      const first = this.#offset === 0;
      const records = new Cursor(stream.subarray(this.#offset));
      this.#recordHeadersRead++;
      const contentType = records.u8();
      if (contentType === null) return NEED_MORE;
      if (contentType !== CONTENT_TYPE_HANDSHAKE) {
        // An SSLv2 hello (high bit set), HTTP, SSH... all fail here on the first byte.
        return first ? NOT_TLS : malformed(`record of content type ${contentType} inside the ClientHello`);
      }
      const major = records.u8();
      if (major === null) return NEED_MORE;
      if (major !== 3) {
        return first ? NOT_TLS : malformed(`record version major ${major} inside the ClientHello`);
      }
      // The minor version is not checked: clients send 0x0301 for compatibility (RFC 8446 §5.1).
      const minor = records.u8();
      const recordLength = minor === null ? null : records.u16();
      if (recordLength === null) return NEED_MORE;
      // RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent.
      if (recordLength === 0) return malformed('zero-length handshake record');
      if (recordLength > MAX_RECORD_BYTES) return malformed(`record of ${recordLength} bytes`);

      const fragment = records.upTo(recordLength);
      const complete = fragment.length === recordLength;
      // An incomplete last record is looked at but not consumed: the next call reads it again,
      // whole or longer. Its header is 5 bytes, so that re-read costs O(1).
      const collected = this.#collected + fragment.length;
      let messageLength = this.#messageLength;
      if (messageLength === null) {
        // The 4-byte handshake header may itself be split across records.
        const header = new Cursor(firstBytes([...this.#fragments, fragment], HANDSHAKE_HEADER_BYTES));
        const handshakeType = header.u8();
        if (handshakeType !== null && handshakeType !== HANDSHAKE_TYPE_CLIENT_HELLO) {
          return malformed(`handshake type ${handshakeType}, expected client_hello (1)`);
        }
        const lengthHigh = header.u8();
        const lengthLow = header.u16();
        if (lengthHigh !== null && lengthLow !== null) {
          messageLength = lengthHigh * 0x10000 + lengthLow;
          if (messageLength > MAX_MESSAGE_BYTES) {
            return malformed(`ClientHello of ${messageLength} bytes cannot fit in ${MAX_HELLO_BYTES} bytes`);
          }
        }
      }

      if (messageLength !== null && collected >= HANDSHAKE_HEADER_BYTES + messageLength) {
        // Anything after the message (more records, early data) is not ours to judge. A message
        // in one record (the usual case) is parsed in place, without a copy.
        const fragments = [...this.#fragments, fragment];
        const message = fragments.length === 1 ? fragment : Buffer.concat(fragments, collected);
        return parseClientHelloBody(message.subarray(HANDSHAKE_HEADER_BYTES, HANDSHAKE_HEADER_BYTES + messageLength));
      }
      if (!complete) return NEED_MORE;
      this.#fragments.push(fragment);
      this.#collected = collected;
      this.#messageLength = messageLength;
      this.#offset += RECORD_HEADER_BYTES + recordLength;
    }
  }
}

/** The first `count` bytes of a list of buffers (fewer if they hold fewer). */
function firstBytes(buffers: readonly Buffer[], count: number): Buffer {
  const out: Buffer[] = [];
  let have = 0;
  for (const b of buffers) {
    if (have >= count) break;
    const part = b.subarray(0, count - have);
    out.push(part);
    have += part.length;
  }
  return Buffer.concat(out, have);
}

/** RFC 8446 §4.1.2: the ClientHello body, once the whole message is in hand. */
function parseClientHelloBody(body: Buffer): HelloResult {
  const hello = new Cursor(body);
  if (hello.bytes(2 + RANDOM_BYTES) === null) {
    return malformed('ClientHello ends inside legacy_version or random');
  }

  const sessionIdLength = hello.u8();
  if (sessionIdLength === null) return malformed('ClientHello ends before session_id');
  if (sessionIdLength > MAX_SESSION_ID_BYTES) {
    return malformed(`session_id of ${sessionIdLength} bytes, at most ${MAX_SESSION_ID_BYTES}`);
  }
  if (hello.bytes(sessionIdLength) === null) return malformed('session_id overruns the ClientHello');

  const cipherSuitesLength = hello.u16();
  if (cipherSuitesLength === null) return malformed('ClientHello ends before cipher_suites');
  if (cipherSuitesLength < 2 || cipherSuitesLength % 2 !== 0) {
    return malformed(`cipher_suites of ${cipherSuitesLength} bytes, must be even and at least 2`);
  }
  if (hello.bytes(cipherSuitesLength) === null) {
    return malformed('cipher_suites overrun the ClientHello');
  }

  const compressionMethods = hello.vector8();
  if (compressionMethods === null) return malformed('compression_methods overrun the ClientHello');
  if (compressionMethods.length < 1) return malformed('no compression_methods');

  // Pre-TLS-1.2 clients may end the message here: no extensions at all.
  if (hello.remaining === 0) return { kind: 'tls', sni: null, alpn: [] };

  const extensionsLength = hello.u16();
  if (extensionsLength === null) return malformed('ClientHello ends inside the extensions length');
  if (extensionsLength !== hello.remaining) {
    return malformed(`extensions length ${extensionsLength}, but ${hello.remaining} bytes follow`);
  }

  const seen = new Set<number>();
  let sni: string | null = null;
  let alpn: readonly string[] = [];
  while (hello.remaining > 0) {
    const type = hello.u16();
    const data = type === null ? null : hello.vector16();
    if (type === null || data === null) return malformed('extension overruns the extensions block');
    // RFC 8446 §4.2: "There MUST NOT be more than one extension of the same type".
    if (seen.has(type)) return malformed(`extension ${type} appears twice`);
    seen.add(type);

    if (type === EXTENSION_SERVER_NAME) {
      const serverName = parseServerName(data);
      if (serverName.kind === 'malformed') return serverName;
      sni = serverName.value;
    } else if (type === EXTENSION_ALPN) {
      const protocols = parseAlpn(data);
      if (protocols.kind === 'malformed') return protocols;
      alpn = protocols.value;
    }
  }
  return { kind: 'tls', sni, alpn };
}

/**
 * RFC 6066 §3: ServerNameList server_name_list<1..2^16-1>, each entry a name_type byte and, for
 * the only type ever defined (host_name), HostName<1..2^16-1>. Other types are read with the same
 * shape and skipped. Returns the first host_name, normalised, or null if there is none.
 */
function parseServerName(data: Buffer): Parsed<string | null> {
  const extension = new Cursor(data);
  const list = extension.vector16();
  if (list === null || extension.remaining !== 0) {
    return malformed('server_name list length does not match the extension');
  }
  if (list.length === 0) return malformed('empty server_name list');

  const entries = new Cursor(list);
  let hostName: string | null = null;
  while (entries.remaining > 0) {
    const nameType = entries.u8();
    const name = nameType === null ? null : entries.vector16();
    if (nameType === null || name === null) return malformed('server_name entry overruns the list');
    if (nameType === NAME_TYPE_HOST_NAME && hostName === null) {
      const normalised = normaliseHostName(name);
      if (normalised.kind === 'malformed') return normalised;
      hostName = normalised.value;
    }
  }
  return ok(hostName);
}

/** Letters, digits, '-', '.', and '_' (seen in real service names though not in RFC 1123). */
function isHostNameByte(byte: number): boolean {
  return (
    (byte >= 0x61 && byte <= 0x7a) || // a-z
    (byte >= 0x41 && byte <= 0x5a) || // A-Z
    (byte >= 0x30 && byte <= 0x39) || // 0-9
    byte === 0x2d || // -
    byte === 0x2e || // .
    byte === 0x5f // _
  );
}

/**
 * Lower-cases the name and strips one trailing dot (RFC 6066 says none is sent, some clients
 * send one anyway), then insists on a plausible DNS name: routes are matched on this string, so
 * anything else is refused rather than guessed at.
 */
function normaliseHostName(raw: Buffer): Parsed<string> {
  if (raw.length === 0 || raw.length > MAX_DNS_NAME_CHARS + 1) {
    return malformed(`host_name of ${raw.length} bytes`);
  }
  for (const byte of raw) {
    if (!isHostNameByte(byte)) return malformed(`host_name contains byte 0x${byte.toString(16)}`);
  }
  let name = raw.toString('latin1').toLowerCase();
  if (name.endsWith('.')) name = name.slice(0, -1);
  if (name.length === 0 || name.length > MAX_DNS_NAME_CHARS) {
    return malformed(`host_name of ${name.length} characters`);
  }
  for (const label of name.split('.')) {
    if (label.length === 0) return malformed('host_name has an empty label');
    if (label.length > MAX_DNS_LABEL_CHARS) return malformed(`host_name label of ${label.length} characters`);
  }
  return ok(name);
}

/** RFC 7301 §3.1: ProtocolName protocol_name_list<2..2^16-1>, each ProtocolName<1..2^8-1>. */
function parseAlpn(data: Buffer): Parsed<readonly string[]> {
  const extension = new Cursor(data);
  const list = extension.vector16();
  if (list === null || extension.remaining !== 0) {
    return malformed('ALPN list length does not match the extension');
  }
  if (list.length === 0) return malformed('empty ALPN list');

  const entries = new Cursor(list);
  const protocols: string[] = [];
  while (entries.remaining > 0) {
    const protocol = entries.vector8();
    if (protocol === null) return malformed('ALPN protocol name overruns the list');
    if (protocol.length === 0) return malformed('empty ALPN protocol name');
    protocols.push(protocol.toString('latin1'));
  }
  return ok(protocols);
}
