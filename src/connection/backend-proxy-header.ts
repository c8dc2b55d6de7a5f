// The PROXY header a route sends to its backend before any client byte.
import { PP2_TYPE, type ProxyTlv } from '../proxy-protocol/parse.ts';
import { writeProxyHeaderV1, writeProxyHeaderV2 } from '../proxy-protocol/write.ts';
import type { Connection } from './connection.ts';

/** Null when the route sends none. Carries the real client (as received via PROXY, if any). */
export function buildBackendProxyHeader(conn: Connection): Buffer | null {
  const version = conn.route?.config.sendProxyProtocol ?? null;
  if (version === null) return null;
  const received = conn.proxyHeader;
  // The original destination: what the balancer saw when there is one, else what the client dialled.
  const destination =
    received?.command === 'proxy' && received.destination !== null && received.family !== 'unix'
      ? received.destination
      : { address: conn.localAddress, port: conn.localPort };
  const fields = { source: { address: conn.clientAddress, port: conn.clientPort }, destination };
  if (version === 'v1') return writeProxyHeaderV1(fields);
  const tlvs: ProxyTlv[] = [];
  if (conn.sni !== null) tlvs.push({ type: PP2_TYPE.AUTHORITY, value: Buffer.from(conn.sni, 'latin1') });
  // The same id as in our logs, so a chain of proxies can be joined line by line.
  tlvs.push({ type: PP2_TYPE.UNIQUE_ID, value: Buffer.from(conn.uniqueId, 'latin1') });
  const passThrough = conn.route!.config.passThroughTlvs;
  if (received !== null && passThrough.length > 0) {
    for (const tlv of received.tlvs) if (passThrough.includes(tlv.type)) tlvs.push(tlv);
  }
  return writeProxyHeaderV2({ ...fields, tlvs });
}
