// The edge testbed on one machine: `make testbed-up` / `make testbed-down`.
//
//   ferry-edge-a   ferry-edge-b   ferry-edge-c   ferry-client-host     each: its own ovsdb-server +
//     agent          agent          agent          agent (cordoned)    ovs-vswitchd (userspace) and
//        \_____________|______________|_______________/                a ferry-agent
//                 VXLAN mesh, built by the controller                  underlay 172.31.0.0/24
//                                                                      (ferry-underlay); the root
//   ferry-client (10.77.0.100/24): the client workload, a Ferry        namespace at .254 runs the
//   container on the client host, so that the controller programs      controller
//   every switch, the client's too, when a service moves.
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rm, rmdir, writeFile } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";
import * as agentApi from "@ferry/api/agent";
import * as controllerApi from "@ferry/api/controller";
import { ControllerServiceService } from "@ferry/api/controller";
import { agentServiceDefinition } from "@ferry/agent";
import { connect, exec, isRunning, loadTls, tlsFilesIn, type Security } from "@ferry/common";
import { REPO_ROOT, Testbed, pushImage, spawnAgent, spawnDetached, stopPid, type DetachedOptions } from "@ferry/testbed";

export const PREFIX = "ferry-";
export const EDGES = ["edge-a", "edge-b", "edge-c"];
export const CLIENT_HOST = "client-host";
const HOSTS = [...EDGES, CLIENT_HOST];
export const CLIENT_NETNS = "ferry-client";
export const CLIENT_IP = "10.77.0.100";
export const UNDERLAY = "172.31.0";
const DIR = path.join(REPO_ROOT, ".ferry/testbed");
const CERTS = path.join(REPO_ROOT, ".ferry/certs");
const STATE = path.join(DIR, "state.json");
const CONTROLLER_PORT = 7440;

interface State {
  prefix: string;
  hosts: string[];
  workloads: string[];
  pids: Record<string, number>;
  /** The process that holds the testbed (`up({ hold: true })`): `down()` from any other refuses while it lives. */
  holder?: number;
}

/** {@link up} found another testbed up: not ours to tear down. */
export class TestbedBusyError extends Error {}

/** Options of {@link up}; `make testbed-up` and `make demo` pass none. */
export interface UpOptions {
  /**
   * Hold the testbed for this process (the benchmark): a `down()` from another process (say, a
   * `make demo` started meanwhile, whose `up()` failed) refuses to tear it down while we live.
   */
  hold?: boolean;
  /** Called once the hosts and the underlay exist, before any agent starts (e.g. sshd, link shaping). */
  beforeAgents?: (tb: Testbed) => Promise<void>;
  /** Stop half-way (e.g. on SIGINT): up() rejects, and what it made is recorded for `down()`. */
  signal?: AbortSignal;
}

const say = (s: string): void => void process.stdout.write(`testbed: ${s}\n`);

function security(name: string): Security {
  return { mode: "mtls", tls: loadTls(tlsFilesIn(CERTS, name)) };
}

export function controllerClient(): ReturnType<typeof connect<typeof ControllerServiceService>> {
  return connect(ControllerServiceService, controllerApi as unknown as Record<string, unknown>, {
    address: `127.0.0.1:${CONTROLLER_PORT}`,
    security: security("admin"),
    serverName: "controller",
  });
}

async function saveState(st: State): Promise<void> {
  await writeFile(STATE, JSON.stringify(st, null, 2));
}

