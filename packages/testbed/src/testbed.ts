import type { ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { access, mkdir, readdir, rm } from "node:fs/promises";
import {
  FerryError,
  exec,
  macFromIp,
  parseIpv4Cidr,
  silentLogger,
  validateIpv4,
  validateMac,
  validateName,
  type ExecOptions,
  type ExecResult,
  type Logger,
} from "@ferry/common";
import { startDaemon, stopDaemon } from "./daemon.js";
import { VXLAN_OFPORT_BASE, endpointFlows, type OverlayFlow } from "./flows.js";

/*
 * One machine, several emulated edge hosts:
 *
 *   <prefix>underlay (netns): Linux bridge br-ul ── ul<N> ═ veth ═ ul0 ── in each host netns
 *
 *   <prefix><host> (netns), its own ovsdb-server + ovs-vswitchd (userspace datapath):
 *     br-host  (Linux bridge): ul0, phy0, and the host's underlay IP: its own traffic (agents,
 *              sshd, scp) takes the kernel's path, as a host's management traffic does beside a
 *              userspace datapath, and not through a ovs-vswitchd that shares the CPU with it.
 *     br-phy   (netdev): port phy1 (═ veth ═ phy0), the tunnel IP on br-phy's internal interface.
 *              OVS's userspace tunnelling needs this: it routes VXLAN through its own
 *              route/neighbour tables, which it learns from the kernel for addresses on OVS bridges.
 *     br-ferry (netdev, fail_mode=secure): the overlay. vx<N> = VXLAN to host N (ofport 1000+N),
 *              container / workload interfaces at their pinned ofports, flows as in flows.ts.
 *
 * Nothing is created in the root namespace: every link lives in one of the testbed's namespaces,
 * so deleting the namespaces removes them all, and two testbeds never share an address.
 */

const NETNS_DIR = "/run/netns";
const SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema";
const UNDERLAY_BRIDGE = "br-ul";
/** The overlay bridge on every host. */
export const OVERLAY_BRIDGE = "br-ferry";
/** Cookie of {@link Testbed.routeSubnet}'s rules (outside the per-IP cookie range 0xfe_...). */
const SUBNET_COOKIE = 0xfd_0000_0000;
const PHYS_BRIDGE = "br-phy";
/*
 * LINK_OFFLOADS: what a host or the root namespace sends on its underlay link carries complete
 * checksums. The benchmark's delay wires (bench/shaping.ts) splice each link with AF_PACKET, which
 * reads a frame whose checksum the kernel left to the NIC as it is, and writes it on unfinished:
 * the receiver would drop it.
 */
/** Each host's kernel bridge: its underlay link, its address, and the veth to br-phy. */
const HOST_BRIDGE = "br-host";
const PREFIX = /^ferry-[a-z0-9-]{0,30}$/;

export interface TestbedOptions {
  /** Prefix of every namespace: "ferry-" for the real testbed (ferry-edge-a...), "ferry-t<rand>-" in tests. */
  prefix: string;
  /** State (OVS db, sockets, logs, pidfiles) goes to <stateRoot>/<prefix><host>/ovs. Default /run/ferry. */
  stateRoot?: string;
  /** First three octets of the underlay /24, default "172.31.0" (private to the testbed's namespaces). */
  underlayNet?: string;
  /** First three octets of the VXLAN endpoints' /24 on the same links, default "172.30.0". */
  tunnelNet?: string;
  /** VXLAN network identifier of the overlay, default 77. */
  vni?: number;
  /**
   * VXLAN between edge hosts too (default true). False when Ferry's controller builds the edge
   * mesh itself (RegisterHost with an underlay address): the testbed then links only client hosts
   * to every edge host.
   */
  meshEdges?: boolean;
  /** Let OVS daemons fork away and outlive this process (`make testbed-up`); default false. */
  detachDaemons?: boolean;
  log?: Logger;
}

export interface HostOptions {
  /** Host name, e.g. "edge-a"; the namespace is <prefix><name>. */
  name: string;
  /** Underlay address; default <underlayNet>.<index>. */
  underlayIp?: string;
  /** "client": a host of client workloads, linked to every edge host (default "edge"). */
  role?: "edge" | "client";
}

export interface WorkloadOptions {
  /** Namespace <host netns>-<name>, e.g. ferry-client-wl. */
  name: string;
  /** Overlay address, e.g. "10.77.0.100/24". */
  ipCidr: string;
  /** Default: derived from the IP (02:00:<ip>). */
  mac?: string;
  /** Pinned OpenFlow port on the host's br-ferry (1..999). */
  ofport: number;
  /** The namespace's name, when not <host netns>-<name> (the real testbed's "ferry-client"). */
  netns?: string;
}

/** An overlay endpoint the testbed made itself (e.g. the client's load generator). */
export interface Workload {
  name: string;
  host: EmulatedHost;
  netns: string;
  netnsPath: string;
  ip: string;
  mac: string;
  ofport: number;
  port: string;
}

/** Run a program inside a network namespace (`nsenter --net=<path>`: same mount namespace as ours). */
export function runInNetns(netnsPath: string, cmd: string, args: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
  return exec("nsenter", [`--net=${netnsPath}`, cmd, ...args], opts);
}

async function exists(p: string): Promise<boolean> {
  return access(p).then(
    () => true,
    () => false,
  );
}

function flowFile(flows: readonly OverlayFlow[]): string {
  const cookies = [...new Set(flows.map((f) => f.cookie))];
  const lines = cookies.map((c) => `delete cookie=0x${c.toString(16)}/-1`);
  for (const f of flows)
    lines.push(`add table=${f.table},priority=${f.priority},cookie=0x${f.cookie.toString(16)},${f.match},actions=${f.actions}`);
  return lines.join("\n") + "\n";
}

/** One emulated edge (or client) host: a network namespace with its own Open vSwitch. */
export class EmulatedHost {
  readonly netns: string;
  readonly netnsPath: string;
  /** Prefix for namespaces that belong to this host (its containers, its workloads): "<netns>-". */
  readonly netnsPrefix: string;
  readonly stateDir: string;
  /** OVS rundir: db.sock, <bridge>.mgmt, pidfiles, logs, conf.db. */
  readonly ovsDir: string;
  readonly dbSock: string;
  readonly bridge = OVERLAY_BRIDGE;
  role: "edge" | "client" = "edge";
  /** @internal daemons we started without --detach, reaped on stop. */
  readonly children = new Map<string, ChildProcess | undefined>();

  constructor(
    readonly name: string,
    readonly index: number,
    /** The host's own address on the underlay (br-host): its agent, sshd, ping. */
    readonly underlayIp: string,
    /** OVS's VXLAN endpoint (br-phy): RegisterHost's underlay_ip. */
    readonly tunnelIp: string,
    prefix: string,
    stateRoot: string,
  ) {
    this.netns = prefix + name;
    this.netnsPath = `${NETNS_DIR}/${this.netns}`;
    this.netnsPrefix = `${this.netns}-`;
    this.stateDir = `${stateRoot}/${this.netns}`;
    this.ovsDir = `${this.stateDir}/ovs`;
    this.dbSock = `${this.ovsDir}/db.sock`;
  }

  /** What the agent's `Ovs` needs to drive this host's OVS: `new Ovs(host.ovs)`. */
  get ovs(): { rundir: string; dbSock: string } {
    return { rundir: this.ovsDir, dbSock: this.dbSock };
  }

  /** The VXLAN port on THIS host that leads to `peer`. */
  vxlanPortTo(peer: EmulatedHost): { name: string; ofport: number } {
    return { name: `vx${peer.index}`, ofport: VXLAN_OFPORT_BASE + peer.index };
  }

  run(cmd: string, args: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
    return runInNetns(this.netnsPath, cmd, args, opts);
  }

  async vsctl(args: readonly string[]): Promise<string> {
    return (await exec("ovs-vsctl", [`--db=unix:${this.dbSock}`, "--timeout=10", ...args], { env: this.env() })).stdout;
  }

  async ofctl(args: readonly string[], input?: string): Promise<string> {
    return (await exec("ovs-ofctl", args, { env: this.env(), ...(input !== undefined ? { input } : {}) })).stdout;
  }

  /** Replace the rules of the flows' cookies on br-ferry, atomically (OpenFlow 1.4 bundle). */
  async setFlows(flows: readonly OverlayFlow[]): Promise<void> {
    if (flows.length) await this.ofctl(["-O", "OpenFlow14", "--bundle", "add-flows", this.bridge, "-"], flowFile(flows));
  }

  /** env for OVS tools and daemons: everything they look up by default is in our own dir. */
  env(): NodeJS.ProcessEnv {
    return { ...process.env, OVS_RUNDIR: this.ovsDir, OVS_LOGDIR: this.ovsDir, OVS_DBDIR: this.ovsDir, OVS_SYSCONFDIR: this.ovsDir };
  }
}

/**
 * Emulated edge hosts on one machine, joined by a VXLAN overlay over a private underlay.
 * `destroy()` removes everything the testbed made (daemons, namespaces, links, state dirs).
 */
export class Testbed {
  readonly hosts: EmulatedHost[] = [];
  readonly workloads: Workload[] = [];
  readonly underlayNs: string;
  private readonly stateRoot: string;
  private readonly underlayNet: string;
  private readonly tunnelNet: string;
  private readonly vni: number;
  private readonly log: Logger;
  /** ip → where it is routed, so hosts added later learn existing endpoints. */
  private readonly routes = new Map<string, { holder: EmulatedHost; ofport: number }>();

  private constructor(private readonly opts: TestbedOptions) {
    if (!PREFIX.test(opts.prefix)) {
      throw FerryError.invalid(
        "prefix",
        `"${opts.prefix}" is not a testbed prefix`,
        'start it with "ferry-" and use lowercase letters, digits and "-", e.g. "ferry-t1a2b-"',
      );
    }
    this.underlayNs = `${opts.prefix}underlay`;
    this.stateRoot = opts.stateRoot ?? "/run/ferry";
    this.underlayNet = opts.underlayNet ?? "172.31.0";
    this.tunnelNet = opts.tunnelNet ?? "172.30.0";
    if (this.tunnelNet === this.underlayNet) {
      throw FerryError.invalid(
        "tunnelNet",
        `tunnelNet ${this.tunnelNet} is the underlay's subnet`,
        "give the VXLAN endpoints a /24 of their own",
      );
    }
    this.vni = opts.vni ?? 77;
    this.log = opts.log ?? silentLogger;
  }

  /** Make the underlay (a namespace with a Linux bridge); add hosts with {@link createHost}. */
  static async create(opts: TestbedOptions): Promise<Testbed> {
    const tb = new Testbed(opts);
    if (await exists(`${NETNS_DIR}/${tb.underlayNs}`)) {
      throw new FerryError("AlreadyExists", `prefix: namespace ${tb.underlayNs} already exists (a running testbed, or a leftover)`, {
        field: "prefix",
        fix: "destroy the other testbed first (Testbed.destroyExisting) or use another prefix",
      });
    }
    await exec("ip", ["netns", "add", tb.underlayNs]);
    try {
      await exec("ip", ["-n", tb.underlayNs, "-batch", "-"], {
        input: ["link set lo up", `link add ${UNDERLAY_BRIDGE} type bridge`, `link set ${UNDERLAY_BRIDGE} up`].join("\n") + "\n",
      });
    } catch (e) {
      await tb.destroy();
      throw e;
    }
    return tb;
  }

  /**
   * Tear down a testbed made by another process (`make testbed-down` after `testbed-up` with
   * `detachDaemons`): the same as {@link destroy} for the named hosts of `opts.prefix`.
   */
  static async destroyExisting(opts: TestbedOptions, hostNames: readonly string[], workloadNetns: readonly string[] = []): Promise<void> {
    const tb = new Testbed(opts);
    for (const n of workloadNetns) tb.workloads.push({ netns: n } as Workload);
    hostNames.forEach((n, i) =>
      tb.hosts.push(new EmulatedHost(validateName("hostNames", n), i + 1, "0.0.0.0", "0.0.0.0", opts.prefix, tb.stateRoot)),
    );
    await tb.destroy();
  }

  /**
   * Send a whole overlay subnet from `host` to `via` (a client host's access edge host): the
   * edge hosts, programmed by Ferry, take it from there. Lower priority than per-endpoint rules.
   */
  async routeSubnet(host: EmulatedHost, cidr: string, via: EmulatedHost): Promise<void> {
    const { ip, prefix } = parseIpv4Cidr("cidr", cidr);
    const out = host.vxlanPortTo(via).ofport;
    const cookie = SUBNET_COOKIE;
    await host.setFlows([
      { table: 0, priority: 50, cookie, match: `ip,nw_dst=${ip}/${prefix}`, actions: `output:${out}` },
      { table: 0, priority: 50, cookie, match: `arp,arp_tpa=${ip}/${prefix}`, actions: `output:${out}` },
    ]);
  }

  /** Root-namespace side of the link made by {@link attachRoot}: "fu" + 8 hex of the prefix's hash. */
  get rootLink(): string {
    return `fu${createHash("sha256").update(this.opts.prefix).digest("hex").slice(0, 8)}`;
  }

  /**
   * Join the root namespace (where the controller, the CLI and tests run) to the underlay, at
   * <underlayNet>.254: the controller reaches the agents over the same network they use between
   * themselves. Returns that address.
   */
  async attachRoot(): Promise<string> {
    const ip = `${this.underlayNet}.254`;
    const link = this.rootLink;
    await exec("ip", ["link", "add", link, "type", "veth", "peer", "name", "ulroot", "netns", this.underlayNs]);
    await exec("ip", ["-n", this.underlayNs, "link", "set", "ulroot", "master", UNDERLAY_BRIDGE, "up"]);
    await exec("ethtool", ["-K", link, "tx", "off"]); // see LINK_OFFLOADS
    await exec("ip", ["-batch", "-"], { input: `addr add ${ip}/24 dev ${link}\nlink set ${link} up\n` });
    return ip;
  }

  host(name: string): EmulatedHost {
    const h = this.hosts.find((x) => x.name === name);
    if (!h) throw FerryError.notFound("testbed host", name);
    return h;
  }

  /** A new host: namespace, underlay link, OVS daemons, br-phy, br-ferry, VXLAN to every other host. */
  async createHost(o: HostOptions): Promise<EmulatedHost> {
    validateName("name", o.name);
    const index = this.hosts.length + 1;
    if (index >= VXLAN_OFPORT_BASE) throw new FerryError("ResourceExhausted", "too many testbed hosts");
    const underlayIp = o.underlayIp ?? `${this.underlayNet}.${index}`;
    validateIpv4("underlayIp", underlayIp);
    const tunnelIp = `${this.tunnelNet}.${index}`;
    validateIpv4("tunnelNet", tunnelIp);
    const host = new EmulatedHost(o.name, index, underlayIp, tunnelIp, this.opts.prefix, this.stateRoot);
    for (const h of this.hosts) {
      // Host namespaces must not be prefixes of each other's "<netns>-" children (destroy deletes those).
      if (
        h.name === o.name ||
        host.netns.startsWith(h.netnsPrefix) ||
        h.netns.startsWith(host.netnsPrefix) ||
        host.netns === this.underlayNs
      ) {
        throw new FerryError("AlreadyExists", `name: host "${o.name}" collides with host "${h.name}"`, {
          field: "name",
          fix: "pick a name that does not extend another host's name with '-'",
        });
      }
      if (h.underlayIp === underlayIp)
        throw new FerryError("AlreadyExists", `underlayIp: ${underlayIp} is used by host ${h.name}`, { field: "underlayIp" });
    }
    const log = this.log.child({ host: o.name });
    const t0 = performance.now();
    this.hosts.push(host); // before anything exists, so destroy() cleans a half-made host
    await exec("ip", ["netns", "add", host.netns]);
    await exec("ip", ["-n", this.underlayNs, "-batch", "-"], {
      input:
        [`link add ul${index} type veth peer name ul0 netns ${host.netns}`, `link set ul${index} master ${UNDERLAY_BRIDGE} up`].join("\n") +
        "\n",
    });
    await exec("ip", ["-n", host.netns, "-batch", "-"], {
      input:
        [
          "link set lo up",
          `link add ${HOST_BRIDGE} type bridge`,
          `link set ul0 master ${HOST_BRIDGE} up`,
          "link add phy0 type veth peer name phy1",
          `link set phy0 master ${HOST_BRIDGE} up`,
          "link set phy1 up",
          `link set ${HOST_BRIDGE} up`,
          `addr add ${underlayIp}/24 dev ${HOST_BRIDGE}`,
        ].join("\n") + "\n",
    });
    await host.run("ethtool", ["-K", "ul0", "tx", "off"]); // see LINK_OFFLOADS
    // Two addresses on one segment, each answered only from its own interface: the tunnel IP's
    // MAC must be br-phy's (peers' VXLAN would otherwise land in br-host's stack), the host IP's br-host's.
    await exec("ip", [
      "netns",
      "exec",
      host.netns,
      "sysctl",
      "-q",
      "-w",
      "net.ipv4.conf.all.arp_ignore=1",
      "net.ipv4.conf.all.arp_announce=2",
    ]);

    await mkdir(host.ovsDir, { recursive: true, mode: 0o700 });
    await exec("ovsdb-tool", ["create", `${host.ovsDir}/conf.db`, SCHEMA]);
    const detach = this.opts.detachDaemons ?? false;
    const common = { netnsPath: host.netnsPath, env: host.env(), marker: host.ovsDir, detach };
    host.children.set(
      "ovsdb-server",
      await startDaemon({
        ...common,
        program: "ovsdb-server",
        args: [`${host.ovsDir}/conf.db`, `--remote=punix:${host.dbSock}`],
        pidfile: `${host.ovsDir}/ovsdb-server.pid`,
        logfile: `${host.ovsDir}/ovsdb-server.log`,
      }),
    );
    await host.vsctl(["--no-wait", "init"]);
    host.children.set(
      "ovs-vswitchd",
      await startDaemon({
        ...common,
        program: "ovs-vswitchd",
        args: [`unix:${host.dbSock}`],
        pidfile: `${host.ovsDir}/ovs-vswitchd.pid`,
        logfile: `${host.ovsDir}/ovs-vswitchd.log`,
      }),
    );
    const owner = ["--", "set", "Bridge"];
    await host.vsctl([
      ...["--may-exist", "add-br", PHYS_BRIDGE, ...owner, PHYS_BRIDGE, "datapath_type=netdev", "external_ids:ferry-owner=testbed"],
      ...["--", "--may-exist", "add-port", PHYS_BRIDGE, "phy1"],
      ...["--", "--may-exist", "add-br", OVERLAY_BRIDGE, ...owner, OVERLAY_BRIDGE, "datapath_type=netdev", "fail_mode=secure"],
      ...["protocols=OpenFlow10,OpenFlow13,OpenFlow14,OpenFlow15", "external_ids:ferry-owner=testbed"],
    ]);
    // The tunnel address on br-phy's tap: OVS caches the connected route and resolves
    // neighbours (ARP) through br-phy, which is what its userspace VXLAN needs.
    await exec("ip", ["-n", host.netns, "-batch", "-"], {
      input: `addr add ${tunnelIp}/24 dev ${PHYS_BRIDGE}\nlink set ${PHYS_BRIDGE} up\n`,
    });

    host.role = o.role ?? "edge";
    for (const peer of this.hosts) {
      if (peer === host) continue;
      if (this.opts.meshEdges === false && host.role === "edge" && peer.role === "edge") continue;
      await this.addVxlan(host, peer);
      await this.addVxlan(peer, host);
    }
    // Warm the neighbour caches: OVS drops a tunnelled packet while it resolves the remote VTEP.
    await Promise.all(
      this.hosts.filter((p) => p !== host).map((p) => host.run("busybox", ["ping", "-c", "1", "-W", "1", p.tunnelIp], { okCodes: [0, 1] })),
    );
    for (const [ip, r] of this.routes) await host.setFlows(endpointFlows(ip, this.portOn(host, r.holder, r.ofport)));
    log.info({ ms: Math.round(performance.now() - t0), underlayIp, tunnelIp }, "testbed host up");
    return host;
  }

  private async addVxlan(on: EmulatedHost, to: EmulatedHost): Promise<void> {
    const { name, ofport } = on.vxlanPortTo(to);
    await on.vsctl([
      ...["--may-exist", "add-port", OVERLAY_BRIDGE, name, "--", "set", "Interface", name, "type=vxlan"],
      ...[`options:remote_ip=${to.tunnelIp}`, `options:local_ip=${on.tunnelIp}`, `options:key=${this.vni}`, `ofport_request=${ofport}`],
      ...["--", "set", "Port", name, "external_ids:ferry-owner=testbed"],
    ]);
  }

  private portOn(host: EmulatedHost, holder: EmulatedHost, ofport: number): number {
    return host === holder ? ofport : host.vxlanPortTo(holder).ofport;
  }

  /** The rules each host needs so that `ip` reaches `ofport` on `holder` (see flows.ts). */
  routeFlows(ip: string, holder: EmulatedHost, ofport: number): Array<{ host: EmulatedHost; flows: OverlayFlow[] }> {
    return this.hosts.map((h) => ({ host: h, flows: endpointFlows(ip, this.portOn(h, holder, ofport)) }));
  }

  /** Install (or switch) the route of an overlay endpoint on every host. */
  async route(ip: string, holder: EmulatedHost, ofport: number): Promise<void> {
    validateIpv4("ip", ip);
    this.routes.set(ip, { holder, ofport });
    await Promise.all(this.routeFlows(ip, holder, ofport).map(({ host, flows }) => host.setFlows(flows)));
  }

  /**
   * A namespace attached to a host's br-ferry at an overlay address, routed on every host: the
   * client host's load generator. Joined like the agent's containers (an OVS internal port moved
   * into the namespace and renamed eth0).
   */
  async addWorkload(host: EmulatedHost, o: WorkloadOptions): Promise<Workload> {
    validateName("name", o.name);
    const cidr = parseIpv4Cidr("ipCidr", o.ipCidr);
    const mac = o.mac ? validateMac("mac", o.mac) : macFromIp(cidr.ip);
    if (!Number.isInteger(o.ofport) || o.ofport < 1 || o.ofport >= VXLAN_OFPORT_BASE) {
      throw FerryError.invalid(
        "ofport",
        `ofport ${o.ofport} is out of range`,
        `use 1-${VXLAN_OFPORT_BASE - 1} (VXLAN ports use ${VXLAN_OFPORT_BASE}+)`,
      );
    }
    const netns = o.netns ?? host.netnsPrefix + o.name;
    const port = "fw" + createHash("sha256").update(netns).digest("hex").slice(0, 8);
    const w: Workload = { name: o.name, host, netns, netnsPath: `${NETNS_DIR}/${netns}`, ip: cidr.ip, mac, ofport: o.ofport, port };
    await exec("ip", ["netns", "add", netns]);
    this.workloads.push(w);
    await host.vsctl([
      ...["--may-exist", "add-port", OVERLAY_BRIDGE, port, "--", "set", "Interface", port, "type=internal", `ofport_request=${o.ofport}`],
      ...["--", "set", "Port", port, "external_ids:ferry-owner=testbed"],
    ]);
    await exec("ip", ["-n", host.netns, "link", "set", port, "netns", netns]);
    await exec("ip", ["-n", netns, "-batch", "-"], {
      input:
        [
          `link set ${port} name eth0`,
          `link set eth0 address ${mac} mtu 1450`,
          `addr add ${cidr.ip}/${cidr.prefix} dev eth0`,
          "link set lo up",
          "link set eth0 up",
        ].join("\n") + "\n",
    });
    await this.route(cidr.ip, host, o.ofport);
    return w;
  }

  /**
   * Remove everything: OVS daemons (by pidfile, only if their command line names our state dir),
   * every namespace of each host (its own and "<netns>-*"), the underlay, the state dirs.
   * Safe to call twice, and after a half-finished create.
   */
  async destroy(): Promise<void> {
    const errors: unknown[] = [];
    const attempt = async (f: () => Promise<unknown>): Promise<void> => {
      try {
        await f();
      } catch (e) {
        errors.push(e);
      }
    };
    for (const w of this.workloads) await attempt(() => delNetns(w.netns));
    const names = await readdir(NETNS_DIR).catch(() => [] as string[]);
    for (const host of [...this.hosts].reverse()) {
      for (const d of ["ovs-vswitchd", "ovsdb-server"]) {
        await attempt(() => stopDaemon(`${host.ovsDir}/${d}.pid`, host.ovsDir, host.children.get(d)));
      }
      for (const n of names.filter((x) => x.startsWith(host.netnsPrefix))) await attempt(() => delNetns(n));
      await attempt(() => delNetns(host.netns));
      await attempt(() => rm(host.stateDir, { recursive: true, force: true }));
    }
    await attempt(() => delNetns(this.underlayNs));
    // Deleting the underlay namespace removes the veth pair; wait until the root side is gone.
    await attempt(() => waitLinkGone(this.rootLink));
    if (errors.length) {
      throw new FerryError(
        "Internal",
        `testbed destroy: ${errors.length} step(s) failed: ${errors.map((e) => (e as Error).message).join("; ")}`,
        { cause: errors[0] },
      );
    }
  }
}

async function waitLinkGone(link: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const r = await exec("ip", ["link", "show", link], { okCodes: [0, 1] });
    if (r.exitCode !== 0) return;
    if (i === 20) await exec("ip", ["link", "del", link], { okCodes: [0, 1] });
    await new Promise((res) => setTimeout(res, 50));
  }
  throw new FerryError("Internal", `link ${link} is still there after its namespace was deleted`);
}

async function delNetns(name: string): Promise<void> {
  if (await exists(`${NETNS_DIR}/${name}`)) await exec("ip", ["netns", "del", name], { okCodes: [0, 1] });
}
