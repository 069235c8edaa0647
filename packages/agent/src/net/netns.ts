import { createHash } from "node:crypto";
import { access, readdir } from "node:fs/promises";
import type { TcpConnection } from "@ferry/api/agent";
import {
  ExecError,
  FerryError,
  exec,
  isFerryError,
  macFromIp,
  parseIpv4Cidr,
  validateIpv4,
  validateMac,
  validateName,
} from "@ferry/common";
import type { PacketHoldApi } from "./hold.js";
import { isNetnsLocked, lockNetns, unlockNetns } from "./lock.js";
import type { OvsApi } from "./ovs.js";

export interface NetNsConfig {
  /** Namespace name prefix: "ferry-" gives /run/netns/ferry-<container>. */
  prefix: string;
  ovs: OvsApi;
  /** The OVS bridge the container's interface is attached to. */
  bridge: string;
  /**
   * Named network namespace where ovs-vswitchd (and so the bridge's ports) lives, when it is not
   * our own (an emulated host driven from outside). Default: the caller's namespace.
   */
  hostNs?: string;
  /**
   * How the container's eth0 is joined to OVS.
   * - "tap" (default): an OVS internal port (a tap with the userspace datapath) moved into the
   *   namespace and renamed eth0. The kernel checksums what the container sends into a tap.
   * - "veth": a veth pair whose inner end is made inside the namespace, so that nothing moves
   *   between namespaces (a move waits for an RCU barrier under the kernel's rtnl lock, ~15-20 ms,
   *   and concurrent moves wait for each other). On a userspace datapath (datapath_type netdev)
   *   OVS reads the outer end with AF_PACKET, which passes on the TCP/UDP checksums the kernel left
   *   to the device unfinished, and the receiver would drop them: there the inner end computes
   *   them itself (ethtool tx off). Measured on the testbed's hosts, alternating: a create takes
   *   0.65x the time of a tap's (0.78x for 4 at once, 2 per host), but more CPU (50 against 30 ms),
   *   and a clear takes 1.44x (43 against 30 ms).
   */
  link?: "tap" | "veth";
  /** Default 1450: the overlay is VXLAN over a 1500-byte underlay. */
  mtu?: number;
  /** Default /run/netns (where `ip netns add` puts them). */
  netnsDir?: string;
  /** How long {@link NetNs.clear} waits for the host-side interface to disappear. Default 5 s. */
  clearTimeoutMs?: number;
  /** Holds what reaches a locked namespace until {@link NetNs.releaseHeld} (./hold.ts); without it, the lock drops it. */
  holds?: PacketHoldApi;
}

export interface NetnsSpec {
  /** "10.77.0.10/24". */
  ipCidr: string;
  /** Derived from the IP (02:00:<ip>) when absent. */
  mac?: string;
  gateway?: string;
  /** Pinned OpenFlow port; OVS picks one when absent or 0. */
  ofport?: number;
}

export interface NetnsInfo {
  /** /run/netns/<prefix><container>, as written into the OCI config. */
  path: string;
  /** OVS port name of the container's interface: "fv" + 8 hex of sha256(prefix + container). */
  veth: string;
  ofport: number;
  mac: string;
}

/** What {@link NetNs} offers the agent's service and pipeline; a fake can implement it in unit tests. */
export interface NetNsApi {
  create(container: string, spec: NetnsSpec, lock?: readonly TcpConnection[]): Promise<NetnsInfo>;
  clear(container: string): Promise<{ waitMs: number }>;
  lock(container: string): Promise<void>;
  unlock(container: string): Promise<void>;
  /** Hand what the lock held to the namespace (its container runs now): how many packets. */
  releaseHeld(container: string): Promise<number>;
  isLocked(container: string): Promise<boolean>;
  exists(container: string): Promise<boolean>;
  path(container: string): string;
}

const PREFIX = /^[a-z0-9][a-z0-9-]{0,40}$/;
const POLL_MS = 10;

/** The host-side OVS port name of a container: short (IFNAMSIZ) and stable across hosts. */
export function portNameFor(prefix: string, container: string): string {
  return (
    "fv" +
    createHash("sha256")
      .update(prefix + container)
      .digest("hex")
      .slice(0, 8)
  );
}

interface Observed {
  ip?: string;
  prefix?: number;
  mac?: string;
  ofport?: number;
}

