/**
 * The agent's container runtime against the real runc 1.1.5 and CRIU 4.2.1 (root only):
 * the testkit image in an overlay, a ferry-echo container in its own network namespace, a client
 * in the root namespace over a veth, and five checkpoint/restore rounds in a row, each into a
 * freshly re-created namespace (as a migration does), verified byte by byte by the client.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, mkdir, readdir, readFile, rm, writeFile, chmod } from "node:fs/promises";
import { existsSync } from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ContainerState, type ContainerSpec } from "@ferry/api/agent";
import { exec, FerryError, silentLogger } from "@ferry/common";
import { ContainerRuntime, Criu, freePort, Runc } from "@ferry/agent";
import type { EchoReport } from "@ferry/testbed";
import { waitFor } from "../helpers/wait.js";

const ROOT = process.getuid?.() === 0;
const REPO = path.resolve(import.meta.dirname, "../..");
const PORT = 7000;

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)]! : NaN;
};

describe.skipIf(!ROOT)("container runtime (runc + CRIU)", () => {
  const sfx = randomBytes(3).toString("hex");
  const ns = `ferry-t${sfx}`;
  const netnsPath = `/run/netns/${ns}`;
  const hostIf = `ft${sfx}h`;
  const ctIf = `ft${sfx}c`;
  const name = `echo-${sfx}`;
  let W = "";
  let lowerDir = "";
  let client = "";
  let hostIp = "";
  let ctIp = "";
  let runtime: ContainerRuntime;
  let runc: Runc;
  let criu: Criu;
  const clients: ChildProcess[] = [];
  let imageDigest = "";

  const spec = (): ContainerSpec => ({
    name,
    image: "testkit",
    args: ["/usr/local/bin/ferry-echo", String(PORT), "8"],
    env: [],
    cwd: "/",
    cpuMillicores: 1000,
    memoryLimitBytes: 256 * 1024 * 1024,
    labels: {},
  });

  /** `lock`: iptables/ip6tables-save text of CRIU's lock, installed before any link is up. */
  async function createNetns(lock?: { v4: string; v6: string }): Promise<void> {
    await exec("ip", ["netns", "add", ns]);
    if (lock) {
      // before the veth exists: a retransmission reaching an unlocked namespace gets a RST
      await exec("nsenter", [`--net=${netnsPath}`, "iptables-restore"], { input: lock.v4 });
      await exec("nsenter", [`--net=${netnsPath}`, "ip6tables-restore"], { input: lock.v6 });
    }
    await exec("ip", ["link", "add", hostIf, "type", "veth", "peer", "name", ctIf]);
    await exec("ip", ["link", "set", ctIf, "netns", ns]);
    await exec("ip", ["-n", ns, "link", "set", "lo", "up"]);
    await exec("ip", ["-n", ns, "addr", "add", `${ctIp}/30`, "dev", ctIf]);
    await exec("ip", ["-n", ns, "link", "set", ctIf, "up"]);
    await exec("ip", ["addr", "add", `${hostIp}/30`, "dev", hostIf]);
    await exec("ip", ["link", "set", hostIf, "up"]);
  }

  async function deleteNetns(): Promise<void> {
    await exec("ip", ["netns", "del", ns], { okCodes: [0, 1] });
    // 2: "No such device", the veth already gone with its namespace
    await exec("ip", ["link", "del", hostIf], { okCodes: [0, 1, 2] });
    // the veth goes away asynchronously with its namespace: wait before re-creating the name
    for (let i = 0; i < 100; i++) {
      const r = await exec("ip", ["link", "show", hostIf], { okCodes: [0, 1] });
      if (r.exitCode !== 0) return;
      await new Promise((res) => setTimeout(res, 20));
    }
    throw new Error(`${hostIf} still exists 2 s after deleting ${ns}`);
  }

  /** A ferry-echo-client process; resolves the report when it ends. */
  function startClient(
    args: string[] = [],
    port = PORT,
  ): {
    proc: ChildProcess;
    connected: Promise<string>;
    report: Promise<{ code: number | null; report: EchoReport }>;
    /** Pauses the client has seen end so far (a "gap" line each, once data flows again). */
    gapsEnded: () => number;
  } {
    const proc = spawn(client, [ctIp, String(port), ...args], { stdio: ["ignore", "pipe", "pipe"] });
    clients.push(proc);
    let out = "";
    let err = "";
    proc.stdout.on("data", (b: Buffer) => (out += b.toString()));
    const connected = new Promise<string>((resolve, reject) => {
      proc.stderr.on("data", (b: Buffer) => {
        err += b.toString();
        const m = /connected serial=\d+ total=\d+/.exec(err);
        if (m) resolve(m[0]);
      });
      proc.on("exit", () => reject(new Error(`client exited before connecting: ${err}`)));
    });
    connected.catch(() => undefined);
    const report = new Promise<{ code: number | null; report: EchoReport }>((resolve, reject) => {
      proc.on("exit", (code) => {
        try {
          resolve({ code, report: JSON.parse(out) as EchoReport });
        } catch {
          reject(new Error(`client printed no report (exit ${code}): ${out} ${err}`));
        }
      });
    });
    report.catch(() => undefined); // awaited by the test that needs it; never an unhandled rejection
    return { proc, connected, report, gapsEnded: () => (err.match(/^gap /gm) ?? []).length };
  }

  async function waitForLog(re: RegExp, offset = 0, timeoutMs = 5000): Promise<string> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const { data } = await runtime.logs(name, { offset });
      const text = data.toString();
      if (re.test(text)) return text;
      if (Date.now() > end) throw new Error(`log never matched ${re}: ${text}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** Runc.state reads runc's state file itself: it must say what `runc state` says, here `status`. */
  async function expectRuncState(status: string | undefined): Promise<void> {
    const cli = await exec("runc", ["--root", runc.root, "state", name], { okCodes: [0, 1] });
    const read = await runc.state(name);
    expect(read?.status).toBe(status);
    if (status === undefined) {
      expect(cli.stderr).toMatch(/does not exist/);
      return;
    }
    const r = JSON.parse(cli.stdout) as {
      id: string;
      pid: number;
      status: string;
      bundle: string;
      created: string;
      annotations?: Record<string, string>;
    };
    // every container names Ferry's CRIU configuration, which leaves the network lock to Ferry
    expect(r.annotations?.["org.criu.config"]).toBe(runtime.criuConfig);
    expect(read).toEqual({ id: r.id, pid: r.pid, status: r.status, bundle: r.bundle, created: r.created });
    expect((await runc.list()).find((s) => s.id === name)).toEqual(read);
  }

  /** The namespace's IPv4 and IPv6 filter tables. */
  async function lockRules(): Promise<string> {
    const save = async (cmd: string): Promise<string> => (await exec("nsenter", [`--net=${netnsPath}`, cmd, "-t", "filter"])).stdout;
    return (await save("iptables-save")) + (await save("ip6tables-save"));
  }

  beforeAll(async () => {
    W = await mkdtemp("/tmp/ferry-rt-");
    // the image: deterministic tar, built twice must give the same digest
    const b1 = await exec("bash", [
      path.join(REPO, "deploy/testkit/build.sh"),
      path.join(W, "image.tar"),
      path.join(W, "ferry-echo-client"),
    ]);
    imageDigest = /digest (sha256:[0-9a-f]{64})/.exec(b1.stdout)![1]!;
    const b2 = await exec("bash", [path.join(REPO, "deploy/testkit/build.sh"), path.join(W, "image2.tar")]);
    expect(/digest (sha256:[0-9a-f]{64})/.exec(b2.stdout)![1]).toBe(imageDigest);
    client = path.join(W, "ferry-echo-client");
    lowerDir = path.join(W, "lower");
    await mkdir(lowerDir);
    await exec("tar", ["-xf", path.join(W, "image.tar"), "-C", lowerDir]);

    // a /30 nobody uses on this host
    const used = (await exec("ip", ["-4", "-o", "addr", "show"])).stdout;
    for (;;) {
      const [a, b] = randomBytes(2);
      const net = `10.${200 + (a! % 50)}.${b}`;
      if (!used.includes(` ${net}.`)) {
        hostIp = `${net}.1`;
        ctIp = `${net}.2`;
        break;
      }
    }
    await createNetns();

    criu = new Criu({ path: "criu" });
    // CRIU's tar for empty tmpfs mounts, as setup.sh builds it for the agents
    const criuTools = path.join(W, "criu-tools");
    await mkdir(criuTools);
    await exec("gcc", ["-O2", "-static", "-o", path.join(criuTools, "tar"), path.join(REPO, "deploy/host/criu-tar.c")]);
    runc = new Runc({ root: path.join(W, "runc"), criuPath: "criu", criuTools });
    runtime = new ContainerRuntime({ stateDir: path.join(W, "state"), runc, criu, agentId: `t${sfx}`, log: silentLogger });
  });

  afterAll(async () => {
    for (const c of clients) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
    if (runtime) await runtime.delete(name, { force: true }).catch(() => undefined);
    if (runc) await runc.delete(name, true).catch(() => undefined);
    await exec("ip", ["netns", "del", ns], { okCodes: [0, 1] }).catch(() => undefined);
    await exec("ip", ["link", "del", hostIf], { okCodes: [0, 1] }).catch(() => undefined);
    // any overlay left mounted under W would make rm fail: unmount first
    const mounts = (await readFile("/proc/self/mountinfo", "utf8")).split("\n").map((l) => l.split(" ")[4] ?? "");
    for (const m of mounts.filter((m) => W && m.startsWith(W)).reverse()) await exec("umount", ["-l", m], { okCodes: [0, 1, 32] });
    if (W && !process.env.FERRY_TEST_KEEP) await rm(W, { recursive: true, force: true });
  });

  it("reports CRIU's version, check and features, and primes the kdat cache", async () => {
    expect(await criu.version()).toMatch(/^4\.\d+/);
    expect((await criu.check()).ok).toBe(true);
    const features = await criu.features();
    expect(features).toContain("uffd");
    expect(features).not.toContain("mem_dirty_track"); // no soft-dirty on this kernel
    const logFile = path.join(W, "check.log");
    if (process.env.FERRY_TEST_NO_KDAT) {
      // measurement knob: run the rounds with CRIU re-probing the kernel on every call
      await rm("/run/criu.kdat", { force: true });
      await exec("criu", ["check", "-v4", "-o", logFile]);
      expect(await readFile(logFile, "utf8")).not.toContain("Loaded kdat cache");
      return;
    }
    const k = await criu.primeKdatCache();
    expect(existsSync(k.path)).toBe(true);
    await exec("criu", ["check", "-v4", "-o", logFile]);
    expect(await readFile(logFile, "utf8")).toContain("Loaded kdat cache from /run/criu.kdat");
  });

  it("creates, starts, lists and inspects a container; its stdout reaches the log", async () => {
    const created = await runtime.create(spec(), { lowerDir, netnsPath, imageDigest });
    expect(created.state).toBe(ContainerState.CONTAINER_STATE_CREATED);
    await expectRuncState("created");
    await expect(runtime.create(spec(), { lowerDir, netnsPath })).rejects.toMatchObject({ code: "AlreadyExists" });
    const started = await runtime.start(name);
    expect(started.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    expect(started.pid).toBeGreaterThan(0);
    await expectRuncState("running");
    await waitForLog(/ferry-echo listening on 7000/);
    const list = await runtime.list();
    expect(list.map((c) => c.spec?.name)).toContain(name);
    const info = await runtime.inspect(name);
    expect(info.imageDigest).toBe(imageDigest);
    expect(info.spec?.args).toEqual(spec().args);
    await expect(runtime.inspect("no-such-ct")).rejects.toMatchObject({ code: "NotFound" });
    await expect(runtime.inspect("Bad/Name")).rejects.toMatchObject({ code: "InvalidArgument" });
    // the cgroup carries the limits of the spec
    const quota = await readFile(`/sys/fs/cgroup/cpu/ferry-t${sfx}-${name}/cpu.cfs_quota_us`, "utf8");
    expect(Number(quota)).toBe(100_000);
    const u = await runtime.usage(name);
    expect(u.memoryBytes).toBeGreaterThan(8 * 1024 * 1024); // ferry-echo touched 8 MiB
  });

  it("the echo client retries a refused connect until the server listens, and gives up after --connect-wait", async () => {
    const port = PORT + 1;
    const t0 = performance.now();
    const refused = await exec(client, [ctIp, String(port), "--connect-wait", "0.3"], { okCodes: [3] });
    expect(refused.stderr).toMatch(/^connect: Connection refused$/m);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(300);

    // The server starts 0.5 s after the client: a just-started container, still not listening.
    const c = startClient(["--rate", "100000"], port);
    await new Promise((r) => setTimeout(r, 500));
    const server = spawn("nsenter", [`--net=/run/netns/${ns}`, path.join(lowerDir, "usr/local/bin/ferry-echo"), String(port)], {
      stdio: "ignore",
    });
    clients.push(server);
    // The refused attempts never reached accept: the connection that succeeded is the first.
    expect(await c.connected).toBe("connected serial=1 total=0");
    await new Promise((r) => setTimeout(r, 300));
    c.proc.kill("SIGTERM");
    const { code, report } = await c.report;
    server.kill("SIGTERM");
    expect(code).toBe(0);
    expect(report.checked).toBe(report.sent);
    expect(report.sent).toBeGreaterThan(10_000);
  });

  it("checkpoints and restores 5 times in a row with a live TCP connection, no byte lost", async () => {
    const c = startClient(["--rate", "200000", "--chunk", "1000", "--gap-ms", "50"]);
    expect(await c.connected).toBe("connected serial=1 total=0");
    const checkpointMs: number[] = [];
    const restoreMs: number[] = [];
    const frozenMs: number[] = [];
    const parents: string[] = [];
    // Each round waits until the client's data flows again after the previous restore: a client
    // still backing off from one freeze would otherwise run into the next (its pauses merge).
    const flowsAgain = (pauses: number): Promise<void> =>
      waitFor(`the client's data to flow again after ${pauses} freeze(s)`, () => c.gapsEnded() >= pauses, 20_000);
    for (let round = 1; round <= 5; round++) {
      await flowsAgain(round - 1);
      await new Promise((r) => setTimeout(r, 400));
      const t0 = performance.now();
      const cp = await runtime.checkpoint(name, { tcpEstablished: true });
      checkpointMs.push(performance.now() - t0);
      expect(cp.connections, `round ${round}: ${JSON.stringify(cp.connections)}`).toContainEqual(
        expect.objectContaining({ localAddress: ctIp, localPort: PORT, remoteAddress: hostIp }),
      );
      expect(cp.stats.pagesWritten).toBeGreaterThan(2000); // 8 MiB touched = 2048 pages at least
      expect(cp.stats.frozenMs).toBeGreaterThan(0);
      expect(cp.stats.imageBytes).toBeGreaterThan(8 * 1024 * 1024);
      frozenMs.push(cp.stats.frozenMs);
      // CRIU saved the tmpfs mounts through criu-tar: the empty ones (/dev/shm and the two masked
      // directories) in its own 1559-byte archive (gzip OS byte 255), /dev, which has entries, by
      // GNU tar and gzip (OS byte 3).
      const images = path.join(cp.checkpointDir, "images");
      const tmpfs = await Promise.all(
        (await readdir(images)).filter((f) => /^tmpfs-dev-.*\.tar\.gz\.img$/.test(f)).map((f) => readFile(path.join(images, f))),
      );
      expect(tmpfs.filter((b) => b.length === 1559 && b[9] === 255)).toHaveLength(3);
      expect(tmpfs.filter((b) => b[9] === 3)).toHaveLength(1);
      expect((await runtime.inspect(name)).state).toBe(ContainerState.CONTAINER_STATE_CHECKPOINTED);

      // a migration's destination: a fresh namespace with the same address and the network lock
      // installed before it becomes reachable (IPv4 and IPv6, as the dump left the source's)
      const lock4 = (await exec("nsenter", [`--net=${netnsPath}`, "iptables-save"])).stdout;
      const lock6 = (await exec("nsenter", [`--net=${netnsPath}`, "ip6tables-save"])).stdout;
      // CRIU locked with Ferry's script (told to skip its own lock), once in each family
      for (const saved of [lock4, lock6]) expect(saved.match(/^-A INPUT -j CRIU$/gm)).toHaveLength(1);
      expect(await readFile(cp.criuLog, "utf8")).toContain(`Running network-lock scripts\n`);
      expect(await readFile(cp.criuLog, "utf8")).toContain(`[${path.join(W, "state", "criu-network.sh")}]`);
      await deleteNetns();
      await createNetns({ v4: lock4, v6: lock6 });

      let checkpointDir = cp.checkpointDir;
      if (round === 5) {
        // the cross-host path: checkpoint and upper dir travel as tars, the container is re-created
        const cpTar = await runtime.packCheckpoint(cp.checkpointId);
        const upperTar = await runtime.packUpper(name);
        await runtime.delete(name);
        await expect(runtime.inspect(name)).rejects.toMatchObject({ code: "NotFound" });
        await runtime.unpackUpper(name, upperTar);
        checkpointDir = await runtime.unpackCheckpoint(`${cp.checkpointId}-copy`, cpTar);
      }
      const t1 = performance.now();
      const rs = await runtime.restore(spec(), { checkpointDir, lowerDir, netnsPath, tcpEstablished: true, imageDigest });
      restoreMs.push(performance.now() - t1);
      expect(rs.pid).toBeGreaterThan(0);
      expect(rs.stats.restoreMs + rs.stats.forkingMs).toBeGreaterThan(0);
      // CRIU's restore runs inside runc's, which runs inside the agent's.
      expect(rs.stats.runcMs).toBeGreaterThanOrEqual(rs.stats.restoreMs);
      expect(rs.stats.totalMs).toBeGreaterThanOrEqual(rs.stats.runcMs);
      expect(rs.container.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
      // a clean restore: no error in CRIU's log (a missing v6 lock shows up here); the rlimit
      // one is the host's (no CAP_SYS_RESOURCE to raise RLIMIT_NOFILE) and harmless
      const errors = (await readFile(rs.criuLog, "utf8")).split("\n").filter((l) => /Error \(/.test(l) && !/RLIMIT_NOFILE/.test(l));
      expect(errors).toEqual([]);
      // the restore opens the lock (Ferry's script, run by CRIU), and the runtime removes it once
      // the container runs, in both families
      expect(await readFile(rs.criuLog, "utf8")).toContain(`[${path.join(W, "state", "criu-network.sh")}]`);
      await runtime.settled(name);
      expect(await lockRules()).not.toContain("CRIU");
      const status = await readFile(`/proc/${rs.pid}/status`, "utf8");
      const ppid = /PPid:\s*(\d+)/.exec(status)![1]!;
      parents.push(`${ppid}:${(await readFile(`/proc/${ppid}/comm`, "utf8").catch(() => "?")).trim()}`);
    }
    await flowsAgain(5);
    await new Promise((r) => setTimeout(r, 500));
    c.proc.kill("SIGTERM");
    const { code, report } = await c.report;
    expect(report.errors).toBe(0);
    expect(report.closed).toBe(false);
    expect(report.checked).toBe(report.sent);
    expect(report.sent).toBeGreaterThan(200_000);
    expect(code).toBe(0);
    // memory survived: a new connection is the server's second, and it has counted all bytes so far
    const c2 = startClient(["--duration", "0.3"]);
    const r2 = await c2.report;
    expect(r2.code).toBe(0);
    expect(r2.report.serial).toBe(2);
    expect(r2.report.totalAtConnect).toBe(report.sent);

    const gaps = report.gaps.filter((g) => g.ms > 100).map((g) => Math.round(g.ms));
    console.log(
      `[runtime] 5 rounds: checkpoint median ${median(checkpointMs).toFixed(0)} ms (${checkpointMs.map((x) => x.toFixed(0)).join(", ")}),` +
        ` CRIU frozen median ${median(frozenMs)} ms, restore median ${median(restoreMs).toFixed(0)} ms (${restoreMs.map((x) => x.toFixed(0)).join(", ")}),` +
        ` client-seen gaps ${gaps.join(", ")} ms (median ${median(gaps)}), ${report.checked} bytes verified; restored parent(s): ${[...new Set(parents)].join(" ")}`,
    );
    expect(gaps.length).toBeGreaterThanOrEqual(5);
  });

  it("leaves the container running when a checkpoint fails (page server down; criu failpoint)", async () => {
    const c = startClient(["--rate", "100000", "--gap-ms", "50"]);
    await c.connected;
    // 1. a page server that is not there: CRIU fails during the dump and must resume the tree
    const deadPort = await freePort("127.0.0.1");
    const err = await runtime
      .checkpoint(name, { tcpEstablished: true, pageServer: { address: "127.0.0.1", port: deadPort } })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FerryError);
    expect((err as FerryError).code).toBe("Internal");
    expect((err as FerryError).message).toMatch(/checkpoint container .* failed: .*\(log: .*dump\.log\)/);
    expect(existsSync(String((err as FerryError).data?.log))).toBe(true);
    expect((await runtime.inspect(name)).state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    expect(await lockRules()).not.toContain("CRIU"); // the lock made for the dump is gone with it

    // 2. a failpoint: runc pointed at a "criu" that exits 1, on a second runtime over the same state
    const failing = path.join(W, "criu-failpoint");
    await writeFile(failing, "#!/bin/sh\necho 'ferry failpoint: criu fails on purpose' >&2\nexit 1\n");
    await chmod(failing, 0o755);
    const rt2 = new ContainerRuntime({
      stateDir: path.join(W, "state"),
      runc: new Runc({ root: path.join(W, "runc"), criuPath: failing }),
      criu,
      agentId: `t${sfx}`,
    });
    await expect(rt2.checkpoint(name, { tcpEstablished: true })).rejects.toMatchObject({ code: "Internal" });
    expect((await runtime.inspect(name)).state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    expect(await lockRules()).not.toContain("CRIU");

    await new Promise((r) => setTimeout(r, 300));
    c.proc.kill("SIGTERM");
    const { code, report } = await c.report;
    expect(report.errors).toBe(0);
    expect(report.checked).toBe(report.sent);
    expect(code).toBe(0);
  });

  it("a checkpoint that leaves the container running leaves it running, not frozen", async () => {
    const cp = await runtime.checkpoint(name, { tcpEstablished: true, leaveRunning: true });
    expect((await runtime.inspect(name)).state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    await expectRuncState("running");
    expect(await lockRules()).not.toContain("CRIU"); // and reachable, not locked
    expect(await readFile(runtime.criuConfig, "utf8")).toMatch(/^network-lock skip$/m);
    expect(await readFile(runtime.criuConfig, "utf8")).toMatch(/^action-script \/.*\/criu-network\.sh$/m);
    await runtime.deleteCheckpoint(cp.checkpointId);
  });

  it("rediscovers its containers after the runtime is re-instantiated", async () => {
    // as an agent that stopped between freezing a container for a checkpoint and the dump leaves it
    await exec("runc", ["--root", runc.root, "pause", name]);
    await expectRuncState("paused");
    const again = new ContainerRuntime({ stateDir: path.join(W, "state"), runc, criu, agentId: `t${sfx}` });
    const { containers, orphans } = await again.rediscover();
    expect(orphans).toEqual([]);
    const mine = containers.find((c) => c.spec?.name === name);
    expect(mine?.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    await expectRuncState("running");
    expect(mine?.checkpointId).not.toBe("");
  });

  it("stops, restarts, refuses to delete a running container without force, deletes", async () => {
    await exec("runc", ["--root", runc.root, "pause", name]);
    await expectRuncState("paused");
    await exec("runc", ["--root", runc.root, "resume", name]);
    await expectRuncState("running");
    await expect(runtime.delete(name)).rejects.toMatchObject({ code: "FailedPrecondition" });
    const before = (await runtime.logs(name)).nextOffset;
    expect(before).toBeGreaterThan(0);
    const stopped = await runtime.stop(name, 2000);
    expect(stopped.state).toBe(ContainerState.CONTAINER_STATE_STOPPED);
    expect(stopped.exitCode).toBe(143);
    await expectRuncState("stopped");
    expect((await runtime.stop(name)).state).toBe(ContainerState.CONTAINER_STATE_STOPPED); // idempotent
    const restarted = await runtime.start(name);
    expect(restarted.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    // a fresh process: its log lines are appended after the old ones
    await waitForLog(/^ferry-echo listening on 7000/, before);
    await runtime.delete(name, { force: true });
    expect((await runtime.list()).map((c) => c.spec?.name)).not.toContain(name);
    await expect(runtime.delete(name)).rejects.toMatchObject({ code: "NotFound" });
    await expectRuncState(undefined);
  });
});
