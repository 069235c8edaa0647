// Ferry vs the COAT baseline, COAT's experiments on the real edge testbed (see bench/README.md).
//
//   npx tsx --conditions=source bench/run.ts [--runs 10] [--parallel-reps 6] [--only sockperf,iperf,parallel]
//                                            [--out bench/results] [--no-shaping]
//
// World: deploy/testbed.ts `up()` — edge-a, edge-b, edge-c and client-host (namespaces, own OVS
// each), a real ferry-agent on every host, all registered with a real controller process, which
// builds the VXLAN mesh and programs every host's flows; the client workload is the Ferry
// container "client" (netns ferry-client, 10.77.0.100) on the cordoned client host. The benchmark
// adds sshd on edge-a/edge-b (baseline) and the delay wires (shaping.ts), and always `down()`s.
//
// Per experiment, each run is done two ways, interleaved (baseline, ferry, baseline, ferry...),
// each on a fresh container created through Ferry (`ferry run`, not measured) on edge-a:
//   baseline  deploy/coat/coat-migrate.sh in the client host's namespace: COAT's steps over SSH
//             (no Ferry involved); afterwards the container is deleted where it ended (runc on
//             edge-b) and forgotten by Ferry (`ferry rm --force`)
//   ferry     `bin/ferry migrate NAME --to edge-b --json` (controller → agents); then `ferry rm`
// (a) sockperf ping-pong RTT around the migration; COAT's delays: edge-a 20 ms, edge-b and client 2 ms
// (b) iperf3 -R throughput in 100 ms intervals; COAT's rates: edge-a 100, edge-b and client 500 Mbit/s
// (c) MIRA's parallel migrations: N = 1..4 `ferry migrate` at once (no shaping), first start → last end.
// The root namespace (controller, CLI) gets the client host's shape: see bench/README.md.
// Writes <out>/latest.json and the SVG charts.
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Migration as MigrationMsg } from "@ferry/api/controller";
import { exec } from "@ferry/common";
import type { EmulatedHost } from "@ferry/testbed";
import { CLIENT_NETNS, TestbedBusyError, controllerClient, down, up } from "../deploy/testbed.js";
import { writeCharts } from "./charts.js";
import { COAT_SHAPES, Shaper } from "./shaping.js";
import { SshFleet } from "./sshd.js";
import {
  busyCpuMs,
  median,
  p90,
  parseIperf,
  parseSockperfLog,
  round,
  rttDisruptionMs,
  throughputDisruptionMs,
  type RttSample,
  type ThroughputSample,
} from "./stats.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const { values: flags } = parseArgs({
  options: {
    runs: { type: "string", default: "10" },
    "parallel-reps": { type: "string", default: "6" },
    only: { type: "string", default: "sockperf,iperf,parallel" },
    out: { type: "string", default: path.join(REPO, "bench/results") },
    "no-shaping": { type: "boolean", default: false },
  },
});
const RUNS = Number(flags.runs);
const PAR_REPS = Number(flags["parallel-reps"]);
const ONLY = new Set(flags.only.split(","));
const PRE_S = 3; // client traffic before the migration starts
const CLIENT_S = 10; // sockperf / iperf3 duration: PRE_S + the migration + what follows
const FERRY = path.join(REPO, "bin/ferry");
const FERRY_ENV = { ...process.env, FERRY_CONTROLLER: "127.0.0.1:7440", FERRY_TLS_DIR: path.join(REPO, ".ferry/certs") };
const CLIENT_NETNS_PATH = `/run/netns/${CLIENT_NETNS}`;