/**
 * Network namespaces of Ferry containers, each with an `eth0` on the host's OVS bridge at a
 * pinned OpenFlow port. Namespaces are entered with `ip -n` / `nsenter --net=`, never with
 * `ip netns exec` (a new mount namespace breaks CRIU).
 */
export class NetNs implements NetNsApi {
  private readonly link: "tap" | "veth";
  private readonly mtu: number;
  private readonly dir: string;
  /**
   * IPv4 addresses of this prefix's namespaces, by namespace name: what this instance created,
   * and what it read once from namespaces it found. A create probes only namespaces it has not
   * seen, not every namespace on the host (30 of them cost ~30 ms and ~40 ms of CPU in `ip`).
   */
  private readonly addresses = new Map<string, readonly string[]>();
  /** Namespaces whose create is under way: their address is claimed before they exist. */
  private readonly creating = new Set<string>();

  constructor(private readonly cfg: NetNsConfig) {
    if (!PREFIX.test(cfg.prefix))
      throw FerryError.invalid(
        "netns.prefix",
        `"${cfg.prefix}" is not a valid prefix`,
        "use lowercase letters, digits and '-', e.g. \"ferry-\"",
      );
    this.link = cfg.link ?? "tap";
    this.mtu = cfg.mtu ?? 1450;
    this.dir = cfg.netnsDir ?? "/run/netns";
  }

  private nsName(container: string): string {
    return this.cfg.prefix + validateName("container", container);
  }

  path(container: string): string {
    return `${this.dir}/${this.nsName(container)}`;
  }

  async exists(container: string): Promise<boolean> {
    return access(this.path(container)).then(
      () => true,
      () => false,
    );
  }

  /** `ip` in the namespace where the bridge lives. */
  private ipHost(args: string[], okCodes?: number[]): Promise<{ stdout: string; exitCode: number }> {
    return exec("ip", this.cfg.hostNs ? ["-n", this.cfg.hostNs, ...args] : args, okCodes ? { okCodes } : {});
  }

  async create(container: string, spec: NetnsSpec, lock?: readonly TcpConnection[]): Promise<NetnsInfo> {
    const name = this.nsName(container);
    const cidr = parseIpv4Cidr("network.ip_cidr", spec.ipCidr);
    const mac = spec.mac ? validateMac("network.mac", spec.mac) : macFromIp(cidr.ip);
    if (spec.gateway) validateIpv4("network.gateway", spec.gateway);
    const ofport = spec.ofport ?? 0;
    if (!Number.isInteger(ofport) || ofport < 0 || ofport > 0xfeff) {
      throw FerryError.invalid("network.ofport", `ofport ${ofport} is out of range`, "use 1-65279, or 0 to let OVS pick one");
    }
    const port = portNameFor(this.cfg.prefix, container);
    const path = this.path(container);

    if (await this.exists(container)) {
      const cur = await this.observe(container);
      const same =
        cur.ip === cidr.ip &&
        cur.prefix === cidr.prefix &&
        cur.mac === mac &&
        cur.ofport !== undefined &&
        (ofport === 0 || cur.ofport === ofport);
      if (!same) {
        throw new FerryError(
          "AlreadyExists",
          `container: network namespace ${name} already exists with another configuration (ip ${cur.ip ?? "-"}/${cur.prefix ?? "-"}, mac ${cur.mac ?? "-"}, ofport ${cur.ofport ?? "-"})`,
          {
            field: "container",
            fix: "clear the namespace first (ClearNetns) or use another container name",
          },
        );
      }
      if (lock) await this.lock(container);
      return { path, veth: port, ofport: cur.ofport!, mac };
    }
    await this.claimIp(cidr.ip, name);
    try {
      try {
        await exec("ip", ["netns", "add", name]);
      } catch (e) {
        if (e instanceof ExecError && /File exists/.test(e.stderr)) {
          throw new FerryError("AlreadyExists", `container: network namespace ${name} was created concurrently`, {
            field: "container",
            fix: "retry; the agent serialises calls per container",
          });
        }
        throw e;
      }
      // Undo on failure: the namespace and the port must not outlive a failed create.
      try {
        // The lock goes in before any link exists: a client retransmission that reached an
        // unlocked namespace would meet no socket and get a RST (seen: one run in three).
        // A namespace this new has no rules to look at first.
        if (lock) {
          await lockNetns(path);
          await this.cfg.holds?.hold(name, path);
        }
        const got = this.link === "tap" ? await this.attachTap(name, port, ofport) : await this.attachVeth(name, port, ofport);
        const cmds = [
          ...(this.link === "tap" ? [`link set ${port} name eth0`] : []),
          `link set eth0 address ${mac} mtu ${this.mtu}`,
          `addr add ${cidr.ip}/${cidr.prefix} dev eth0`,
          "link set lo up",
          "link set eth0 up",
          ...(spec.gateway ? [`route add default via ${spec.gateway} dev eth0`] : []),
        ];
        await exec("ip", ["-n", name, "-batch", "-"], { input: cmds.join("\n") + "\n" });
        return { path, veth: port, ofport: got, mac };
      } catch (e) {
        await this.clear(container).catch(() => undefined);
        throw e;
      }
    } catch (e) {
      this.addresses.delete(name);
      throw e;
    } finally {
      this.creating.delete(name);
    }
  }

