// The admin CLI (packages/cli) against this controller over real gRPC (127.0.0.1:0, insecure), with fake agents.
import { run } from "@ferry/cli";
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startController, type RunningController } from "./controller.js";
import { FakeNetwork } from "./fake-agent.js";
import { IMAGE } from "./testkit.js";

let net: FakeNetwork;
let ctl: RunningController;
let state: string;
let env: NodeJS.ProcessEnv;

async function ferry(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = "";
  let err = "";
  const code = await run(argv, env, { out: (s) => (out += s), err: (s) => (err += s) });
  return { code, out, err };
}

beforeAll(async () => {
  net = new FakeNetwork();
  for (const n of ["edge-a", "edge-b"]) net.add(n).addImage(IMAGE);
  state = await mkdtemp(join(tmpdir(), "ferry-cli-test-"));
  ctl = await startController({
    listen: "127.0.0.1:0",
    security: { mode: "insecure" },
    agentSecurity: { mode: "insecure" },
    stateDir: state,
    connectAgent: net.connector(),
    metricsIntervalMs: 0,
    schedulePolicies: false,
  });
  env = { FERRY_CONTROLLER: `127.0.0.1:${ctl.port}`, FERRY_INSECURE: "1" };
});

afterAll(async () => {
  await ctl?.close();
  await rm(state, { recursive: true, force: true });
});

