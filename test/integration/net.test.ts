/**
 * Network layer against the real tools: emulated hosts (network namespaces, one OVS each with the
 * userspace datapath, VXLAN overlay), the agent's NetNs/Ovs adapters, and COAT's path switch.
 * Runs as root. Prints the measured numbers at the end.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { access, readdir, readFile } from "node:fs/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type FerryError, exec, isFerryError, macFromIp } from "@ferry/common";
import {
  CRIU_LOCK_RULES,
  CRIU_NETWORK_SCRIPT,
  CRIU_UNLOCK_CHAIN,
  CRIU_UNLOCK_JUMPS,
  NetNs,
  Ovs,
  PacketHolds,
  lockNetns,
  portNameFor,
} from "@ferry/agent";
import { Testbed, cookieForIp, runInNetns, type EmulatedHost, type Workload } from "@ferry/testbed";
import { pingFrom } from "../helpers/ping.js";

const isRoot = process.getuid?.() === 0;
const PREFIX = `ferry-t${randomBytes(2).toString("hex")}-`;
const CT = "web";
const CT_IP = "10.77.0.10";
const CT_OFPORT = 5;
const WL_IP = "10.77.0.100";
const PORT = 7000;

const measured: Record<string, number | string> = {};

let tb: Testbed;
let a: EmulatedHost;
let b: EmulatedHost;
let client: EmulatedHost;
let wl: Workload;
let ovsA: Ovs;
let ovsB: Ovs;
let nsA: NetNs;
let nsB: NetNs;
const servers: ChildProcess[] = [];

async function expectFerryError(p: Promise<unknown>, code: FerryError["code"], field?: string): Promise<FerryError> {
  const e = await p.then(
    () => undefined,
    (x: unknown) => x,
  );
  expect(isFerryError(e), `expected a FerryError ${code}, got ${String(e)}`).toBe(true);
  const fe = e as FerryError;
  expect(fe.code).toBe(code);
  if (field) expect(fe.field).toBe(field);
  return fe;
}

/** ping from the client workload; returns received count and avg RTT. */
const ping = (ip: string, count: number, waitS = 1): Promise<{ received: number; avgMs: number }> =>
  pingFrom(wl.netnsPath, ip, count, waitS);

/**
 * One echo request to the locked CT_IP (busybox ping sends it once: a dropping lock leaves it
 * unanswered): held, then answered once CRIU's unlock has run (what its restore runs) and `ns`
 * released it, as the agent does once the container runs. Its RTT, the time it waited.
 */
async function expectHeldUntilReleased(ns: NetNs, netnsPath: string): Promise<number> {
  const held = ping(CT_IP, 1, 5);
  await new Promise((r) => setTimeout(r, 600));
  for (const rules of [CRIU_UNLOCK_JUMPS, CRIU_UNLOCK_CHAIN]) {
    await exec("nsenter", [`--net=${netnsPath}`, "iptables-restore", "-w", "--noflush"], { input: rules });
  }
  expect(await ns.releaseHeld(CT)).toBeGreaterThanOrEqual(1);
  const h = await held;
  expect(h.received).toBe(1);
  expect(h.avgMs).toBeGreaterThanOrEqual(400);
  return Math.round(h.avgMs);
}

/** A TCP echo server (Node) inside a namespace; resolves once it listens. */
async function startEchoServer(netnsPath: string, tag: string): Promise<ChildProcess> {
  const script = `require("net").createServer((c)=>c.on("data",(d)=>c.write("${tag}:"+d))).listen(${PORT},"0.0.0.0",()=>console.log("listening"))`;
  const child = spawn("nsenter", [`--net=${netnsPath}`, process.execPath, "-e", script], { stdio: ["ignore", "pipe", "pipe"] });
  servers.push(child);
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("echo server did not start")), 5000);
    child.stdout.once("data", () => {
      clearTimeout(t);
      resolve();
    });
    child.once("exit", (c) => reject(new Error(`echo server exited ${c}`)));
  });
  return child;
}

async function stopServer(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((r) => child.once("exit", () => r()));
  child.kill("SIGKILL");
  await gone;
}