  private async attachTap(name: string, port: string, ofport: number): Promise<number> {
    // A leftover port of the same name would hold a tap that is not ours to move.
    await this.cfg.ovs.deletePort(this.cfg.bridge, port);
    const got = await this.cfg.ovs.addPort(this.cfg.bridge, port, {
      type: "internal",
      ...(ofport ? { ofport } : {}),
      externalIds: { "ferry-netns": name },
    });
    // OVS keeps reading/writing the tap through its fd after the device changes namespace.
    await this.ipHost(["link", "set", port, "netns", name]);
    return got;
  }

  private async attachVeth(name: string, port: string, ofport: number): Promise<number> {
    await this.waitGone(port, this.cfg.clearTimeoutMs ?? 5000);
    await this.ipHost(["link", "add", port, "mtu", String(this.mtu), "type", "veth", "peer", "name", "eth0", "netns", name]);
    if ((await this.cfg.ovs.datapathType(this.cfg.bridge)) === "netdev") {
      await exec("nsenter", [`--net=${this.dir}/${name}`, "ethtool", "-K", "eth0", "tx", "off"]);
    }
    await this.ipHost(["link", "set", port, "up"]);
    return this.cfg.ovs.addPort(this.cfg.bridge, port, { ...(ofport ? { ofport } : {}), externalIds: { "ferry-netns": name } });
  }

  /**
   * Record `ip` as namespace `self`'s, or AlreadyExists when another namespace of this prefix
   * holds it. The check and the record happen in one turn of the event loop, after the probes:
   * of two creates with the same address at once, the second is refused. The caller removes
   * `self` from {@link creating} when its create ends.
   */
  private async claimIp(ip: string, self: string): Promise<void> {
    const names = new Set((await readdir(this.dir).catch(() => [] as string[])).filter((n) => n.startsWith(this.cfg.prefix)));
    for (const n of this.addresses.keys()) if (!names.has(n) && !this.creating.has(n)) this.addresses.delete(n);
    await Promise.all(
      [...names]
        .filter((n) => n !== self && !this.addresses.has(n))
        .map(async (n) => {
          const found = await addressesOf(n).catch(() => [] as string[]);
          if (!this.addresses.has(n)) this.addresses.set(n, found);
        }),
    );
    const holder = [...this.addresses].find(([n, ips]) => n !== self && ips.includes(ip))?.[0];
    if (holder) {
      throw new FerryError("AlreadyExists", `network.ip_cidr: ${ip} is already used on this host by namespace ${holder}`, {
        field: "network.ip_cidr",
        fix: `clear ${holder} first (a migration clears the source before the destination takes the address) or pick another IP`,
      });
    }
    this.addresses.set(self, [ip]);
    this.creating.add(self); // until create() ends: not yet in the directory, yet claimed
  }

  private async observe(container: string): Promise<Observed> {
    const name = this.nsName(container);
    const out: Observed = {};
    const r = await exec("ip", ["-n", name, "-j", "addr", "show", "dev", "eth0"], { okCodes: [0, 1] });
    if (r.exitCode === 0) {
      const links = JSON.parse(r.stdout || "[]") as Array<{
        address?: string;
        addr_info?: Array<{ family: string; local: string; prefixlen: number }>;
      }>;
      const inet = links[0]?.addr_info?.find((a) => a.family === "inet");
      out.mac = links[0]?.address;
      if (inet) {
        out.ip = inet.local;
        out.prefix = inet.prefixlen;
      }
    }
    try {
      out.ofport = await this.cfg.ovs.ofportOf(portNameFor(this.cfg.prefix, container));
    } catch {
      /* no port: not identical */
    }
    return out;
  }

