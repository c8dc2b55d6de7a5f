// Fair share: once a listener is busy, no client may hold more than an equal part of it, so one
// heavy client cannot starve the others. Below the threshold every client may use any free slot.

export interface FairShareInput {
  /** Connections the listener holds now (with the queue, if the caller counts it in capacity). */
  readonly occupancy: number;
  readonly capacity: number;
  /** Occupancy percentage above which fair share applies; 0 = off. */
  readonly fairShareAbove: number;
  /** Connections the asking client holds now. */
  readonly clientActive: number;
  /**
   * Clients holding at least one connection now: ClientTable.distinctActive as is (it counts the
   * asker when the asker holds a connection).
   */
  readonly distinctClients: number;
}

/**
 * Whether fair share refuses one more connection to this client. Above the threshold each client
 * gets floor(capacity / (distinctClients + 1)), at least 1: the "+ 1" keeps a share free for a
 * client not seen yet, so even a lone hog stops at the threshold and cannot take the last slots
 * from a newcomer. A client already holding its whole share is refused, since one more would take
 * it over. A newcomer (clientActive 0) is never refused.
 */
export function fairShareRefuses(input: FairShareInput): boolean {
  const { occupancy, capacity, fairShareAbove, clientActive, distinctClients } = input;
  if (fairShareAbove <= 0 || clientActive === 0) return false;
  if (occupancy * 100 <= fairShareAbove * capacity) return false;
  const share = Math.max(1, Math.floor(capacity / (Math.max(0, distinctClients) + 1)));
  return clientActive >= share;
}
