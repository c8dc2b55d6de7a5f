// The closed vocabulary of why a connection ended or was refused. Logs, metric labels and tests
// all use these strings; never match on error message text.

/** Refusals: the client was turned away before being relayed. Counted per listener and reason. */
export const REJECT_REASONS = [
  'firewall', // global or listener firewall, at accept
  'ip_limit', // max_connections_per_ip
  'ip_rate', // connection_rate_per_ip
  'ip_table_full', // max_tracked_ips reached and no idle entry to evict
  'fair_share', // listener near capacity and this client holds more than its share
  'cluster_ip_limit', // [cluster]: max_connections_per_ip reached over every instance together
  'cluster_ip_rate', // [cluster]: connection_rate_per_ip reached over every instance together
  'cluster_unavailable', // [cluster]: the store failed and on_store_failure = "closed"
  'queue_full', // every worker busy and the queue full
  'queue_timeout', // waited in the queue past queue_timeout
  'route_firewall', // the route's firewall, after SNI
  'route_limit', // the route's max_connections, after SNI
  'no_route', // no SNI match and no default route
  'client_hello_timeout', // routing bytes (or PROXY header) not complete within timeouts.client_hello
  'client_hello_malformed', // looked like TLS but the ClientHello could not be parsed
  'proxy_untrusted', // a PROXY header from an address not in proxy_protocol.trusted
  'proxy_header_invalid', // malformed, missing (require = true) or of a version not accepted
  'draining', // arrived while the listener was being removed or the daemon stopping
] as const;
export type RejectReason = (typeof REJECT_REASONS)[number];

/** Endings of a connection that was admitted (or at least began to be). */
export const END_REASONS = [
  'done', // both sides finished normally
  'client_reset', // client sent RST or its socket errored
  'backend_reset', // backend sent RST or its socket errored while relaying
  'client_gone', // client left before the relay began
  'backend_unavailable', // every backend of the route failed to connect (or none is left to try)
  'backend_full', // every backend it could use is at its max_connections
  'no_healthy_backend', // every backend of the route is down and on_all_down = "refuse"
  'maintenance', // its backend was put into maintenance through the admin API (after shutdown.drain_timeout)
  'idle_timeout',
  'half_close_timeout',
  'max_lifetime',
  'shutdown', // daemon stopped and the drain deadline passed
  'removed', // its route or listener was removed by a reload (on_removal = "drain" / "close")
] as const;
export type EndReason = (typeof END_REASONS)[number];

export type CloseReason = RejectReason | EndReason;

const rejectSet: ReadonlySet<string> = new Set(REJECT_REASONS);

/** True when the reason is a refusal (counted as a rejection) rather than an ending. */
export function isRejection(reason: CloseReason): reason is RejectReason {
  return rejectSet.has(reason);
}