  isLocked(container: string): Promise<boolean> {
    return isNetnsLocked(this.path(container));
  }

  /**
   * Install the network lock (idempotent; see ./lock.ts): everything but CRIU's marked packets is
   * held (with {@link NetNsConfig.holds}) or dropped.
   */
  async lock(container: string): Promise<void> {
    if (!(await this.exists(container))) throw FerryError.notFound("network namespace", this.nsName(container), "create it first");
    if (!(await this.isLocked(container))) await lockNetns(this.path(container));
    await this.cfg.holds?.hold(this.nsName(container), this.path(container));
  }

  /** Remove the lock (see ./lock.ts); a no-op when unlocked. What it held is dropped, not delivered. */
  async unlock(container: string): Promise<void> {
    await this.cfg.holds?.drop(this.nsName(container));
    await unlockNetns(this.path(container));
  }

  async releaseHeld(container: string): Promise<number> {
    return (await this.cfg.holds?.release(this.nsName(container))) ?? 0;
  }

  /**
   * At agent start: hold again what reaches this host's locked namespaces (a destination waiting
   * for its restore, a dumped source), as create() did. The holds of the agent before this one
   * ended with it, and the kernel dropped what they held; from now on, a restore hands over what
   * arrives. A namespace of this prefix is this host's when its port is on this host's bridge
   * (emulated hosts on one machine share /run/netns). Returns the containers held.
   */
  async holdLocked(): Promise<string[]> {
    const holds = this.cfg.holds;
    if (!holds) return [];
    const names = (await readdir(this.dir).catch(() => [] as string[])).filter((n) => n.startsWith(this.cfg.prefix));
    const held: string[] = [];
    for (const name of names) {
      const container = name.slice(this.cfg.prefix.length);
      try {
        validateName("container", container);
      } catch {
        continue; // not a container's namespace
      }
      // NotFound: another host's; FailedPrecondition: this host's port, not attached (still ours).
      const mine = await this.cfg.ovs.ofportOf(portNameFor(this.cfg.prefix, container)).then(
        () => true,
        (e: unknown) => {
          if (isFerryError(e, "NotFound")) return false;
          if (isFerryError(e, "FailedPrecondition")) return true;
          throw e;
        },
      );
      if (mine && (await this.isLocked(container)) && (await holds.hold(name, this.path(container)))) held.push(container);
    }
    return held;
  }

  /**
   * Delete the namespace and its OVS port, and wait until the host-side interface is really gone
   * (namespace teardown is asynchronous; a re-create with the same port name would fail).
   */
  async clear(container: string): Promise<{ waitMs: number }> {
    const name = this.nsName(container);
    const port = portNameFor(this.cfg.prefix, container);
    await this.cfg.holds?.drop(name);
    // Deleting an OVS internal port destroys its tap at once, wherever it lives.
    await this.cfg.ovs.deletePort(this.cfg.bridge, port);
    if (this.link === "veth") await this.ipHost(["link", "del", port], [0, 1]);
    const started = performance.now();
    if (await this.exists(container)) {
      await exec("ip", ["netns", "del", name], { okCodes: [0, 1] });
    }
    this.addresses.delete(name);
    await this.waitGone(port, this.cfg.clearTimeoutMs ?? 5000);
    return { waitMs: Math.round(performance.now() - started) };
  }

  private async waitGone(port: string, timeoutMs: number): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const r = await this.ipHost(["link", "show", "dev", port], [0, 1]);
      if (r.exitCode !== 0) return;
      if (performance.now() > deadline) {
        throw new FerryError("DeadlineExceeded", `interface ${port} still exists ${timeoutMs} ms after its namespace was deleted`, {
          fix: `check what holds it (ip link show ${port}) and delete it`,
        });
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  }
}

async function addressesOf(ns: string): Promise<string[]> {
  const r = await exec("ip", ["-n", ns, "-j", "-4", "addr", "show"]);
  const links = JSON.parse(r.stdout || "[]") as Array<{ addr_info?: Array<{ local: string }> }>;
  return links.flatMap((l) => (l.addr_info ?? []).map((a) => a.local));
}
