/**
 * The controller's SDN layer: where a container's traffic goes. One interface, two backends:
 * `ovs` (agents program their own OVS bridges; the default) and `onos` (ONOS intents over REST,
 * as MIRA! did). The migration pipeline calls {@link Sdn.switchPath} inside the downtime window,
 * before the restore, and {@link Sdn.revert} from that step's compensation.
 */

/** A container's place on the overlay: which host holds it and on which OpenFlow port. */
export interface Placement {
  container: string;
  /** Overlay IPv4 address, without prefix: "10.77.0.10". */
  ip: string;
  /** The container's MAC, kept across migrations: "02:00:0a:4d:00:0a". */
  mac: string;
  /** Ferry host name that holds the container. */
  host: string;
  /** OpenFlow port of the container's veth on that host's bridge (CreateNetnsResponse.ofport). */
  ofport?: number;
  /**
   * Id of the operation (e.g. the CreateContainer request id): agent calls carry
   * `${opId}/sdn-<action>/<host>` as operation key, so a retry is answered from the agent's record.
   */
  opId: string;
}

/** Where a container's traffic must go after a migration. */
export interface PathSwitch {
  container: string;
  ip: string;
  mac: string;
  from: { host: string; ofport?: number };
  to: { host: string; ofport?: number };
  migrationId: string;
}

/** How long a path change took, with a per-phase breakdown for the migration record. */
export interface SdnResult {
  durationMs: number;
  /** e.g. { dest_ms, rest_ms } (ovs) or { withdraw_ms, submit_ms, installed_ms } (onos). */
  details: Record<string, number>;
}

/**
 * Programs the network for containers. Every method is idempotent: calling it twice, or after a
 * half-done earlier call, leaves the same state.
 */
export interface Sdn {
  readonly name: "ovs" | "onos";
  /** Once at controller start-up (ONOS: check the app id, optionally turn reactive forwarding off). */
  init(signal: AbortSignal): Promise<void>;
  /** A new container: make its IP reachable at `p.host` from everywhere. */
  install(p: Placement, signal: AbortSignal): Promise<SdnResult>;
  /** After (or during) a migration: traffic for the container now goes to `p.to`. */
  switchPath(p: PathSwitch, signal: AbortSignal): Promise<SdnResult>;
  /** Undo {@link switchPath}: traffic goes back to `p.from`. Safe when switchPath never ran or half-ran. */
  revert(p: PathSwitch, signal: AbortSignal): Promise<void>;
  /** The container is deleted: remove everything installed for it. */
  remove(p: Placement, signal: AbortSignal): Promise<void>;
}
