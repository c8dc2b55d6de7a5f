// Shapes and constants of the PROXY protocol (haproxy doc/proxy-protocol.txt), shared by the
// pure parser and the writer.

/** Which header versions a listener accepts. A header of the other version is an error. */
export type ProxyVersionAccept = 'v1' | 'v2' | 'any';

/** One v2 Type-Length-Value entry, value copied out of the received buffer. */
export interface ProxyTlv {
  readonly type: number;
  readonly value: Buffer;
}

/** An endpoint as Node prints it: IPv4 dotted, IPv6 compressed lower-case; for unix, the path and port 0. */
export interface ProxyAddress {
  readonly address: string;
  readonly port: number;
}

export interface ProxyHeader {
  readonly version: 1 | 2;
  /** 'local' = health check / LOCAL command; 'unknown' = v1 UNKNOWN or v2 UNSPEC family/transport: keep the socket's own address. */
  readonly command: 'proxy' | 'local' | 'unknown';
  /** null unless command is 'proxy'. */
  readonly family: 'tcp4' | 'tcp6' | 'unix' | null;
  /** null unless command is 'proxy' (for unix: address = path, port 0). */
  readonly source: ProxyAddress | null;
  readonly destination: ProxyAddress | null;
  /** v2 only, in received order (CRC32C and NOOP included); [] for v1. */
  readonly tlvs: readonly ProxyTlv[];
  /** PP2_TYPE_AUTHORITY as UTF-8 (the first one if repeated). */
  readonly authority: string | null;
  /** PP2_TYPE_ALPN as UTF-8 (the first one if repeated). */
  readonly alpn: string | null;
  /** PP2_TYPE_UNIQUE_ID (the first one if repeated). */
  readonly uniqueId: Buffer | null;
}

export type ProxyParseResult =
  | { readonly kind: 'need-more' }
  | { readonly kind: 'header'; readonly header: ProxyHeader; readonly consumed: number }
  /** The bytes cannot be the start of any PROXY signature: they are payload. */
  | { readonly kind: 'not-proxy' }
  | { readonly kind: 'malformed'; readonly why: string };

/** What a writer needs: the client's endpoints as Node reports them (IPv4, IPv6 or IPv4-mapped IPv6). */
export interface ProxyHeaderFields {
  readonly source: { address: string; port: number };
  readonly destination: { address: string; port: number };
  /** v2 only: e.g. AUTHORITY, UNIQUE_ID, pass-through ones. A CRC32C entry here is dropped (see write.ts). */
  readonly tlvs?: readonly ProxyTlv[];
}

/** v2 TLV types (section 2.2). 0xE0-0xEF are for custom use, 0xF0-0xF7 experimental. */
export const PP2_TYPE = {
  ALPN: 0x01,
  AUTHORITY: 0x02,
  CRC32C: 0x03,
  NOOP: 0x04,
  UNIQUE_ID: 0x05,
  SSL: 0x20,
  NETNS: 0x30,
} as const;

/** Sub-TLV types found inside a PP2_TYPE_SSL value. */
export const PP2_SUBTYPE_SSL = {
  VERSION: 0x21,
  CN: 0x22,
  CIPHER: 0x23,
  SIG_ALG: 0x24,
  KEY_ALG: 0x25,
} as const;

/** "PROXY " : every v1 line starts with it. */
export const V1_PREFIX: Buffer = Buffer.from('PROXY ', 'latin1');

/** Longest v1 line the spec allows, CRLF included ("PROXY UNKNOWN" + two full IPv6 + ports). */
export const V1_MAX_LENGTH = 107;

/** \r\n\r\n\0\r\nQUIT\n : the 12-byte v2 signature. */
export const V2_SIGNATURE: Buffer = Buffer.from([
  0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
]);

/** Signature, version/command, family/transport, 2-byte length. */
export const V2_FIXED_LENGTH = 16;

/** Address block sizes per family: INET 4+4+2+2, INET6 16+16+2+2, UNIX 108+108. */
export const V2_ADDRESS_LENGTH = { inet: 12, inet6: 36, unix: 216 } as const;

/** Longest PP2_TYPE_UNIQUE_ID value the spec allows. */
export const V2_UNIQUE_ID_MAX_LENGTH = 128;
