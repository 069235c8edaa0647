// A whole Ferry on emulated hosts for end-to-end tests: edge hosts with real agents, a real
// controller process (killable, restartable on the same state), and the admin CLI's `run()`.
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes, randomInt } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { run } from "@ferry/cli";
import { Testbed, pushImage, spawnAgent, type AgentProcess, type EmulatedHost, type Workload } from "@ferry/testbed";
import { REPO, makePki, type TestPki } from "./certs.js";
import { testkit } from "./agents.js";

export interface Cluster {
  tb: Testbed;
  pki: TestPki;
  work: string;
  agents: Map<string, AgentProcess>;
  clientHost: EmulatedHost;
  workload: Workload;
  echoClient: string;
  controller?: ChildProcess;
  controllerPort: number;
  /** (Re)start the controller on its state dir; resolves when it serves. */
  startController(env?: NodeJS.ProcessEnv): Promise<void>;
  /** SIGKILL: no shutdown hook runs, as in a crash. */
  killController(): Promise<void>;
  /** The admin CLI against this cluster: exit status and what it printed. */
  ferry(...args: string[]): Promise<{ code: number; out: string; err: string }>;
  /** `ferry ... --json`, parsed; throws with stderr on a non-zero exit. */
  ferryJson<T>(...args: string[]): Promise<T>;
  destroy(): Promise<void>;
}

const open = new Set<Cluster>();

export async function destroyClusters(): Promise<void> {
  for (const c of [...open]) await c.destroy();
}

export async function makeCluster(edges: string[], agentEnv: Record<string, NodeJS.ProcessEnv> = {}): Promise<Cluster> {
  const sfx = randomBytes(2).toString("hex");
  const pki = await makePki(["controller:controller", "admin:admin", ...edges.map((h) => `agent:${h}`)]);
  const work = await mkdtemp(path.join(os.tmpdir(), "ferry-cluster-"));
  const tb = await Testbed.create({ prefix: `ferry-t${sfx}-`, underlayNet: `172.31.${randomInt(100, 250)}`, meshEdges: false });
  const controllerPort = randomInt(20_000, 40_000);
  const env = { FERRY_CONTROLLER: `127.0.0.1:${controllerPort}`, FERRY_TLS_DIR: pki.dir };
  const c: Cluster = {
    tb,
    pki,
    work,
    agents: new Map(),
    clientHost: undefined as unknown as EmulatedHost,
    workload: undefined as unknown as Workload,
    echoClient: "",
    controllerPort,
    async startController(extra) {
      const child = spawn(
        process.execPath,
        [
          "--conditions=source",
          "--import",
          "tsx",
          path.join(REPO, "packages/controller/src/main.ts"),
          "--listen",
          `127.0.0.1:${controllerPort}`,
          "--state-dir",
          path.join(work, "controller"),
          "--tls-dir",
          pki.dir,
          "--metrics-interval",
          "1000",
        ],
        { cwd: REPO, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...extra } },
      );
      c.controller = child;
      let log = "";
      child.stderr.on("data", (d: Buffer) => (log = (log + d.toString()).slice(-8000)));
      await new Promise<void>((resolve, reject) => {
        let out = "";
        child.stdout.on("data", (d: Buffer) => {
          out += d.toString();
          if (/ready port=/.test(out)) resolve();
        });
        child.once("exit", (code) => reject(new Error(`controller exited with ${code}: ${log}`)));
      });
    },
    async killController() {
      const child = c.controller;
      if (!child || child.exitCode !== null || child.signalCode !== null) return;
      const gone = new Promise((r) => child.once("exit", r));
      child.kill("SIGKILL");
      await gone;
    },
    async ferry(...args) {
      let out = "";
      let err = "";
      const code = await run(args, env, { out: (s) => (out += s), err: (s) => (err += s) });
      return { code, out, err };
    },
    async ferryJson<T>(...args: string[]) {
      const r = await c.ferry(...args, "--json");
      if (r.code !== 0) throw new Error(`ferry ${args.join(" ")} exited ${r.code}: ${r.err}`);
      return JSON.parse(r.out) as T;
    },
    async destroy() {
      open.delete(c);
      // Containers through the CLI first (their runc processes outlive the agents).
      const ps = await c.ferry("ps", "--json").catch(() => ({ code: 1, out: "[]", err: "" }));
      if (ps.code === 0) {
        for (const x of JSON.parse(ps.out) as { info?: { spec?: { name?: string } } }[]) {
          if (x.info?.spec?.name) await c.ferry("rm", x.info.spec.name, "--force");
        }
      }
      await c.killController();
      for (const a of c.agents.values()) await a.stop();
      await tb.destroy();
      await rm(work, { recursive: true, force: true });
      await pki.cleanup();
    },
  };
  open.add(c);
  try {
    for (const h of edges) await tb.createHost({ name: h });
    c.clientHost = await tb.createHost({ name: "client", role: "client" });
    await tb.attachRoot();
    c.workload = await tb.addWorkload(c.clientHost, { name: "wl", ipCidr: "10.77.0.100/24", ofport: 10 });
    await tb.routeSubnet(c.clientHost, "10.77.0.0/24", tb.host(edges[0]!));
    const kit = await testkit();
    c.echoClient = kit.client;
    for (const h of edges) {
      const a = await spawnAgent({
        host: tb.host(h),
        certsDir: pki.dir,
        stateDir: path.join(work, h),
        fromSource: true,
        ...(agentEnv[h] ? { env: agentEnv[h] } : {}),
        ...(process.env.FERRY_TEST_LOGS ? { onLog: (l: string) => process.stderr.write(`[${h}] ${l}\n`) } : {}),
      });
      c.agents.set(h, a);
    }
    await c.startController();
    for (const h of edges) {
      const host = tb.host(h);
      const r = await c.ferry("host", "add", h, `${host.underlayIp}:7441`, "--underlay-ip", host.tunnelIp);
      if (r.code !== 0) throw new Error(`host add ${h}: ${r.err}`);
    }
    // The image on every edge host but the last: migrations to the last one are full (the image
    // travels too), the others partial.
    const { connect } = await import("@ferry/common");
    const agentApi = await import("@ferry/api/agent");
    const { agentServiceDefinition } = await import("@ferry/agent");
    for (const h of edges.slice(0, -1)) {
      const client = connect(agentServiceDefinition, agentApi as unknown as Record<string, unknown>, {
        address: c.agents.get(h)!.address,
        security: pki.security("controller"),
        serverName: h,
      });
      try {
        await pushImage(client, kit.tar, "testkit");
      } finally {
        client.close();
      }
    }
  } catch (e) {
    await c.destroy().catch(() => undefined);
    throw e;
  }
  return c;
}

/** The checking echo client in the cluster's client workload namespace. */
export function echoClient(
  c: Cluster,
  ip: string,
  rate = 100_000,
): { child: ChildProcess; stderr: () => string; done: Promise<{ code: number | null; out: string }> } {
  const child = spawn("nsenter", [`--net=${c.workload.netnsPath}`, c.echoClient, ip, "7000", "--rate", String(rate), "--drain", "15"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let err = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const done = new Promise<{ code: number | null; out: string }>((resolve) => child.on("close", (code) => resolve({ code, out })));
  return { child, stderr: () => err, done };
}