/** Bring the testbed up; returns its hosts (namespaces, OVS, underlay) for callers that need them. */
export async function up(opts: UpOptions = {}): Promise<Testbed> {
  if (existsSync(STATE)) throw new TestbedBusyError(`a testbed is already up (${STATE}); run \`make testbed-down\` first`);
  const t0 = performance.now();
  await mkdir(DIR, { recursive: true });
  await exec("bash", [
    path.join(REPO_ROOT, "deploy/certs.sh"),
    CERTS,
    "controller:controller",
    "admin:admin",
    ...HOSTS.map((e) => `agent:${e}`),
  ]);
  const st: State = { prefix: PREFIX, hosts: HOSTS, workloads: [CLIENT_NETNS], pids: {}, ...(opts.hold ? { holder: process.pid } : {}) };
  await saveState(st); // first: a failure half-way is still torn down by `down`
  const tb = await Testbed.create({ prefix: PREFIX, underlayNet: UNDERLAY, meshEdges: false, detachDaemons: true });
  for (const h of HOSTS) await tb.createHost({ name: h });
  await tb.attachRoot();
  say(`hosts up: ${HOSTS.map((h) => PREFIX + h).join(", ")}`);
  opts.signal?.throwIfAborted();
  if (opts.beforeAgents) await opts.beforeAgents(tb);

  // Each process is recorded as soon as it exists, not once ready: a `down()` meanwhile stops it too.
  const recorded = (key: string): DetachedOptions => ({
    ...(opts.signal ? { signal: opts.signal } : {}),
    onSpawn: async (pid: number): Promise<void> => {
      st.pids[key] = pid;
      await saveState(st);
    },
  });
  for (const h of HOSTS) {
    opts.signal?.throwIfAborted();
    await spawnAgent({
      host: tb.host(h),
      certsDir: CERTS,
      stateDir: path.join(DIR, h),
      detachedLog: path.join(DIR, `${h}.log`),
      detached: recorded(`agent-${h}`),
      // The client host's one container is the client workload: /run/netns/ferry-client.
      ...(h === CLIENT_HOST ? { netnsPrefix: PREFIX } : {}),
    });
  }
  await spawnDetached(
    "controller",
    [
      process.execPath,
      path.join(REPO_ROOT, "packages/controller/dist/main.js"),
      "--listen",
      `0.0.0.0:${CONTROLLER_PORT}`,
      "--state-dir",
      path.join(DIR, "controller"),
      "--tls-dir",
      CERTS,
    ],
    path.join(DIR, "controller.log"),
    `127.0.0.1:${CONTROLLER_PORT}`,
    undefined,
    recorded("controller"),
  );
  say(`agents and controller up (mTLS, certificates in ${path.relative(REPO_ROOT, CERTS)})`);

  const admin = controllerClient();
  try {
    for (const h of HOSTS) {
      const host = tb.host(h);
      await admin.registerHost({ name: h, address: `${host.underlayIp}:7441`, tlsServerName: h, underlayIp: host.tunnelIp });
    }
    const digest = await importTestkit(tb);
    say(`image testkit (${digest.slice(0, 19)}…) on ${HOSTS.join(", ")}`);
    const client = {
      host: CLIENT_HOST,
      spec: { name: "client", image: "testkit", args: ["/bin/busybox", "sleep", "999999999"], network: { ipCidr: `${CLIENT_IP}/24` } },
    };
    // The client host's agent owns every "ferry-*" namespace (its prefix is "ferry-", so that the
    // client is ferry-client): a test's own testbed ("ferry-t<hex>-client-wl", also .100) running
    // meanwhile makes it refuse the address. Such a test ends soon: wait for it, up to a minute.
    for (let i = 0; ; i++) {
      try {
        await admin.runContainer(client);
        break;
      } catch (e) {
        if (i >= 30 || !/already used on this host by namespace ferry-t/.test((e as Error).message)) throw e;
        if (i === 0)
          say(`${CLIENT_IP} is held by a test's namespace (${(e as Error).message.split("namespace ")[1]?.split(" ")[0]}); waiting`);
        await new Promise((r) => setTimeout(r, 2000));
      }
    }
    // Nothing else lands on the client host: it is there to hold the client.
    await admin.drainHost({ name: CLIENT_HOST, cordonOnly: true });
  } finally {
    admin.close();
  }
  say(`client workload ${CLIENT_NETNS} at ${CLIENT_IP}/24 on ${CLIENT_HOST} (cordoned)`);
  await writeFile(
    path.join(REPO_ROOT, ".ferry/testbed.env"),
    [
      `export FERRY_CONTROLLER=127.0.0.1:${CONTROLLER_PORT}`,
      `export FERRY_TLS_DIR=${CERTS}`,
      `export FERRY_CLIENT_NETNS=${CLIENT_NETNS}`,
      `export PATH=${path.join(REPO_ROOT, "bin")}:$PATH`,
      "",
    ].join("\n"),
  );
  say(`ready in ${((performance.now() - t0) / 1000).toFixed(1)} s: \`. .ferry/testbed.env && ferry hosts\``);
  return tb;
}

/** Build the test image and give it to every edge host's agent as "testkit". */
async function importTestkit(tb: Testbed): Promise<string> {
  const out = path.join(DIR, "testkit");
  await mkdir(out, { recursive: true });
  await exec(
    "bash",
    [path.join(REPO_ROOT, "deploy/testkit/build.sh"), path.join(out, "testkit.tar"), path.join(out, "ferry-echo-client")],
    {
      timeoutMs: 120_000,
    },
  );
  let digest = "";
  for (const e of HOSTS) {
    const c = connect(agentServiceDefinition, agentApi as unknown as Record<string, unknown>, {
      address: `${tb.host(e).underlayIp}:7441`,
      security: security("controller"),
      serverName: e,
    });
    try {
      digest = (await pushImage(c, path.join(out, "testkit.tar"), "testkit")).digest;
    } finally {
      c.close();
    }
  }
  return digest;
}

