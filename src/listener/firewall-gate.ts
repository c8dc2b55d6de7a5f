// The firewall at the cheapest point Node offers: net.Server's `blockList` is asked for each
// accepted connection before any net.Socket exists, and a blocked one is closed there (no
// socket object, no handlers, no stream state). This gate answers that question with the
// listener's compiled firewalls and counts the refusal, so the metrics and the rejection log see
// it as they see every other `firewall` refusal.
//
// Node closes a blocked connection with a FIN, and a FIN leaves the connection in TIME_WAIT on
// our side, which a flood would multiply; a RST does not. So the gate is used only by listeners
// with `reject = "close"`; with `reject = "reset"` (the default) the firewall refuses in accept(),
// one RST per connection, as before.
import net from 'node:net';

export interface GateOwner {
  /** True when this address is refused by the firewall at accept (and counts it). */
  refusesAtGate(address: string): boolean;
}

export class FirewallGate extends net.BlockList {
  constructor(private readonly owner: GateOwner) {
    super();
  }

  /** Called by net.Server for each accepted connection: true closes it before a socket exists. */
  override check(address: string | net.SocketAddress, _family?: string): boolean {
    return typeof address === 'string' && this.owner.refusesAtGate(address);
  }
}
