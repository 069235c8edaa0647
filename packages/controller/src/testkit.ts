// Test support: a controller over fake agents, in a temp state directory.
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ContainerState, type ContainerInfo } from "@ferry/api/agent";
import { MigrationState, type Migration } from "@ferry/api/controller";
import { FerryError, silentLogger, type Logger } from "@ferry/common";
import { createController, type Controller, type ControllerConfig } from "./controller.js";
import { FakeNetwork, type FakeAgent } from "./fake-agent.js";
import { cookieForIp } from "./sdn/index.js";

export const IMAGE = "busybox";

export interface FakeClusterOptions {
  hosts?: string[];
  /** Hosts that hold the image at start; all by default. */
  imageOn?: string[];
  /** Reuse a state directory (a restarted controller); hosts are then loaded, not registered. */
  stateDir?: string;
  net?: FakeNetwork;
  log?: Logger;
  config?: Partial<ControllerConfig>;
}

export interface FakeCluster {
  net: FakeNetwork;
  ctl: Controller;
  stateDir: string;
  agent(name: string): FakeAgent;
  /** RunContainer with defaults: image busybox, ip 10.77.0.<n>/24. */
  run(name: string, host: string, n: number, extra?: { memoryLimitBytes?: number; cpuMillicores?: number }): Promise<ContainerInfo>;
  /** Waits for the migration to end. */
  wait(id: string): Promise<Migration>;
  /** Waits until `pred` holds for the journal's record (polling). */
  until(id: string, pred: (m: Migration) => boolean, timeoutMs?: number): Promise<Migration>;
  /** Closes the controller; removes the state directory unless `keepState`. */
  close(keepState?: boolean): Promise<void>;
}

export async function fakeCluster(o: FakeClusterOptions = {}): Promise<FakeCluster> {
  const names = o.hosts ?? ["edge-a", "edge-b"];
  const net = o.net ?? new FakeNetwork();
  for (const n of names) {
    if ([...net.agents.values()].some((a) => a.name === n)) continue;
    const a = net.add(n);
    if (!o.imageOn || o.imageOn.includes(n)) a.addImage(IMAGE);
  }
  const stateDir = o.stateDir ?? (await mkdtemp(join(tmpdir(), "ferry-ctl-test-")));
  const ctl = await createController({
    listen: "127.0.0.1:0",
    security: { mode: "insecure" },
    agentSecurity: { mode: "insecure" },
    stateDir,
    log: o.log ?? silentLogger,
    connectAgent: net.connector(),
    metricsIntervalMs: 0,
    schedulePolicies: false,
    ...o.config,
  });
  if (!o.stateDir) {
    let i = 1;
    for (const n of names) {
      const a = net.byName(n);
      await ctl.hosts.register({ name: n, address: a.address, tlsServerName: n, underlayIp: `192.168.77.${i++}`, labels: {} });
    }
  }
  const until = async (id: string, pred: (m: Migration) => boolean, timeoutMs = 10_000): Promise<Migration> => {
    const t0 = Date.now();
    for (;;) {
      const m = await ctl.journal.get(id);
      if (m && pred(m)) return m;
      if (Date.now() - t0 > timeoutMs)
        throw new Error(`migration ${id}: condition not met in ${timeoutMs} ms (state ${m ? MigrationState[m.state] : "none"})`);
      await new Promise((r) => setTimeout(r, 5));
    }
  };
  return {
    net,
    ctl,
    stateDir,
    agent: (n) => net.byName(n),
    run: async (name, host, n, extra = {}) => {
      const { info } = await ctl.containers.run({
        host,
        spec: {
          name,
          image: IMAGE,
          args: ["/bin/ferry-echo", "7000"],
          env: [],
          cwd: "",
          cpuMillicores: extra.cpuMillicores ?? 250,
          memoryLimitBytes: extra.memoryLimitBytes ?? 64 * 1024 * 1024,
          network: { ipCidr: `10.77.0.${n}/24`, mac: "", gateway: "", bridge: "", ofport: 0 },
          labels: {},
        },
      });
      return info!;
    },
    wait: (id) => ctl.migrations.wait(id),
    until,
    close: async (keepState = false) => {
      ctl.close();
      if (!keepState) await rm(stateDir, { recursive: true, force: true });
    },
  };
}

/** The output port of the container's IP rule on `agent`'s overlay bridge, or undefined. */
export function flowOut(agent: FakeAgent, ip: string): number | undefined {
  const cookie = cookieForIp(ip);
  const f = (agent.flows.get("br-ferry") ?? []).find((x) => x.cookie === cookie && x.match.startsWith("ip,"));
  return f ? Number(f.actions.replace("output:", "")) : undefined;
}

export function isRunning(agent: FakeAgent, name: string): boolean {
  return agent.containers.get(name)?.state === ContainerState.CONTAINER_STATE_RUNNING;
}

/** The FerryError `p` rejects with; throws when it resolves or rejects with anything else. */
export async function refusal(p: Promise<unknown>): Promise<FerryError> {
  const r = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(r instanceof FerryError)) throw new Error(`expected a FerryError, got ${String(r)}`);
  return r;
}

/** Fake clusters a test file makes, closed together: `afterEach(() => pool.closeAll())`. */
export function clusterPool(): { cluster(o?: FakeClusterOptions): Promise<FakeCluster>; closeAll(): Promise<void> } {
  const made: FakeCluster[] = [];
  return {
    async cluster(o) {
      const c = await fakeCluster(o);
      made.push(c);
      return c;
    },
    async closeAll() {
      for (const c of made.splice(0)) await c.close();
    },
  };
}
