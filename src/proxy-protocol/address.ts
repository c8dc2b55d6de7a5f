// IP text <-> bytes for the PROXY protocol. Parsing is strict (the spec forbids leading zeros in
// IPv4 octets because they read as octal elsewhere); formatting matches what Node prints for
// socket.remoteAddress (libuv's inet_ntop), so a PROXY address compares equal to a socket's.

const IPV4_OCTET = /^(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])$/;
const IPV6_GROUP = /^[0-9a-fA-F]{1,4}$/;

/** 4 bytes of a dotted-quad IPv4 (exactly 4 decimal octets 0-255, no leading zeros), or null. */
export function parseIPv4(text: string): Uint8Array | null {
  const octets = text.split('.');
  if (octets.length !== 4) return null;
  const bytes = new Uint8Array(4);
  for (let i = 0; i < 4; i++) {
    const octet = octets[i]!;
    if (!IPV4_OCTET.test(octet)) return null;
    bytes[i] = Number(octet);
  }
  return bytes;
}

/**
 * 16 bytes of an IPv6 text (hex groups, at most one "::", optionally a dotted IPv4 as the last
 * 32 bits), or null. Zone ids ("%eth0") are refused: no PROXY header can carry one.
 */
export function parseIPv6(text: string): Uint8Array | null {
  if (text.length < 2 || text.length > 45) return null;
  const halves = text.split('::');
  if (halves.length > 2) return null;
  const compressed = halves.length === 2;
  const head = parseGroups(halves[0]!, !compressed);
  const tail = compressed ? parseGroups(halves[1]!, true) : [];
  if (head === null || tail === null) return null;
  // "::" stands for at least one zero group.
  if (compressed ? head.length + tail.length > 7 : head.length !== 8) return null;
  const words = [...head, ...new Array<number>(8 - head.length - tail.length).fill(0), ...tail];
  const bytes = new Uint8Array(16);
  words.forEach((word, i) => {
    bytes[i * 2] = word >> 8;
    bytes[i * 2 + 1] = word & 0xff;
  });
  return bytes;
}

function parseGroups(text: string, ipv4AllowedLast: boolean): number[] | null {
  if (text === '') return [];
  const groups = text.split(':');
  const words: number[] = [];
  for (let i = 0; i < groups.length; i++) {
    const group = groups[i]!;
    if (ipv4AllowedLast && i === groups.length - 1 && group.includes('.')) {
      const v4 = parseIPv4(group);
      if (v4 === null) return null;
      words.push((v4[0]! << 8) | v4[1]!, (v4[2]! << 8) | v4[3]!);
    } else {
      if (!IPV6_GROUP.test(group)) return null;
      words.push(parseInt(group, 16));
    }
  }
  return words;
}

export function formatIPv4(bytes: Uint8Array): string {
  return `${bytes[0]}.${bytes[1]}.${bytes[2]}.${bytes[3]}`;
}

/** True for ::ffff:a.b.c.d, which Node reports for IPv4 clients of a dual-stack socket. */
export function isIPv4Mapped(bytes: Uint8Array): boolean {
  for (let i = 0; i < 10; i++) if (bytes[i] !== 0) return false;
  return bytes[10] === 0xff && bytes[11] === 0xff;
}

/**
 * IPv6 as Node prints it: a port of libuv's inet_ntop6 (lower-case hex, the first longest run of
 * two or more zero groups as "::", and the dotted tail for ::ffff:a.b.c.d and ::a.b.c.d).
 */
export function formatIPv6(bytes: Uint8Array): string {
  const words: number[] = [];
  for (let i = 0; i < 8; i++) words.push((bytes[i * 2]! << 8) | bytes[i * 2 + 1]!);

  let bestBase = -1;
  let bestLength = 0;
  let runBase = -1;
  for (let i = 0; i <= 8; i++) {
    if (i < 8 && words[i] === 0) {
      if (runBase === -1) runBase = i;
      continue;
    }
    if (runBase !== -1 && i - runBase > bestLength) {
      bestBase = runBase;
      bestLength = i - runBase;
    }
    runBase = -1;
  }
  if (bestLength < 2) bestBase = -1;

  let text = '';
  for (let i = 0; i < 8; i++) {
    if (bestBase !== -1 && i >= bestBase && i < bestBase + bestLength) {
      if (i === bestBase) text += ':';
      continue;
    }
    if (i !== 0) text += ':';
    const embedsIPv4 =
      i === 6 &&
      bestBase === 0 &&
      (bestLength === 6 || (bestLength === 7 && words[7] !== 1) || (bestLength === 5 && words[5] === 0xffff));
    if (embedsIPv4) return text + formatIPv4(bytes.subarray(12, 16));
    text += words[i]!.toString(16);
  }
  if (bestBase !== -1 && bestBase + bestLength === 8) text += ':';
  return text;
}
