import { isIPv4 } from "node:net";
import type { Flow } from "@ferry/api/agent";
import { FerryError, validateName } from "@ferry/common";
import type { PathSwitch, Placement, Sdn, SdnResult } from "./types.js";

/*
 * Backend "ovs": no SDN controller; the controller asks every host's agent to program its own
 * bridge (AgentService.SetFlows / DeleteFlows). The flow design, shared with the testbed
 * (packages/testbed/src/flows.ts) so that both program the same rules for the same endpoint:
 *
 *   bridge fail_mode=secure (a packet no rule matches is dropped); per container ONE cookie,
 *   derived from its overlay IP (stable across migrations: the IP and MAC move with it):
 *       cookie = 0xfe_0000_0000 + <ip as 32-bit integer>        (< 2^40, far below 2^53)
 *   and two rules in table 0, priority 100, on EVERY host:
 *       on the host that holds it:  ip,nw_dst=<ip>    actions=output:<container's ofport>
 *                                   arp,arp_tpa=<ip>  actions=output:<container's ofport>
 *       on every other host:        ip,nw_dst=<ip>    actions=output:<VXLAN port to the holder>
 *                                   arp,arp_tpa=<ip>  actions=output:<VXLAN port to the holder>
 *
 *   SetFlows replaces every rule of a cookie atomically (one OpenFlow bundle on the agent), so
 *   moving a container = one SetFlows per host with the new output port; no delete is needed.
 *   ARP is routed by target address like IP, so broadcasts never flood the VXLAN mesh.
 *
 * Path switch order: the DESTINATION first (it must deliver locally before anyone sends to it),
 * then every other host, the source included, in parallel. No loop can form: once the destination
 * delivers locally, a host points either at the source (which delivers to its own port, or, once
 * changed, forwards to the destination) or at the destination, so a packet crosses at most two
 * tunnels (and OpenFlow drops output to in_port). The switch runs inside the downtime, after the
 * checkpoint: the source's copy is frozen, so nothing there is waiting to be delivered, and a
 * third round for the source alone would only lengthen the path switch. Revert is the mirror image
 * (the source first, then everyone else).
 */

/** One Ferry host's bridge as the ovs backend needs it. */
export interface OvsTopologyHost {
  name: string;
  /** The overlay bridge on that host, e.g. "br-ferry". */
  bridge: string;
  /** OpenFlow port number of the VXLAN port towards each other host, by host name. */
  vxlanPortTo: Record<string, number>;
}

export interface OvsTopology {
  hosts: OvsTopologyHost[];
}

/**
 * What the ovs backend needs from the rest of the controller: the agents' SetFlows/DeleteFlows and
 * the overlay's shape. {@link agentFlowPort} builds one over agent clients; tests pass fakes.
 */
export interface OvsFlowPort {
  /** AgentService.SetFlows on `host`: replaces every rule with the same cookie on `bridge`. */
  setFlows(host: string, bridge: string, flows: Flow[], opKey: string, signal?: AbortSignal): Promise<void>;
  /** AgentService.DeleteFlows on `host`: removes every rule with `cookie` (none is fine). */
  deleteFlows(host: string, bridge: string, cookie: number, opKey: string, signal?: AbortSignal): Promise<void>;
  topology(): OvsTopology | Promise<OvsTopology>;
}

/** The slice of an agent client (PromiseClient<AgentService>) that {@link agentFlowPort} calls. */
export interface AgentFlowClient {
  setFlows(req: { operationKey: string; bridge: string; flows: Flow[] }, opts?: { signal?: AbortSignal }): Promise<unknown>;
  deleteFlows(req: { operationKey: string; bridge: string; cookie: number }, opts?: { signal?: AbortSignal }): Promise<unknown>;
}

/** An {@link OvsFlowPort} over the controller's agent clients (e.g. `name => registry.get(name).client`). */
export function agentFlowPort(
  clientOf: (host: string) => AgentFlowClient,
  topology: () => OvsTopology | Promise<OvsTopology>,
): OvsFlowPort {
  return {
    async setFlows(host, bridge, flows, operationKey, signal) {
      await clientOf(host).setFlows({ operationKey, bridge, flows }, signal ? { signal } : {});
    },
    async deleteFlows(host, bridge, cookie, operationKey, signal) {
      await clientOf(host).deleteFlows({ operationKey, bridge, cookie }, signal ? { signal } : {});
    },
    topology,
  };
}

export const OVS_FLOW_PRIORITY = 100;
const COOKIE_BASE = 0xfe_0000_0000;

function ipToInt(field: string, ip: string): number {
  if (!isIPv4(ip))
    throw FerryError.invalid(field, `"${ip}" is not an IPv4 address`, 'give the overlay address without prefix, e.g. "10.77.0.10"');
  return ip.split(".").reduce((n, o) => n * 256 + Number(o), 0);
}

/**
 * The cookie of a container's rules: 0xfe_<ip as 32 bits>. Stable across migrations, never 0
 * (the agent refuses cookie 0), and below 2^53 so generated code (forceLong=number) carries it exactly.
 */
export function cookieForIp(ip: string): number {
  return COOKIE_BASE + ipToInt("ip", ip);
}

