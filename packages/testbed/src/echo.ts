/**
 * What deploy/testkit's ferry-echo-client prints when it ends: every byte it sent, checked
 * against the echo (which depends on the server's in-memory state), and every pause it saw.
 */
export interface EchoReport {
  /** The server's connection count when this one was accepted: 1 means no reconnect. */
  serial: number;
  totalAtConnect: number;
  sent: number;
  checked: number;
  /** Bytes that came back wrong (lost, duplicated or from a server that lost its state). */
  errors: number;
  firstErrorAt: number;
  maxGapMs: number;
  closed: boolean;
  durationMs: number;
  /** Every pause between two received chunks longer than --gap-ms while echo was due. */
  gaps: { atMs: number; ms: number }[];
}