type Way = "baseline" | "ferry";
interface StepOut {
  name: string;
  ms: number;
  inDowntime?: boolean;
  group?: string;
  /** Ferry: the agent-reported work time of the step (details.work_ms). */
  workMs?: number;
  /** Ferry: the step's details as recorded (work_ms, rpc_calls:<host>, rpc_min_ms:<host>, ...). */
  details?: Record<string, number>;
  realMs?: number;
  sshMs?: number;
}
interface RunRecord {
  experiment: "sockperf" | "iperf";
  way: Way;
  run: number;
  container: string;
  migrationId?: string;
  totalMs: number;
  downtimeMs: number;
  controlOverheadMs: number;
  /** Ferry: wall time of the `ferry migrate` process (CLI start-up and the final GetMigration included). */
  cliWallMs?: number;
  disruptionMs: number;
  steps: StepOut[];
  /** Seconds from the client's start to the migration's start and end. */
  migrationAtS: number;
  migrationEndS: number;
  rtt?: RttSample[];
  throughput?: ThroughputSample[];
  error?: string;
}

/** `ferry ... --json` Migration (proto3 JSON: zero, false and empty fields are left out). */
interface MigrationJson {
  id: string;
  state?: string;
  totalMs?: number;
  downtimeMs?: number;
  controlOverheadMs?: number;
  bytesTransferred?: number | string;
  createdAt?: string;
  finishedAt?: string;
  error?: string;
  steps?: { name: string; durationMs?: number; inDowntime?: boolean; group?: string; details?: Record<string, number> }[];
}