describe("ferry CLI against the controller", () => {
  it("host add, run, ps, migrate, migrations, migration ID", async () => {
    expect((await ferry("host", "add", "edge-a", "fake-edge-a:7441", "--underlay-ip", "192.168.77.1")).code).toBe(0);
    expect((await ferry("host", "add", "edge-b", "fake-edge-b:7441", "--underlay-ip", "192.168.77.2")).code).toBe(0);
    const hosts = await ferry("hosts");
    expect(hosts.out).toMatch(/edge-a\s+fake-edge-a:7441\s+ready\s+4\.2\.1/);

    const r = await ferry(
      "run",
      "web",
      "--host",
      "edge-a",
      "--image",
      IMAGE,
      "--ip",
      "10.77.0.10/24",
      "--memory",
      "64m",
      "--",
      "/bin/ferry-echo",
      "7000",
    );
    expect(r.code, r.err).toBe(0);
    const ps = await ferry("ps");
    expect(ps.out).toMatch(/web\s+edge-a\s+running\s+10\.77\.0\.10\/24\s+busybox/);

    const mig = await ferry("migrate", "web", "--to", "edge-b");
    expect(mig.code, mig.err).toBe(0);
    expect(mig.out).toMatch(/migration m-\S+: web edge-a → edge-b/);
    expect(mig.out).toMatch(/done\s+checkpoint/);
    expect(mig.out).toMatch(/total \d+ ms, downtime \d+ ms, control overhead \d+ ms/);
    const id = /migration (m-\S+):/.exec(mig.out)![1]!;

    const list = await ferry("migrations");
    expect(list.code).toBe(0);
    expect(list.out).toContain(id);
    expect(list.out).toMatch(/succeeded/);
    expect(list.out).toContain("manual");

    const one = await ferry("migration", id);
    expect(one.code).toBe(0);
    expect(one.out).toMatch(/restore\s+done/);
    expect(one.out).toMatch(/cleanup-source\s+done/);
    const json = JSON.parse((await ferry("migration", id, "--json")).out) as { state: string; totalMs: number; controlOverheadMs?: number };
    expect(json.state).toBe("MIGRATION_STATE_SUCCEEDED");
    // Proto3 JSON: a field at its default (0 ms of overhead, with fake agents) is left out.
    expect(json.controlOverheadMs ?? 0).toBeGreaterThanOrEqual(0);
    expect(json.controlOverheadMs ?? 0).toBeLessThanOrEqual(json.totalMs);
    expect((await ferry("ps", "--host", "edge-b")).out).toMatch(/web\s+edge-b\s+running/);
  });

  it("the ferry process writes all of a long --json answer into a pipe before it exits", async () => {
    // Enough migrations for more than a pipe's 64 KiB of JSON.
    for (let i = 0; i < 20; i++) expect((await ferry("migrate", "web", "--to", i % 2 ? "edge-b" : "edge-a")).code).toBe(0);
    const main = fileURLToPath(new URL("../../cli/src/main.ts", import.meta.url));
    // Through a real pipe (`| cat`; Node's own stdio pipes are socket pairs, which write at once).
    const child = spawn(
      "bash",
      ["-c", 'set -o pipefail; "$0" --conditions=source --import tsx "$1" migrations --json | cat', process.execPath, main],
      {
        cwd: fileURLToPath(new URL("../../..", import.meta.url)),
        env: { ...process.env, ...env },
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    const chunks: Buffer[] = [];
    let err = "";
    child.stdout.on("data", (d: Buffer) => chunks.push(d));
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    const code = await new Promise<number | null>((r) => child.on("close", r));
    const out = Buffer.concat(chunks).toString("utf8");
    expect(code, err).toBe(0);
    expect(out.length).toBeGreaterThan(65_536);
    expect((JSON.parse(out) as unknown[]).length).toBeGreaterThanOrEqual(21);
  });

  it("a rolled-back migration exits 3 and says why", async () => {
    net.byName("edge-a").fail("restore", { code: "Internal", message: "criu restore failed (fake)" });
    const mig = await ferry("migrate", "web", "--to", "edge-a");
    expect(mig.code).toBe(3);
    expect(mig.err).toMatch(/rolled-back: .*step "restore" failed: criu restore failed \(fake\)/);
    expect(net.whereRunning("web")).toEqual(["edge-b"]);
    const list = await ferry("migrations", "--container", "web");
    expect(list.out).toMatch(/rolled-back/);
  });

  it("errors: one line on stderr, a non-zero exit", async () => {
    const nf = await ferry("migrate", "nope", "--to", "edge-b");
    expect(nf.code).toBe(15);
    expect(nf.err).toContain('container "nope" not found');
    const dup = await ferry("run", "web", "--host", "edge-a", "--image", IMAGE, "--ip", "10.77.0.11/24", "--", "x");
    expect(dup.code).toBe(16);
    expect(dup.err).toContain("already exists on edge-b");
    const bad = await ferry("policy", "set", "p1", "--resource", "memory", "--threshold", "0.8", "--schedule", "sometimes");
    expect(bad.code).toBe(13);
    expect(bad.err).toContain("policy.schedule");
    expect((await ferry("migration", "m-unknown")).code).toBe(15);
  });

  it("policies, images, logs, stop, rm, drain", async () => {
    expect((await ferry("policy", "set", "mem", "--resource", "memory", "--threshold", "0.9", "--host", "edge-b")).code).toBe(0);
    expect((await ferry("policy", "list")).out).toMatch(/mem\s+memory\s+90%\s+edge-b\s+\(busiest\)\s+3\s+300s/);
    expect((await ferry("policy", "rm", "mem")).code).toBe(0);
    expect((await ferry("images")).out).toMatch(/edge-a\s+busybox/);
    expect((await ferry("logs", "web")).out).toContain("hello from web on edge-b");
    const drain = await ferry("host", "drain", "edge-b");
    expect(drain.code, drain.err).toBe(0);
    const mid = /started (m-\S+)/.exec(drain.out)![1]!;
    await ctl.controller.migrations.wait(mid);
    expect(net.whereRunning("web")).toEqual(["edge-a"]);
    expect((await ferry("stop", "web")).out).toContain("web stopped");
    expect((await ferry("rm", "web")).code).toBe(0);
    expect((await ferry("ps")).out).not.toContain("web");
    expect((await ferry("host", "rm", "edge-b")).code).toBe(0);
    expect((await ferry("hosts")).out).not.toContain("edge-b");
  });
});
