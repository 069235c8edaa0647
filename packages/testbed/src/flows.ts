import { isIPv4 } from "node:net";
import { FerryError } from "@ferry/common";

/**
 * Overlay forwarding on every host's `br-ferry` (the design the controller's path switch relies on).
 *
 * The bridge runs with `fail_mode=secure`: no NORMAL action, no MAC learning, and a packet that
 * matches no rule is dropped. Each overlay endpoint (a container, a client workload) owns one
 * cookie, derived from its IP ({@link cookieForIp}), and two rules in table 0 on EVERY host:
 *
 *     priority=100, cookie=C(ip), ip,nw_dst=<ip>    actions=output:<p>
 *     priority=100, cookie=C(ip), arp,arp_tpa=<ip>  actions=output:<p>
 *
 * where <p> is the endpoint's own ofport on the host that holds it, and on every other host the
 * VXLAN port towards that host (`vx<index>`, ofport {@link VXLAN_OFPORT_BASE} + index, VNI shared).
 * ARP is routed by its target address like IP, so broadcasts never flood the mesh (no loops, no
 * split horizon needed) and a moved endpoint's ARP follows it. A packet that would go back out
 * of the port it came in on is dropped by OpenFlow, so stale rules during a switch cannot loop.
 *
 * Switching an endpoint's path (COAT step 5) = `setFlows` of its two rules, with the new <p>, on
 * every host: each call replaces the rules of that cookie atomically (an OpenFlow bundle). The
 * endpoint keeps its MAC, so clients need no ARP refresh.
 */
export interface OverlayFlow {
  table: number;
  priority: number;
  match: string;
  actions: string;
  cookie: number;
}

/** VXLAN port towards host N: name `vx<N>`, ofport 1000 + N (local endpoints use 1..999). */
export const VXLAN_OFPORT_BASE = 1000;
export const ENDPOINT_PRIORITY = 100;
const COOKIE_BASE = 0xfe_0000_0000;

function ipToInt(ip: string): number {
  if (!isIPv4(ip)) throw FerryError.invalid("ip", `"${ip}" is not an IPv4 address`, 'write it as "A.B.C.D"');
  return ip.split(".").reduce((n, o) => n * 256 + Number(o), 0);
}

/** The cookie of an overlay endpoint: 0xfe_<ip as 32 bits>, below 2^53 so JS numbers carry it. */
export function cookieForIp(ip: string): number {
  return COOKIE_BASE + ipToInt(ip);
}

/** The two rules that send traffic for `ip` out of `ofport` on one host. */
export function endpointFlows(ip: string, ofport: number): OverlayFlow[] {
  const cookie = cookieForIp(ip);
  return [
    { table: 0, priority: ENDPOINT_PRIORITY, cookie, match: `ip,nw_dst=${ip}`, actions: `output:${ofport}` },
    { table: 0, priority: ENDPOINT_PRIORITY, cookie, match: `arp,arp_tpa=${ip}`, actions: `output:${ofport}` },
  ];
}