const log = (msg: string, data: Record<string, unknown> = {}): void => {
  process.stderr.write(
    `[bench ${new Date().toISOString().slice(11, 19)}] ${msg} ${Object.keys(data).length ? JSON.stringify(data) : ""}\n`,
  );
};
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ---- resources, torn down in reverse whatever happens (the testbed's down() last) ---------------
const cleanups: Array<{ what: string; f: () => Promise<unknown> }> = [];
let cleaning: Promise<void> | undefined;
function cleanupAll(): Promise<void> {
  cleaning ??= (async () => {
    for (const c of cleanups.splice(0).reverse()) {
      try {
        await c.f();
      } catch (e) {
        log("cleanup failed", { what: c.what, error: (e as Error).message });
      }
    }
  })();
  return cleaning;
}
/** Aborted on a signal; the testbed's up() stops at its next step and is awaited before cleaning up. */
const stopping = new AbortController();
let bringingUp: Promise<unknown> | undefined;
for (const sig of ["SIGINT", "SIGTERM"] as const) {
  process.once(sig, () => {
    log(`${sig}: cleaning up`);
    stopping.abort();
    void (bringingUp ?? Promise.resolve())
      .catch(() => undefined)
      .then(cleanupAll)
      .finally(() => process.exit(130));
  });
}

/** The admin CLI; its stdout. Rejects (ExecError with stderr) on a non-zero exit. */
async function ferry(args: string[], timeoutMs = 180_000): Promise<string> {
  return (await exec(FERRY, args, { env: FERRY_ENV, timeoutMs })).stdout;
}

/** `ferry migrate NAME --to H --json`: the final record and the CLI process's wall time. */
async function ferryMigrate(name: string, to: string): Promise<{ m: MigrationJson; cliWallMs: number; t0: number; t1: number }> {
  const t0 = performance.now();
  const out = await ferry(["migrate", name, "--to", to, "--json"]);
  const t1 = performance.now();
  const m = JSON.parse(out) as MigrationJson;
  if (m.state !== "MIGRATION_STATE_SUCCEEDED") throw new Error(`migration ${m.id} ${m.state}: ${m.error ?? ""}`);
  return { m, cliWallMs: t1 - t0, t0, t1 };
}

/** Start a migration over the controller's API and wait for its end on the watch stream. */
async function migrateViaApi(admin: ReturnType<typeof controllerClient>, name: string, to: string): Promise<MigrationJson> {
  const { migration } = await admin.startMigration({ container: name, destination: to });
  for await (const _ of admin.watchMigration({ id: migration!.id })) {
    /* every step's change; the stream ends with the migration */
  }
  const m = MigrationMsg.toJSON((await admin.getMigration({ id: migration!.id })).migration!) as MigrationJson;
  if (m.state !== "MIGRATION_STATE_SUCCEEDED") throw new Error(`migration ${m.id} ${m.state}: ${m.error ?? ""}`);
  return m;
}

/** A child process in a namespace; resolves with its output when it exits. */
function inNetns(
  netnsPath: string,
  cmd: string,
  args: string[],
): { done: Promise<{ code: number | null; out: string; err: string }>; kill: () => void } {
  const child = spawn("nsenter", [`--net=${netnsPath}`, cmd, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const done = new Promise<{ code: number | null; out: string; err: string }>((resolve) =>
    child.on("close", (code) => resolve({ code, out, err })),
  );
  return { done, kill: () => child.kill("SIGTERM") };
}

/** Overlay addresses for the runs' containers: 10.77.0.10-99 and .101-.250 (.100 is the client), cycling. */
const IPS = [...Array.from({ length: 90 }, (_, i) => 10 + i), ...Array.from({ length: 150 }, (_, i) => 101 + i)].map((o) => `10.77.0.${o}`);
let ipCounter = 0;
const nextIp = (): string => IPS[ipCounter++ % IPS.length]!;

async function main(): Promise<void> {
  const tStart = performance.now();
  const sfx = randomBytes(2).toString("hex");
  const work = path.join(os.tmpdir(), `ferry-bench-${sfx}`);
  await mkdir(work, { recursive: true });
  cleanups.push({ what: "work dir", f: () => rm(work, { recursive: true, force: true }) });

  // The real testbed; sshd and the delay wires' binary are ready before the agents start.
  let fleet: SshFleet | undefined;
  let shaper: Shaper | undefined;
  // Whatever up() makes is torn down, last, even if it stops half-way (a signal); unless
  // another testbed was up, which is not ours.
  let ours = true;
  cleanups.unshift({ what: "testbed", f: () => (ours ? down() : Promise.resolve()) });
  const upping = up({
    hold: true,
    signal: stopping.signal,
    beforeAgents: async (t) => {
      fleet = await SshFleet.create(work);
      cleanups.push({ what: "sshd", f: () => fleet!.stop() });
      for (const n of ["edge-a", "edge-b"]) await fleet.start(t.host(n));
      shaper = await Shaper.create(t, REPO, work);
      cleanups.push({ what: "shaping", f: () => shaper!.clear() });
    },
  });
  bringingUp = upping;
  const tb = await upping.catch((e: unknown) => {
    if (e instanceof TestbedBusyError) ours = false;
    throw e;
  });
  if (!fleet || !shaper) throw new Error("testbed: the beforeAgents hook did not run");
  const sshFleet = fleet;
  const linkShaper = shaper;
  const host = (n: string): EmulatedHost => tb.host(n);
  const clientHost = host("client-host");
  const vxTo = async (on: EmulatedHost, peer: string): Promise<number> =>
    Number((await on.vsctl(["get", "Interface", `vx-${peer}`, "ofport"])).trim());
  const agentState = (h: string): string => path.join(REPO, ".ferry/testbed", h);

  // Unpack the image on every edge host (COAT's destination had it; Ferry's partial migration too).
  for (const e of ["edge-a", "edge-b", "edge-c"]) {
    const n = `warm-${e}`;
    await ferry(["run", n, "--host", e, "--image", "testkit", "--ip", `${nextIp()}/24`, "--", "/bin/busybox", "sleep", "1000"]);
    await ferry(["rm", n, "--force"]);
  }
  const images = JSON.parse(await ferry(["images", "--host", "edge-b", "--json"])) as { image?: { name?: string; digest?: string } }[];
  const digest = images.find((i) => i.image?.name === "testkit")?.image?.digest;
  if (!digest) throw new Error(`edge-b has no testkit image: ${JSON.stringify(images)}`);

  /** The baseline: coat-migrate.sh run in the client host's namespace; Ferry is not involved. */
  const baseline = async (
    name: string,
    ipCidr: string,
    mac: string,
  ): Promise<{ out: Record<string, unknown>; cleanup: () => Promise<void> }> => {
    const src = host("edge-a");
    const dst = host("edge-b");
    const srcWork = path.join(src.stateDir, "coat");
    const dstWork = path.join(dst.stateDir, "coat", "work");
    const dstRoot = path.join(dst.stateDir, "coat", "runc");
    const remote = path.join(REPO, "deploy/coat/coat-remote.sh");
    const a = [
      ...["--key", sshFleet.clientKey, "--name", name, "--ip", ipCidr, "--mac", mac],
      ...["--src-ip", src.underlayIp, "--src-runc-root", path.join(agentState("edge-a"), "runc")],
      ...["--src-bundle", path.join(agentState("edge-a"), "containers", name, "bundle"), "--src-netns", src.netnsPrefix + name],
      ...["--src-ovs", src.ovsDir, "--src-work", srcWork, "--src-vx-to-dst", String(await vxTo(src, "edge-b"))],
      ...["--dst-ip", dst.underlayIp, "--dst-runc-root", dstRoot, "--dst-netns", dst.netnsPrefix + name],
      ...[
        "--dst-ovs",
        dst.ovsDir,
        "--dst-work",
        dstWork,
        "--dst-lower",
        path.join(agentState("edge-b"), "store/unpacked", digest.replace("sha256:", "")),
      ],
      ...["--dst-cgroup", `/ferry-coat-edge-b-${name}`],
      ...["--client-ovs", clientHost.ovsDir, "--client-vx-to-dst", String(await vxTo(clientHost, "edge-b"))],
    ];
    await mkdir(srcWork, { recursive: true });
    const cleanup = async (): Promise<void> => {
      await dst.run("bash", [remote, "cleanup", dstRoot, name, path.join(dstWork, name)]);
      const port =
        "fv" +
        createHash("sha256")
          .update(dst.netnsPrefix + name)
          .digest("hex")
          .slice(0, 8);
      await dst.run("bash", [remote, "clear-ns", dst.netnsPrefix + name, port, dst.ovsDir]);
      // Ferry still thinks it runs on edge-a: forget it there (and its flows everywhere).
      await ferry(["rm", name, "--force"]).catch((e: unknown) =>
        log("ferry rm after baseline failed", { name, error: (e as Error).message }),
      );
      await rm(path.join(srcWork, name), { recursive: true, force: true });
      await rm(path.join(srcWork, `${name}.tar`), { force: true });
    };
    try {
      const r = await clientHost.run("bash", [path.join(REPO, "deploy/coat/coat-migrate.sh"), ...a], { timeoutMs: 120_000 });
      return { out: JSON.parse(r.stdout.trim().split("\n").pop()!) as Record<string, unknown>, cleanup };
    } catch (e) {
      await cleanup().catch(() => undefined);
      throw e;
    }
  };

  const records: RunRecord[] = [];

  /** One run: a server container on edge-a, its client in ferry-client, a migration to edge-b at PRE_S. */
  const oneRun = async (experiment: "sockperf" | "iperf", way: Way, run: number): Promise<void> => {
    const name = `${experiment === "sockperf" ? "sp" : "ip"}-${way[0]}${run}-${sfx}`;
    const ip = nextIp();
    const args =
      experiment === "sockperf"
        ? ["/usr/bin/sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", "11111"]
        : ["/usr/bin/iperf3", "-s", "-p", "5201"];
    const created = JSON.parse(
      await ferry(["run", name, "--host", "edge-a", "--image", "testkit", "--ip", `${ip}/24`, "--memory", "256m", "--json", "--", ...args]),
    ) as { info?: { spec?: { network?: { ipCidr?: string; mac?: string } } } };
    const mac = created.info?.spec?.network?.mac ?? "";
    await sleep(300);
    const fullLog = path.join(work, `${name}.csv`);
    const client =
      experiment === "sockperf"
        ? inNetns(CLIENT_NETNS_PATH, "sockperf", [
            "pp",
            "--tcp",
            "-i",
            ip,
            "-p",
            "11111",
            "-t",
            String(CLIENT_S),
            "--mps",
            "100",
            "--full-log",
            fullLog,
          ])
        : inNetns(CLIENT_NETNS_PATH, "iperf3", ["-c", ip, "-p", "5201", "-R", "-t", String(CLIENT_S), "-i", "0.1", "--json"]);
    const tClient = performance.now();
    const tClientEpoch = Date.now();
    // sockperf's timeline starts after its 0.4 s warm-up.
    const offsetS = experiment === "sockperf" ? 0.4 : 0;
    const atS = (t: number): number => (t - tClient) / 1000 - offsetS;
    await sleep(PRE_S * 1000);
    const rec: RunRecord = {
      experiment,
      way,
      run,
      container: name,
      totalMs: 0,
      downtimeMs: 0,
      controlOverheadMs: 0,
      disruptionMs: 0,
      steps: [],
      migrationAtS: atS(performance.now()),
      migrationEndS: 0,
    };
    let cleanup: () => Promise<void> = async () => void (await ferry(["rm", name, "--force"]));
    try {
      if (way === "baseline") {
        const b = await baseline(name, `${ip}/24`, mac);
        cleanup = b.cleanup;
        const o = b.out as {
          total_ms: number;
          downtime_ms: number;
          steps: { name: string; wall_ms: number; real_ms: number; ssh_ms: number }[];
        };
        rec.totalMs = o.total_ms;
        rec.downtimeMs = o.downtime_ms;
        rec.steps = o.steps.map((s) => ({ name: s.name, ms: s.wall_ms, realMs: s.real_ms, sshMs: s.ssh_ms, inDowntime: true }));
        rec.controlOverheadMs = o.steps.reduce((t, s) => t + s.ssh_ms, 0);
        rec.migrationEndS = atS(performance.now());
      } else {
        const { m, cliWallMs, t1 } = await ferryMigrate(name, "edge-b");
        rec.migrationId = m.id;
        rec.totalMs = m.totalMs ?? 0;
        rec.downtimeMs = m.downtimeMs ?? 0;
        rec.controlOverheadMs = m.controlOverheadMs ?? 0;
        rec.cliWallMs = cliWallMs;
        rec.steps = (m.steps ?? []).map((s) => ({
          name: s.name,
          ms: s.durationMs ?? 0,
          inDowntime: s.inDowntime ?? false,
          ...(s.group ? { group: s.group } : {}),
          ...(s.details?.work_ms !== undefined ? { workMs: s.details.work_ms } : {}),
          ...(s.details ? { details: s.details } : {}),
        }));
        // The controller's own clock for the window (the CLI's start-up is not the migration).
        if (m.createdAt) rec.migrationAtS = (Date.parse(m.createdAt) - tClientEpoch) / 1000 - offsetS;
        rec.migrationEndS = m.finishedAt ? (Date.parse(m.finishedAt) - tClientEpoch) / 1000 - offsetS : atS(t1);
      }
      const res = await client.done;
      if (experiment === "sockperf") {
        rec.rtt = parseSockperfLog(await readFile(fullLog, "utf8"));
        if (!rec.rtt.length) throw new Error(`sockperf logged nothing: ${res.err.slice(-300)}`);
        rec.disruptionMs = rttDisruptionMs(rec.rtt);
      } else {
        rec.throughput = parseIperf(res.out);
        if (!rec.throughput.length) throw new Error(`iperf3 reported nothing: ${res.out.slice(-300)}`);
        rec.disruptionMs = throughputDisruptionMs(rec.throughput, rec.migrationAtS);
      }
    } catch (e) {
      const x = e as Error & { stderr?: string };
      rec.error = `${x.message}${x.stderr ? `: ${x.stderr.slice(-500)}` : ""}`;
      client.kill();
      await client.done;
    } finally {
      await cleanup().catch((e: unknown) => log("run cleanup failed", { name, error: (e as Error).message }));
      await rm(fullLog, { force: true });
    }
    records.push(rec);
    log(`${experiment} ${way} #${run}`, {
      totalMs: Math.round(rec.totalMs),
      downtimeMs: Math.round(rec.downtimeMs),
      disruptionMs: Math.round(rec.disruptionMs),
      overheadMs: Math.round(rec.controlOverheadMs),
      ...(rec.cliWallMs !== undefined ? { cliWallMs: Math.round(rec.cliWallMs) } : {}),
      ...(rec.error ? { error: rec.error } : {}),
    });
  };

  for (const experiment of ["sockperf", "iperf"] as const) {
    if (!ONLY.has(experiment)) continue;
    if (!flags["no-shaping"]) await linkShaper.apply(COAT_SHAPES[experiment]);
    for (let i = 0; i < RUNS; i++) {
      await oneRun(experiment, "baseline", i);
      await oneRun(experiment, "ferry", i);
    }
    log(`${experiment}: link wires`, await linkShaper.clear());
  }

  // (c) MIRA: N migrations at once, edge-a -> edge-b and edge-c alternately, no shaping, two ways
  // per (rep, N): N `ferry migrate` processes (what an admin's scripts do; each pays Node's
  // start-up on the same 2 cores), and one admin client starting N migrations over the
  // controller's API and watching them end (the migrations alone).
  const parallel: Array<{
    n: number;
    rep: number;
    via: "cli" | "api";
    wallMs: number;
    controllerSpanMs: number;
    /** The whole machine's busy CPU time over the batch (/proc/stat), every process included. */
    cpuMs: number;
    each: number[];
    /** Per migration: each step as [name, ms, agent work ms]. */
    steps?: Array<Array<[string, number, number]>>;
    error?: string;
  }> = [];
  if (ONLY.has("parallel")) {
    const admin = controllerClient();
    try {
      for (let rep = 0; rep < PAR_REPS; rep++) {
        for (const n of [1, 2, 3, 4]) {
          for (const via of ["cli", "api"] as const) {
            const names = Array.from({ length: n }, (_, k) => `par-${n}-${rep}-${via}-${k}-${sfx}`);
            const dstOf = (k: number): string => (k % 2 ? "edge-c" : "edge-b");
            try {
              for (const nm of names) {
                await ferry([
                  "run",
                  nm,
                  "--host",
                  "edge-a",
                  "--image",
                  "testkit",
                  "--ip",
                  `${nextIp()}/24`,
                  "--memory",
                  "256m",
                  "--",
                  "/usr/local/bin/ferry-echo",
                  "7000",
                ]);
              }
              await sleep(200);
              const cpu0 = busyCpuMs();
              const t = performance.now();
              const ms =
                via === "cli"
                  ? (await Promise.all(names.map((nm, k) => ferryMigrate(nm, dstOf(k))))).map((r) => r.m)
                  : await Promise.all(names.map((nm, k) => migrateViaApi(admin, nm, dstOf(k))));
              const wallMs = performance.now() - t;
              const cpuMs = busyCpuMs() - cpu0;
              const starts = ms.map((m) => Date.parse(m.createdAt ?? ""));
              const ends = ms.map((m) => Date.parse(m.finishedAt ?? ""));
              const controllerSpanMs = Math.max(...ends) - Math.min(...starts);
              const steps = ms.map((m) =>
                (m.steps ?? []).map((s): [string, number, number] => [s.name, s.durationMs ?? 0, s.details?.work_ms ?? 0]),
              );
              parallel.push({ n, rep, via, wallMs, controllerSpanMs, cpuMs, each: ms.map((m) => m.totalMs ?? 0), steps });
              log(`parallel n=${n} rep=${rep} via=${via}`, {
                wallMs: Math.round(wallMs),
                cpuMs: Math.round(cpuMs),
                controllerSpanMs,
                each: ms.map((m) => m.totalMs ?? 0),
              });
            } catch (e) {
              const x = e as Error & { stderr?: string };
              parallel.push({
                n,
                rep,
                via,
                wallMs: NaN,
                controllerSpanMs: NaN,
                cpuMs: NaN,
                each: [],
                error: `${x.message}${x.stderr ? `: ${x.stderr.slice(-300)}` : ""}`,
              });
              log(`parallel n=${n} rep=${rep} via=${via} failed`, { error: x.message, stderr: x.stderr?.slice(-300) });
            } finally {
              for (const nm of names) await ferry(["rm", nm, "--force"]).catch(() => undefined);
            }
          }
        }
      }
    } finally {
      admin.close();
    }
  }

  // ---- summary -------------------------------------------------------------------------------------
  const ok = records.filter((r) => !r.error);
  const of = (exp: string, way: Way): RunRecord[] => ok.filter((r) => r.experiment === exp && r.way === way);
  type StepStat = {
    median: number;
    p90: number;
    inDowntime: boolean;
    group?: string;
    workMedian?: number;
    realMedian?: number;
    sshMedian?: number;
  };
  const stepStats = (rs: RunRecord[]): Record<string, StepStat> => {
    const out: Record<string, StepStat> = {};
    for (const n of [...new Set(rs.flatMap((r) => r.steps.map((s) => s.name)))]) {
      const ss = rs.flatMap((r) => r.steps.filter((s) => s.name === n));
      const st: StepStat = {
        median: round(median(ss.map((s) => s.ms))),
        p90: round(p90(ss.map((s) => s.ms))),
        inDowntime: ss[0]?.inDowntime ?? false,
      };
      if (ss[0]?.group) st.group = ss[0].group;
      if (ss.some((s) => s.workMs !== undefined)) st.workMedian = round(median(ss.map((s) => s.workMs ?? NaN)));
      if (ss[0]?.realMs !== undefined) {
        st.realMedian = round(median(ss.map((s) => s.realMs!)));
        st.sshMedian = round(median(ss.map((s) => s.sshMs!)));
      }
      out[n] = st;
    }
    return out;
  };
  const mp = (xs: number[]): { median: number; p90: number } => ({ median: round(median(xs)), p90: round(p90(xs)) });
  const agg = (rs: RunRecord[]) => ({
    runs: rs.length,
    steps: stepStats(rs),
    total_ms: mp(rs.map((r) => r.totalMs)),
    downtime_ms: mp(rs.map((r) => r.downtimeMs)),
    disruption_ms: mp(rs.map((r) => r.disruptionMs)),
    control_overhead_ms: mp(rs.map((r) => r.controlOverheadMs)),
    control_overhead_share: round(median(rs.map((r) => r.controlOverheadMs / r.totalMs)), 3),
    ...(rs.some((r) => r.cliWallMs !== undefined) ? { cli_wall_ms: mp(rs.map((r) => r.cliWallMs ?? NaN)) } : {}),
  });
  const experiments: Record<string, Record<Way, ReturnType<typeof agg>>> = {};
  for (const e of ["sockperf", "iperf"]) if (ONLY.has(e)) experiments[e] = { baseline: agg(of(e, "baseline")), ferry: agg(of(e, "ferry")) };
  const parOk = parallel.filter((p) => !p.error);
  const parMedian = (n: number, via: "cli" | "api", k: "wallMs" | "controllerSpanMs" | "cpuMs" = "wallMs"): number =>
    median(parOk.filter((p) => p.n === n && p.via === via).map((p) => p[k]));
  // No schedule of N migrations ends before their CPU time spread over every core: how far
  // each batch of 4 was from that floor, and what 4 cost against 1 (4.0 = no contention cost).
  const cores = os.cpus().length;
  const par4 = parOk.filter((p) => p.n === 4 && p.via === "api");
  const all = (w: Way): RunRecord[] => ok.filter((r) => r.way === w);
  const ferryDisruption = median(all("ferry").map((r) => r.disruptionMs));
  const sshDisruption = median(all("baseline").map((r) => r.disruptionMs));
  const summary = {
    disruption_ratio: round(ferryDisruption / sshDisruption, 3),
    ferry_disruption_ms: round(ferryDisruption),
    ssh_disruption_ms: round(sshDisruption),
    control_overhead_share: round(median(all("ferry").map((r) => r.controlOverheadMs / r.totalMs)), 3),
    baseline_control_overhead_share: round(median(all("baseline").map((r) => r.controlOverheadMs / r.totalMs)), 3),
    // The migrations alone: one admin client starts N over the API and watches them end.
    parallel4_ratio: round(parMedian(4, "api") / parMedian(1, "api"), 3),
    parallel_wall_ms: Object.fromEntries([1, 2, 3, 4].map((n) => [n, round(parMedian(n, "api"))])),
    parallel_cpu_ms: Object.fromEntries([1, 2, 3, 4].map((n) => [n, round(parMedian(n, "api", "cpuMs"))])),
    parallel4_cpu_floor_ratio: round(median(par4.map((p) => p.wallMs / (p.cpuMs / cores))), 3),
    parallel4_cpu_ratio: round(parMedian(4, "api", "cpuMs") / parMedian(1, "api", "cpuMs"), 3),
    // N `ferry migrate` processes at once: also N Node start-ups on the same 2 cores.
    parallel4_ratio_cli: round(parMedian(4, "cli") / parMedian(1, "cli"), 3),
    parallel_cli_wall_ms: Object.fromEntries([1, 2, 3, 4].map((n) => [n, round(parMedian(n, "cli"))])),
    parallel4_ratio_controller: round(parMedian(4, "api", "controllerSpanMs") / parMedian(1, "api", "controllerSpanMs"), 3),
    parallel_controller_span_ms: Object.fromEntries([1, 2, 3, 4].map((n) => [n, round(parMedian(n, "api", "controllerSpanMs"))])),
    ferry_total_ms: round(median(all("ferry").map((r) => r.totalMs))),
    ferry_downtime_ms: round(median(all("ferry").map((r) => r.downtimeMs))),
    ferry_cli_wall_ms: round(median(all("ferry").map((r) => r.cliWallMs ?? NaN))),
    baseline_total_ms: round(median(all("baseline").map((r) => r.totalMs))),
    ferry_driver: "controller (ferry CLI)",
    root_namespace_shaped: !flags["no-shaping"],
    targets: { disruption_ratio: 0.35, control_overhead_share: 0.05, parallel4_ratio: 2 },
    failed_runs: records.length - ok.length + parallel.length - parOk.length,
    runs_per_way: RUNS,
    wall_s: round((performance.now() - tStart) / 1000),
  };
  await mkdir(flags.out, { recursive: true });
  const result = {
    generatedAt: new Date().toISOString(),
    host: { cpus: os.cpus().length, kernel: os.release(), loadavg: os.loadavg().map((x) => round(x, 2)) },
    summary,
    experiments,
    parallel,
    runs: records,
  };
  await writeFile(path.join(flags.out, "latest.json"), JSON.stringify(result, null, 1));
  await writeCharts(flags.out, result);
  process.stdout.write(JSON.stringify(summary, null, 2) + "\n");
}

main()
  .catch((e: unknown) => {
    if (e instanceof TestbedBusyError) log("another testbed is up; not touching it", { error: e.message });
    else log("failed", { error: (e as Error).stack ?? String(e) });
    process.exitCode = 1;
  })
  .finally(async () => {
    await cleanupAll();
    log("cleaned up");
  });