export async function down(): Promise<void> {
  const st: State = existsSync(STATE)
    ? (JSON.parse(await readFile(STATE, "utf8")) as State)
    : { prefix: PREFIX, hosts: HOSTS, workloads: [CLIENT_NETNS], pids: {} };
  if (st.holder && st.holder !== process.pid && isRunning(st.holder)) {
    throw new Error(`the testbed is held by process ${st.holder} (a benchmark?); it tears it down when it ends`);
  }
  // Containers first, through their agents: runc containers outlive the agent that made them.
  for (const e of HOSTS) {
    if (!st.pids[`agent-${e}`]) continue;
    const c = connect(agentServiceDefinition, agentApi as unknown as Record<string, unknown>, {
      address: `${UNDERLAY}.${HOSTS.indexOf(e) + 1}:7441`,
      security: security("controller"),
      serverName: e,
    });
    try {
      const { containers } = await c.listContainers({}, { timeoutMs: 5000 });
      for (const x of containers) await c.deleteContainer({ name: x.spec!.name, force: true }, { timeoutMs: 30_000 });
      if (containers.length) say(`${e}: deleted ${containers.map((x) => x.spec!.name).join(", ")}`);
    } catch (err) {
      say(`${e}: could not clean containers through the agent: ${(err as Error).message}`);
    } finally {
      c.close();
    }
  }
  for (const [what, pid] of Object.entries(st.pids)) {
    // Only a process we started: its command line names this checkout.
    const cmd = await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
    if (cmd.includes(REPO_ROOT)) await stopPid(pid);
    else if (cmd) say(`pid ${pid} (${what}) is no longer ours; left alone`);
  }
  await sweepContainers();
  await Testbed.destroyExisting({ prefix: st.prefix, underlayNet: UNDERLAY }, st.hosts, st.workloads);
  await rm(DIR, { recursive: true, force: true });
  await rm(path.join(REPO_ROOT, ".ferry/testbed.env"), { force: true });
  // Only this testbed's namespaces: tests' own testbeds ("ferry-t<hex>-...") may be up meanwhile.
  const ours = (n: string): boolean =>
    n === `${PREFIX}underlay` || st.workloads.includes(n) || st.hosts.some((h) => n === PREFIX + h || n.startsWith(`${PREFIX}${h}-`));
  const left = (await exec("ip", ["netns", "list"])).stdout
    .split("\n")
    .map((l) => l.split(" ")[0] ?? "")
    .filter(ours);
  if (left.length) throw new Error(`namespaces left behind: ${left.join(", ")}`);
  say("down: no namespace, OVS daemon, agent or controller left");
}

/**
 * What the agents could not delete, found without them: a container whose create was in flight
 * when its agent stopped (a signal mid-run) has no runc state yet, only processes, its overlay and
 * its cgroups. Its processes are known by their root filesystem, an overlay with its upper dir
 * under this testbed's directory; nothing else is touched.
 */
async function sweepContainers(): Promise<void> {
  const ourRoot = (mountinfo: string): boolean =>
    mountinfo.split("\n").some((l) => l.split(" ")[4] === "/" && l.includes(` - overlay `) && l.includes(`upperdir=${DIR}/`));
  const pids = (await readdir("/proc")).filter((p) => /^\d+$/.test(p) && Number(p) !== process.pid);
  const ours: number[] = [];
  for (const p of pids) if (ourRoot(await readFile(`/proc/${p}/mountinfo`, "utf8").catch(() => ""))) ours.push(Number(p));
  for (const p of ours) await stopPid(p, 0).catch(() => undefined);
  if (ours.length) say(`stopped ${ours.length} container process(es) no agent could delete`);
  const mounts = (await readFile("/proc/self/mountinfo", "utf8")).split("\n").map((l) => l.split(" ")[4] ?? "");
  for (const m of mounts.filter((m) => m.startsWith(`${DIR}/`)).reverse()) await exec("umount", ["-l", m], { okCodes: [0, 1, 32] });
  // Their cgroups, "/ferry-<host>-<container>" (the agents' cgroupsPath), for this testbed's containers only.
  for (const h of HOSTS) {
    const names = await readdir(path.join(DIR, h, "containers")).catch(() => [] as string[]);
    for (const ctrl of await readdir("/sys/fs/cgroup").catch(() => [] as string[])) {
      for (const n of names) await rmdir(path.join("/sys/fs/cgroup", ctrl, `ferry-${h}-${n}`)).catch(() => undefined);
    }
  }
}

async function main(): Promise<void> {
  const { positionals } = parseArgs({ allowPositionals: true, options: {} });
  const cmd = positionals[0];
  if (cmd === "up") {
    try {
      await up();
    } catch (e) {
      if (e instanceof TestbedBusyError) throw e; // someone else's testbed: leave it up
      say(`up failed, tearing down: ${(e as Error).message}`);
      await down().catch((x: unknown) => say(`down: ${(x as Error).message}`));
      throw e;
    }
  } else if (cmd === "down") await down();
  else throw new Error("usage: testbed.ts up|down");
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((e: unknown) => {
    process.stderr.write(`testbed: ${(e as Error).message}\n`);
    process.exit(1);
  });
}