/** One TCP round trip from the client workload; returns the reply or throws. */
async function tcpRoundTrip(ip: string, msg: string, timeoutMs = 3000): Promise<string> {
  const script =
    `const c=require("net").connect(${PORT},"${ip}",()=>c.write("${msg}"));` +
    `c.setTimeout(${timeoutMs},()=>{console.error("timeout");process.exit(2)});` +
    `c.on("data",(d)=>{process.stdout.write(String(d));process.exit(0)});c.on("error",(e)=>{console.error(e.message);process.exit(1)});`;
  const r = await runInNetns(wl.netnsPath, process.execPath, ["-e", script], { timeoutMs: timeoutMs + 3000 });
  return r.stdout;
}

/** Switch the container's path on every host with the agent's Ovs (what the controller will do). */
async function switchTo(holder: EmulatedHost, ofport: number): Promise<number[]> {
  const times: number[] = [];
  for (const { host, flows } of tb.routeFlows(CT_IP, holder, ofport)) {
    const { durationMs } = await new Ovs({ ...host.ovs, owner: "ferry-test" }).setFlows(host.bridge, flows);
    times.push(durationMs);
  }
  return times;
}

async function ourProcesses(): Promise<string[]> {
  const out: string[] = [];
  for (const pid of await readdir("/proc")) {
    if (!/^\d+$/.test(pid)) continue;
    const cmd = await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
    const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
    if (cmd.includes(`/run/ferry/${PREFIX}`) && !/\) Z /.test(stat)) out.push(`${pid}: ${cmd.replace(/\0/g, " ")}`);
  }
  return out;
}

