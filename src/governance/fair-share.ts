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
   * Clients holding at least one connection now: ClientTable.distinctActive as is. It already
   * counts the asker if the asker holds a connection; a newcomer is never refused, so it needs no
   * place in the count.
   */
  readonly distinctClients: number;
}

/**
 * Whether fair share refuses one more connection to this client. Above the threshold each client
 * gets floor(capacity / distinctClients), at least 1; a client already holding its whole share is
 * refused, since one more would take it over. A newcomer (clientActive 0) is never refused: its
 * share would be at least 1 whether or not it were counted among the clients.
 */
export function fairShareRefuses(input: FairShareInput): boolean {
  const { occupancy, capacity, fairShareAbove, clientActive, distinctClients } = input;
  if (fairShareAbove <= 0 || clientActive === 0) return false;
  if (occupancy * 100 <= fairShareAbove * capacity) return false;
  const share = Math.max(1, Math.floor(capacity / Math.max(1, distinctClients)));
  return clientActive >= share;
}