/** The rules for `ip` on one host: out of `outPort` (the container's ofport or a VXLAN port). */
export function containerFlows(ip: string, outPort: number): Flow[] {
  const cookie = cookieForIp(ip);
  return [
    { table: 0, priority: OVS_FLOW_PRIORITY, cookie, match: `ip,nw_dst=${ip}`, actions: `output:${outPort}` },
    { table: 0, priority: OVS_FLOW_PRIORITY, cookie, match: `arp,arp_tpa=${ip}`, actions: `output:${outPort}` },
  ];
}

/** Host name → its flows, when the container is held by `holder` on port `ofport`. */
export function flowsByHost(topo: OvsTopology, ip: string, holder: string, ofport: number): Map<string, Flow[]> {
  const out = new Map<string, Flow[]>();
  for (const h of topo.hosts) {
    if (h.name === holder) {
      out.set(h.name, containerFlows(ip, ofport));
      continue;
    }
    const vx = h.vxlanPortTo[holder];
    if (vx === undefined || !Number.isInteger(vx) || vx <= 0) {
      throw new FerryError("FailedPrecondition", `host "${h.name}" has no VXLAN port towards "${holder}"`, {
        field: "topology",
        fix: `add the VXLAN tunnel ${h.name} -> ${holder} (AddVxlanPort) before placing containers on "${holder}"`,
      });
    }
    out.set(h.name, containerFlows(ip, vx));
  }
  return out;
}

function requireOfport(field: string, ofport: number | undefined): number {
  if (ofport === undefined || !Number.isInteger(ofport) || ofport < 1 || ofport > 0xfeff) {
    throw FerryError.invalid(
      field,
      `ofport ${String(ofport)} is missing or out of range`,
      "pass the container veth's OpenFlow port (CreateNetnsResponse.ofport), 1-65279",
    );
  }
  return ofport;
}

/** The default backend: agents program their own bridges. See the design comment at the top. */
export class OvsSdn implements Sdn {
  readonly name = "ovs" as const;

  constructor(private readonly port: OvsFlowPort) {}

  async init(): Promise<void> {}

  async install(p: Placement, signal: AbortSignal): Promise<SdnResult> {
    validateName("container", p.container);
    const ofport = requireOfport("ofport", p.ofport);
    const topo = await this.topology([p.host]);
    const byHost = flowsByHost(topo, p.ip, p.host, ofport);
    const t0 = performance.now();
    // A new container: nobody sends to it yet, so all hosts at once.
    await this.apply(topo, [...byHost.keys()], byHost, `${p.opId}/sdn-install`, signal);
    const ms = performance.now() - t0;
    return { durationMs: ms, details: { hosts: byHost.size, all_ms: ms } };
  }

  async switchPath(p: PathSwitch, signal: AbortSignal): Promise<SdnResult> {
    return this.move(p, p.to, p.from, `${p.migrationId}/sdn-switch`, signal);
  }

  async revert(p: PathSwitch, signal: AbortSignal): Promise<void> {
    // A different key from switchPath's: the agent must not answer the revert from the switch's record.
    await this.move(p, p.from, p.to, `${p.migrationId}/sdn-revert`, signal);
  }

  async remove(p: Placement, signal: AbortSignal): Promise<void> {
    const cookie = cookieForIp(p.ip);
    const topo = await this.port.topology();
    await Promise.all(topo.hosts.map((h) => this.port.deleteFlows(h.name, h.bridge, cookie, `${p.opId}/sdn-remove/${h.name}`, signal)));
  }

  /** Point every host at `target`: target first, then all the others (`previous` among them) in parallel. */
  private async move(
    p: PathSwitch,
    target: { host: string; ofport?: number },
    previous: { host: string },
    keyPrefix: string,
    signal: AbortSignal,
  ): Promise<SdnResult> {
    validateName("container", p.container);
    const ofport = requireOfport(target === p.to ? "to.ofport" : "from.ofport", target.ofport);
    const topo = await this.topology([target.host, previous.host]);
    const byHost = flowsByHost(topo, p.ip, target.host, ofport);
    const rest = [...byHost.keys()].filter((h) => h !== target.host);
    const t0 = performance.now();
    await this.apply(topo, [target.host], byHost, keyPrefix, signal);
    const t1 = performance.now();
    await this.apply(topo, rest, byHost, keyPrefix, signal);
    const t2 = performance.now();
    const first = target === p.to ? "dest_ms" : "source_ms";
    return { durationMs: t2 - t0, details: { [first]: t1 - t0, rest_ms: t2 - t1, hosts: byHost.size } };
  }

  private async apply(
    topo: OvsTopology,
    hosts: string[],
    byHost: Map<string, Flow[]>,
    keyPrefix: string,
    signal: AbortSignal,
  ): Promise<void> {
    signal.throwIfAborted();
    await Promise.all(
      hosts.map((name) => {
        const h = topo.hosts.find((x) => x.name === name)!;
        return this.port.setFlows(name, h.bridge, byHost.get(name)!, `${keyPrefix}/${name}`, signal);
      }),
    );
  }

  private async topology(mustHave: string[]): Promise<OvsTopology> {
    const topo = await this.port.topology();
    for (const name of mustHave) {
      if (!topo.hosts.some((h) => h.name === name)) {
        throw FerryError.notFound("host", name, "register the host (and its bridge) before placing or moving containers on it");
      }
    }
    return topo;
  }
}