describe.skipIf(!isRoot)("network layer (emulated hosts, OVS userspace, VXLAN)", () => {
  beforeAll(async () => {
    const t0 = performance.now();
    tb = await Testbed.create({ prefix: PREFIX });
    a = await tb.createHost({ name: "edge-a" });
    b = await tb.createHost({ name: "edge-b" });
    client = await tb.createHost({ name: "client" });
    wl = await tb.addWorkload(client, { name: "wl", ipCidr: `${WL_IP}/24`, ofport: 10 });
    measured.testbedUpMs = Math.round(performance.now() - t0);
    ovsA = new Ovs({ ...a.ovs, owner: "ferry-test" });
    ovsB = new Ovs({ ...b.ovs, owner: "ferry-test" });
    nsA = new NetNs({ prefix: a.netnsPrefix, ovs: ovsA, bridge: a.bridge, hostNs: a.netns });
    nsB = new NetNs({ prefix: b.netnsPrefix, ovs: ovsB, bridge: b.bridge, hostNs: b.netns });
  });

  afterAll(async () => {
    for (const s of servers) await stopServer(s);
    await tb?.destroy();
    console.log(`[net.test] measured: ${JSON.stringify(measured)}`);
  });

  it("creates a namespace on host A that the client reaches across VXLAN (ping and TCP)", async () => {
    const t0 = performance.now();
    const info = await nsA.create(CT, { ipCidr: `${CT_IP}/24`, ofport: CT_OFPORT });
    measured.netnsCreateMs = Math.round(performance.now() - t0);
    expect(info).toEqual({
      path: `/run/netns/${a.netnsPrefix}${CT}`,
      veth: portNameFor(a.netnsPrefix, CT),
      ofport: CT_OFPORT,
      mac: macFromIp(CT_IP),
    });
    await access(info.path);
    const link = JSON.parse((await exec("ip", ["-n", `${a.netnsPrefix}${CT}`, "-j", "addr", "show", "dev", "eth0"])).stdout) as Array<{
      address: string;
      mtu: number;
      addr_info: Array<{ local: string }>;
    }>;
    expect(link[0]!.address).toBe(macFromIp(CT_IP));
    expect(link[0]!.mtu).toBe(1450);
    expect(link[0]!.addr_info.map((x) => x.local)).toContain(CT_IP);

    // no route yet: the overlay drops (fail_mode=secure, no NORMAL)
    expect((await ping(CT_IP, 1)).received).toBe(0);
    const times = await switchTo(a, CT_OFPORT);
    measured.setFlowsMs = times.map((t) => Math.round(t)).join("/");

    // the first run also waits for the client's ARP and OVS's first upcalls; measure on the second
    expect((await ping(CT_IP, 5)).received).toBeGreaterThanOrEqual(4);
    const p = await ping(CT_IP, 10);
    expect(p.received).toBe(10);
    measured.pingRttMs = p.avgMs;
    const srv = await startEchoServer(info.path, "a");
    expect(await tcpRoundTrip(CT_IP, "hello")).toBe("a:hello");
    await stopServer(srv);
  });

  it("lists the flows it set, tagged by the container's cookie", async () => {
    const cookie = cookieForIp(CT_IP);
    const mine = (await ovsA.listFlows(a.bridge)).filter((f) => f.cookie === cookie);
    expect(mine).toHaveLength(2);
    expect(mine.map((f) => f.match).sort()).toEqual([`arp,arp_tpa=${CT_IP}`, `ip,nw_dst=${CT_IP}`]);
    expect(mine.every((f) => f.actions === `output:${CT_OFPORT}` && f.priority === 100 && f.table === 0)).toBe(true);
    const onB = (await ovsB.listFlows(b.bridge)).filter((f) => f.cookie === cookie);
    expect(onB.every((f) => f.actions === `output:${b.vxlanPortTo(a).ofport}`)).toBe(true);
  });

  it("the network lock drops traffic until unlocked, and CRIU's own unlock text removes it", async () => {
    const path = nsA.path(CT);
    await nsA.lock(CT);
    await nsA.lock(CT); // idempotent: still one jump per hook
    const saved = (await exec("nsenter", [`--net=${path}`, "iptables-save", "-t", "filter"])).stdout;
    expect(saved.match(/^-A INPUT -j CRIU$/gm)).toHaveLength(1);
    expect(saved).toMatch(/^-A CRIU -m mark --mark 0xc114 -j ACCEPT$/m);
    expect(saved).toMatch(/^-A CRIU -m addrtype ! --src-type LOCAL -j NFQUEUE --queue-num 49428$/m);
    expect(saved).toMatch(/^-A CRIU -j DROP$/m);
    expect(await nsA.isLocked(CT)).toBe(true);
    expect((await ping(CT_IP, 3)).received).toBe(0);

    // What CRIU 4.2.1's restore runs (criu/net.c iptables_network_unlock_internal): must succeed on our lock.
    for (const rules of [CRIU_UNLOCK_JUMPS, CRIU_UNLOCK_CHAIN]) {
      await exec("nsenter", [`--net=${path}`, "iptables-restore", "-w", "--noflush"], { input: rules });
      await exec("nsenter", [`--net=${path}`, "ip6tables-restore", "-w", "--noflush"], { input: rules });
    }
    expect(await nsA.isLocked(CT)).toBe(false);
    expect((await ping(CT_IP, 3)).received).toBeGreaterThanOrEqual(2);

    await nsA.lock(CT);
    expect((await ping(CT_IP, 2)).received).toBe(0);
    await nsA.unlock(CT);
    await nsA.unlock(CT); // no-op
    expect(await nsA.isLocked(CT)).toBe(false);
    expect((await ping(CT_IP, 3)).received).toBeGreaterThanOrEqual(2);
    expect(CRIU_LOCK_RULES).toContain("-A CRIU -m mark --mark 0xC114 -j ACCEPT\n");

    // The unlock's one transaction fails on a lock made twice, or in one family only: it then
    // takes the lock apart step by step, leaving no jump and no chain in either family.
    const rules = async (cmd: string): Promise<string> => (await exec("nsenter", [`--net=${path}`, cmd, "-t", "filter"])).stdout;
    await lockNetns(path);
    await lockNetns(path);
    expect((await rules("iptables-save")).match(/^-A INPUT -j CRIU$/gm)).toHaveLength(2);
    await exec("nsenter", [`--net=${path}`, "iptables-restore", "-w", "--noflush"], { input: CRIU_LOCK_RULES });
    await nsA.unlock(CT);
    for (const cmd of ["iptables-save", "ip6tables-save"]) expect(await rules(cmd)).not.toContain("CRIU");
    expect((await ping(CT_IP, 3)).received).toBeGreaterThanOrEqual(2);

    // A restore's unlock only opens the lock (no rule taken away: no wait for the kernel), in both
    // families; the full unlock then removes it.
    await nsA.lock(CT);
    const t0 = performance.now();
    await exec("sh", ["-c", CRIU_NETWORK_SCRIPT, "ferry-network-lock"], {
      env: { ...process.env, CRTOOLS_SCRIPT_ACTION: "network-unlock", FERRY_NETNS: path, FERRY_UNLOCK: "open" },
    });
    measured.openLockMs = Math.round(performance.now() - t0);
    expect(await nsA.isLocked(CT)).toBe(false);
    for (const cmd of ["iptables-save", "ip6tables-save"]) expect(await rules(cmd)).toMatch(/^-A CRIU -j RETURN\n-A CRIU -m mark/m);
    expect((await ping(CT_IP, 3)).received).toBeGreaterThanOrEqual(2);
    const t1 = performance.now();
    await nsA.unlock(CT);
    measured.removeOpenedLockMs = Math.round(performance.now() - t1);
    for (const cmd of ["iptables-save", "ip6tables-save"]) expect(await rules(cmd)).not.toContain("CRIU");
    // Opening an unlocked namespace is a no-op, not an error.
    await exec("sh", ["-c", CRIU_NETWORK_SCRIPT, "ferry-network-lock"], {
      env: { ...process.env, CRTOOLS_SCRIPT_ACTION: "network-unlock", FERRY_NETNS: path, FERRY_UNLOCK: "open" },
    });
    expect(await rules("iptables-save")).not.toContain("CRIU");
  });

  it("where the kernel refuses the hold rule, the lock is CRIU's rules alone", async () => {
    const ns = `${PREFIX}fallback`;
    await exec("ip", ["netns", "add", ns]);
    try {
      // A target this kernel does not have stands for a kernel without NFQUEUE.
      const script = CRIU_NETWORK_SCRIPT.replace("-j NFQUEUE", "-j FERRYNOSUCHTARGET");
      expect(script).not.toBe(CRIU_NETWORK_SCRIPT);
      await exec("sh", ["-c", script, "ferry-network-lock"], {
        env: { ...process.env, CRTOOLS_SCRIPT_ACTION: "network-lock", FERRY_NETNS: `/run/netns/${ns}` },
      });
      const saved = (await exec("nsenter", [`--net=/run/netns/${ns}`, "iptables-save", "-t", "filter"])).stdout;
      expect(saved.match(/^-A (INPUT|OUTPUT) -j CRIU$/gm)).toHaveLength(2);
      expect(saved.match(/^-A CRIU .*$/gm)).toEqual(["-A CRIU -m mark --mark 0xc114 -j ACCEPT", "-A CRIU -j DROP"]);
    } finally {
      await exec("ip", ["netns", "del", ns]);
    }
  });

  it("refuses a second namespace with the same IP on a host, and a clashing re-create; an identical one is idempotent", async () => {
    const fe = await expectFerryError(nsA.create("other", { ipCidr: `${CT_IP}/24` }), "AlreadyExists", "network.ip_cidr");
    expect(fe.message).toContain(`${a.netnsPrefix}${CT}`);
    expect(await nsA.exists("other")).toBe(false);
    await expectFerryError(nsA.create(CT, { ipCidr: "10.77.0.11/24", ofport: CT_OFPORT }), "AlreadyExists", "container");
    const again = await nsA.create(CT, { ipCidr: `${CT_IP}/24`, ofport: CT_OFPORT });
    expect(again.ofport).toBe(CT_OFPORT);
  });

  it("of two creates with one IP at once, one wins; a namespace made outside Ferry still holds its IP", async () => {
    const results = await Promise.allSettled([
      nsB.create("twin-1", { ipCidr: "10.77.0.60/24" }),
      nsB.create("twin-2", { ipCidr: "10.77.0.60/24" }),
    ]);
    const won = results.filter((r) => r.status === "fulfilled");
    const lost = results.filter((r): r is PromiseRejectedResult => r.status === "rejected");
    expect(won).toHaveLength(1);
    expect(lost).toHaveLength(1);
    expect((lost[0]!.reason as FerryError).code).toBe("AlreadyExists");
    expect((lost[0]!.reason as FerryError).message).toContain("network.ip_cidr");
    expect((await Promise.all([nsB.exists("twin-1"), nsB.exists("twin-2")])).filter(Boolean)).toHaveLength(1);
    for (const c of ["twin-1", "twin-2"]) await nsB.clear(c);
    // Cleared: the address is free again.
    await nsB.create("twin-2", { ipCidr: "10.77.0.60/24" });
    await nsB.clear("twin-2");

    // A namespace of the prefix that this NetNs did not make (another agent process, before a
    // restart) is read once, and its address refused.
    const outside = `${b.netnsPrefix}outside`;
    await exec("ip", ["netns", "add", outside]);
    try {
      await exec("ip", ["-n", outside, "-batch", "-"], { input: "addr add 10.77.0.61/24 dev lo\n" });
      await expectFerryError(nsB.create("inside", { ipCidr: "10.77.0.61/24" }), "AlreadyExists", "network.ip_cidr");
      expect(await nsB.exists("inside")).toBe(false);
    } finally {
      await exec("ip", ["netns", "del", outside]);
    }
    // Gone: its address is free.
    await nsB.create("inside", { ipCidr: "10.77.0.61/24" });
    await nsB.clear("inside");
  });

  it("rejects bad names and inputs with InvalidArgument naming the field", async () => {
    await expectFerryError(nsA.create("Bad_Name", { ipCidr: "10.77.0.20/24" }), "InvalidArgument", "container");
    await expectFerryError(nsA.create("../etc", { ipCidr: "10.77.0.20/24" }), "InvalidArgument", "container");
    await expectFerryError(nsA.create("ok", { ipCidr: "10.77.0.300/24" }), "InvalidArgument", "network.ip_cidr");
    await expectFerryError(nsA.create("ok", { ipCidr: "10.77.0.20/24", mac: "03:00:00:00:00:01" }), "InvalidArgument", "network.mac");
    await expectFerryError(nsA.create("ok", { ipCidr: "10.77.0.20/24", ofport: 70000 }), "InvalidArgument", "network.ofport");
    await expectFerryError(ovsA.ensureBridge("br;rm -rf /"), "InvalidArgument", "bridge");
    await expectFerryError(ovsA.addPort(a.bridge, "Bad Port"), "InvalidArgument", "port");
    const flow = { table: 0, priority: 10, cookie: 7, match: "ip", actions: "drop" };
    await expectFerryError(
      ovsA.setFlows(a.bridge, [{ ...flow, match: "ip\nadd table=0,actions=NORMAL" }]),
      "InvalidArgument",
      "flows[0].match",
    );
    await expectFerryError(ovsA.setFlows(a.bridge, [flow, { ...flow, actions: "output:1;reboot" }]), "InvalidArgument", "flows[1].actions");
    await expectFerryError(ovsA.setFlows(a.bridge, [{ ...flow, match: "ip,cookie=0x1" }]), "InvalidArgument", "flows[0].match");
    await expectFerryError(ovsA.setFlows(a.bridge, [{ ...flow, cookie: 0 }]), "InvalidArgument", "flows[0].cookie");
    await expectFerryError(ovsA.deleteFlows(a.bridge, -1), "InvalidArgument", "cookie");
    await expectFerryError(ovsA.addVxlanPort(a.bridge, "vx9", { remoteIp: "1.2.3", vni: 1 }), "InvalidArgument", "remote_ip");
    await expectFerryError(ovsA.ofportOf("nosuchport"), "NotFound");
  });

  it("Ovs: bridges, ports and flows are idempotent; setFlows replaces by cookie; deleteFlows removes by cookie", async () => {
    await ovsA.ensureBridge("br-scratch");
    await ovsA.ensureBridge("br-scratch");
    const vx = await ovsA.addVxlanPort("br-scratch", "vx-s", { remoteIp: "172.31.0.99", localIp: a.underlayIp, vni: 99, ofport: 900 });
    expect(vx).toBe(900);
    expect(await ovsA.addVxlanPort("br-scratch", "vx-s", { remoteIp: "172.31.0.99", localIp: a.underlayIp, vni: 99, ofport: 900 })).toBe(
      900,
    );
    expect(await ovsA.ofportOf("vx-s")).toBe(900);
    // what ovs-vsctl would have written: the tags, the interface's type and options
    expect((await a.vsctl(["get", "Port", "vx-s", "external_ids:ferry-owner"])).trim().replace(/"/g, "")).toBe("ferry-test");
    expect((await a.vsctl(["get", "Interface", "vx-s", "type", "options:key", "options:remote_ip"])).trim().split("\n")).toEqual([
      "vxlan",
      '"99"',
      '"172.31.0.99"',
    ]);
    // a port belongs to one bridge: adding it to another, or deleting it from another, is refused
    await expectFerryError(ovsA.addPort(a.bridge, "vx-s"), "AlreadyExists", "port");
    await expectFerryError(ovsA.deletePort(a.bridge, "vx-s"), "FailedPrecondition", "port");
    await expectFerryError(ovsA.addPort("br-nosuch", "vx-t"), "NotFound");
    await expectFerryError(new Ovs({ ...a.ovs, dbSock: "/run/ferry/no-such-db.sock" }).ofportOf("vx-s"), "Unavailable");
    const f = (cookie: number, nw: string, out: number) => ({
      table: 0,
      priority: 50,
      cookie,
      match: `ip,nw_dst=${nw}`,
      actions: `output:${out}`,
    });
    await ovsA.setFlows("br-scratch", [f(0x11, "10.1.0.1", 900), f(0x11, "10.1.0.2", 900), f(0x22, "10.2.0.1", 900)]);
    await ovsA.setFlows("br-scratch", [{ ...f(0x11, "10.1.0.3", 900), table: 3 }]);
    const flows = await ovsA.listFlows("br-scratch");
    expect(flows.filter((x) => x.cookie === 0x11)).toEqual([
      { table: 3, priority: 50, cookie: 0x11, match: "ip,nw_dst=10.1.0.3", actions: "output:900" },
    ]);
    expect(flows.filter((x) => x.cookie === 0x22)).toHaveLength(1);
    // a port named, not numbered: ovs-ofctl needs the port table (the slower way) and gets it
    await ovsA.setFlows("br-scratch", [{ ...f(0x33, "10.3.0.1", 0), match: "in_port=vx-s,ip", actions: "output:vx-s" }]);
    expect((await ovsA.listFlows("br-scratch")).filter((x) => x.cookie === 0x33)).toEqual([
      { table: 0, priority: 50, cookie: 0x33, match: "ip,in_port=900", actions: "output:900" },
    ]);
    await expect(ovsA.setFlows("br-scratch", [{ ...f(0x33, "10.3.0.1", 0), actions: "output:no-such-port" }])).rejects.toThrow(
      /unknown port/,
    );
    await ovsA.deleteFlows("br-scratch", 0x22);
    await ovsA.deleteFlows("br-scratch", 0x22);
    expect((await ovsA.listFlows("br-scratch")).filter((x) => x.cookie === 0x22)).toHaveLength(0);
    await ovsA.deletePort("br-scratch", "vx-s");
    await ovsA.deletePort("br-scratch", "vx-s");
    await expectFerryError(ovsA.ofportOf("vx-s"), "NotFound");
    const ids = (await a.vsctl(["get", "Bridge", "br-scratch", "external_ids:ferry-owner"])).trim();
    expect(ids.replace(/"/g, "")).toBe("ferry-test");
    await a.vsctl(["--if-exists", "del-br", "br-scratch"]);
  });

  it("path switch (COAT): clear on A, re-create on B with the same IP and MAC behind a lock, switch flows, unlock: the client reaches it again", async () => {
    // The client's ARP entry for the container, learnt before the move, must stay valid.
    const neighBefore = (await exec("ip", ["-n", wl.netns, "neigh", "show", CT_IP])).stdout;
    expect(neighBefore).toContain(macFromIp(CT_IP));

    let t0 = performance.now();
    const { waitMs } = await nsA.clear(CT);
    measured.netnsClearMs = Math.round(performance.now() - t0);
    measured.netnsClearWaitMs = waitMs;
    expect(await nsA.exists(CT)).toBe(false);
    await expectFerryError(ovsA.ofportOf(portNameFor(a.netnsPrefix, CT)), "NotFound");
    expect((await nsA.clear(CT)).waitMs).toBeLessThan(1000); // idempotent

    t0 = performance.now();
    const info = await nsB.create(CT, { ipCidr: `${CT_IP}/24`, ofport: CT_OFPORT }, []);
    measured.netnsCreateLockedMs = Math.round(performance.now() - t0);
    expect(info.mac).toBe(macFromIp(CT_IP));
    expect(await nsB.isLocked(CT)).toBe(true);
    const srv = await startEchoServer(info.path, "b");

    t0 = performance.now();
    await switchTo(b, CT_OFPORT);
    measured.pathSwitchAllHostsMs = Math.round(performance.now() - t0);
    const onClient = (await new Ovs(client.ovs).listFlows(client.bridge)).filter((f) => f.cookie === cookieForIp(CT_IP));
    expect(onClient.map((f) => f.actions)).toEqual([`output:${client.vxlanPortTo(b).ofport}`, `output:${client.vxlanPortTo(b).ofport}`]);

    // Locked: the path leads to B but the namespace drops (a CRIU restore would unlock here).
    expect((await ping(CT_IP, 2)).received).toBe(0);
    await expect(tcpRoundTrip(CT_IP, "x", 800)).rejects.toThrow();
    await nsB.unlock(CT);
    const p = await ping(CT_IP, 5);
    expect(p.received).toBeGreaterThanOrEqual(4);
    expect(await tcpRoundTrip(CT_IP, "again")).toBe("b:again");
    expect((await exec("ip", ["-n", wl.netns, "neigh", "show", CT_IP])).stdout).toContain(macFromIp(CT_IP));
    await stopServer(srv);
  });

  it("a locked namespace with holds keeps what reaches it and hands it over on release; unlock and clear drop it", async () => {
    const warnings: string[] = [];
    const holds = new PacketHolds((msg) => warnings.push(msg));
    const nsH = new NetNs({ prefix: b.netnsPrefix, ovs: ovsB, bridge: b.bridge, hostNs: b.netns, holds });
    try {
      // The path still leads to B (previous test): re-create the namespace there, locked.
      await nsB.clear(CT);
      const info = await nsH.create(CT, { ipCidr: `${CT_IP}/24`, ofport: CT_OFPORT }, []);
      expect(await nsH.isLocked(CT)).toBe(true);

      measured.heldPingRttMs = await expectHeldUntilReleased(nsH, info.path);
      expect(await nsH.releaseHeld(CT)).toBe(0); // nothing held any more

      // Locked again, then unlocked without a release (no container took over): dropped.
      await nsH.lock(CT);
      const dropped = ping(CT_IP, 1, 2);
      await new Promise((r) => setTimeout(r, 300));
      await nsH.unlock(CT);
      expect((await dropped).received).toBe(0);
      expect((await ping(CT_IP, 3)).received).toBeGreaterThanOrEqual(2);

      // And a clear drops what it held.
      await nsH.lock(CT);
      const cleared = ping(CT_IP, 1, 2);
      await new Promise((r) => setTimeout(r, 300));
      await nsH.clear(CT);
      expect((await cleared).received).toBe(0);
      expect(warnings).toEqual([]);
    } finally {
      await holds.close();
    }
  });

  it("an agent that restarts holds its locked namespaces again, and not another host's", async () => {
    const warnings: string[] = [];
    const warn = (msg: string): void => void warnings.push(msg);
    const before = new PacketHolds(warn);
    const after = new PacketHolds(warn);
    const elsewhere = new PacketHolds(warn);
    const nsBefore = new NetNs({ prefix: b.netnsPrefix, ovs: ovsB, bridge: b.bridge, hostNs: b.netns, holds: before });
    const nsAfter = new NetNs({ prefix: b.netnsPrefix, ovs: ovsB, bridge: b.bridge, hostNs: b.netns, holds: after });
    // An agent on another emulated host whose prefix also covers B's namespaces (the testbed's
    // client host has "ferry-"): the port is not on its bridge.
    const nsElsewhere = new NetNs({ prefix: b.netnsPrefix, ovs: ovsA, bridge: a.bridge, hostNs: a.netns, holds: elsewhere });
    try {
      // The path still leads to B: a destination's namespace, locked and held, then its agent dies.
      const info = await nsBefore.create(CT, { ipCidr: `${CT_IP}/24`, ofport: CT_OFPORT }, []);
      await before.close();
      expect(await nsElsewhere.holdLocked()).toEqual([]);
      expect(await nsAfter.holdLocked()).toEqual([CT]);

      // Sent while locked, after the restart: held, and handed over by the restore's release.
      await expectHeldUntilReleased(nsAfter, info.path);
      // Unlocked now: a later start holds nothing.
      expect(await nsAfter.holdLocked()).toEqual([]);
      expect(warnings).toEqual([]);
    } finally {
      await nsAfter.clear(CT);
      await Promise.all([before.close(), after.close(), elsewhere.close()]);
    }
  });

  it("both ways of joining OVS (tap, the default, and veth): create, reach by ping and TCP, clear until the device is gone, re-create at once", async () => {
    const ip = "10.77.0.30";
    for (const link of ["tap", "veth"] as const) {
      const ns = new NetNs({ prefix: a.netnsPrefix, ovs: ovsA, bridge: a.bridge, hostNs: a.netns, link });
      for (let round = 0; round < 2; round++) {
        const t0 = performance.now();
        const info = await ns.create("vt", { ipCidr: `${ip}/24`, ofport: 6 });
        measured[`${link}CreateMs${round}`] = Math.round(performance.now() - t0);
        if (link === "veth") {
          // the outer end stays on the host, the inner one computes its own checksums (userspace datapath)
          expect((await exec("ip", ["-d", "-n", a.netns, "link", "show", info.veth])).stdout).toMatch(/^\s+veth /m);
          expect((await exec("nsenter", [`--net=${info.path}`, "ethtool", "-k", "eth0"])).stdout).toMatch(/^tx-checksumming: off/m);
        } else {
          expect((await exec("ip", ["-d", "-n", `${a.netnsPrefix}vt`, "link", "show", "eth0"])).stdout).toMatch(/^\s+tun type tap/m);
        }
        await tb.route(ip, a, 6);
        expect((await ping(ip, 3)).received).toBeGreaterThanOrEqual(2);
        const srv = await startEchoServer(info.path, link);
        expect(await tcpRoundTrip(ip, "hello")).toBe(`${link}:hello`);
        await stopServer(srv);
        const c = await ns.clear("vt");
        measured[`${link}ClearWaitMs${round}`] = c.waitMs;
        expect((await exec("ip", ["-n", a.netns, "link", "show", info.veth], { okCodes: [0, 1] })).exitCode).toBe(1);
        await expectFerryError(ovsA.ofportOf(info.veth), "NotFound");
      }
    }
  });

  it("a testbed made elsewhere is torn down by prefix and host names (testbed-down)", async () => {
    const prefix2 = `${PREFIX}x-`;
    const tb2 = await Testbed.create({ prefix: prefix2, underlayNet: "172.31.1" });
    try {
      const solo = await tb2.createHost({ name: "solo" });
      await solo.run("ip", ["link", "show", "br-phy"]);
      await Testbed.destroyExisting({ prefix: prefix2 }, ["solo"]);
      expect((await readdir("/run/netns")).filter((n) => n.startsWith(prefix2))).toEqual([]);
      expect((await ourProcesses()).filter((p) => p.includes(prefix2))).toEqual([]);
    } finally {
      await tb2.destroy();
    }
  });

  it("destroy removes every namespace, OVS process, link and state dir, and is safe twice", async () => {
    const rootLinksBefore = (await exec("ip", ["-br", "link"])).stdout;
    expect((await ourProcesses()).length).toBe(6); // ovsdb-server + ovs-vswitchd on 3 hosts
    const t0 = performance.now();
    await tb.destroy();
    measured.testbedDestroyMs = Math.round(performance.now() - t0);
    await tb.destroy();
    expect((await readdir("/run/netns")).filter((n) => n.startsWith(PREFIX))).toEqual([]);
    expect(await ourProcesses()).toEqual([]);
    expect((await readdir("/run/ferry").catch(() => [] as string[])).filter((n) => n.startsWith(PREFIX))).toEqual([]);
    // nothing was ever created in the root namespace, and nothing is left there
    expect((await exec("ip", ["-br", "link"])).stdout).toBe(rootLinksBefore);
    expect((await exec("ip", ["-br", "link"])).stdout).not.toMatch(/^(fv|fw|ul)[0-9a-f]/m);
  });
});
