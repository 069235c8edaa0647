/**
 * What a new user runs first: `make demo` brings the testbed up (testbed-up), migrates a live
 * TCP service to edge-b and back with a client connected, and tears it all down (testbed-down).
 * Smoke test of the three, and proof that nothing is left behind: no namespace, no OVS daemon,
 * no agent or controller, no mount.
 */
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { readFile, readdir } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { exec, isRunning } from "@ferry/common";
import { REPO } from "../helpers/certs.js";

interface DemoResult {
  ok: boolean;
  migrations: { from: string; to: string; state: string; downtime_ms: number; steps: { name: string }[] }[];
  client: { same_connection: boolean; bytes_checked: number; bytes_sent: number; errors: number; lost: number };
}

/** Processes whose command line names the testbed's state: agents, controller, OVS daemons. */
async function testbedProcesses(): Promise<string[]> {
  const out: string[] = [];
  for (const pid of await readdir("/proc")) {
    if (!/^\d+$/.test(pid)) continue;
    const cmd = await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
    if (
      cmd.includes(path.join(REPO, ".ferry/testbed")) ||
      cmd.includes("/run/ferry/ferry-edge-") ||
      cmd.includes("/run/ferry/ferry-client-host")
    ) {
      out.push(`${pid}: ${cmd.replaceAll("\0", " ").slice(0, 120)}`);
    }
  }
  return out;
}

/** Processes whose root filesystem is a container's overlay in the testbed's directory. */
async function testbedContainers(): Promise<string[]> {
  const out: string[] = [];
  for (const pid of await readdir("/proc")) {
    if (!/^\d+$/.test(pid)) continue;
    if (!isRunning(Number(pid))) continue;
    const mi = await readFile(`/proc/${pid}/mountinfo`, "utf8").catch(() => "");
    if (mi.split("\n").some((l) => l.split(" ")[4] === "/" && l.includes(`upperdir=${path.join(REPO, ".ferry/testbed")}/`))) out.push(pid);
  }
  return out;
}

const testbedCli = (cmd: "up" | "down"): Promise<{ stdout: string }> =>
  exec(process.execPath, ["--conditions=source", "--import", "tsx", path.join(REPO, "deploy/testbed.ts"), cmd], {
    cwd: REPO,
    timeoutMs: 180_000,
  });

describe("make demo (testbed-up, a migration with a client, testbed-down)", () => {
  it("migrates with the client connected and leaves nothing behind", async () => {
    const child = spawn(process.execPath, ["--conditions=source", "--import", "tsx", path.join(REPO, "deploy/demo.ts")], {
      cwd: REPO,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (out += d.toString()));
    const code = await new Promise<number | null>((resolve) => child.on("close", resolve));
    expect(code, out).toBe(0);
    expect(out).toContain("OK: no reconnect, no lost and no duplicated bytes");

    const result = JSON.parse(await readFile(path.join(REPO, ".ferry/demo-result.json"), "utf8")) as DemoResult;
    expect(result.ok).toBe(true);
    expect(result.migrations.map((m) => [m.from, m.to, m.state])).toEqual([
      ["edge-a", "edge-b", "MIGRATION_STATE_SUCCEEDED"],
      ["edge-b", "edge-a", "MIGRATION_STATE_SUCCEEDED"],
    ]);
    expect(result.client.same_connection).toBe(true);
    expect(result.client.errors).toBe(0);
    expect(result.client.lost).toBe(0);
    expect(result.client.bytes_checked).toBeGreaterThan(100_000);

    // testbed-down left nothing behind.
    const ns = (await exec("ip", ["netns", "list"])).stdout.split("\n").filter((l) => /^ferry-(edge-|client|underlay)/.test(l));
    expect(ns).toEqual([]);
    expect(await testbedProcesses()).toEqual([]);
    const mounts = (await readFile("/proc/mounts", "utf8")).split("\n").filter((l) => l.includes(".ferry/testbed"));
    expect(mounts).toEqual([]);
    expect(existsSync(path.join(REPO, ".ferry/testbed"))).toBe(false);
    expect(existsSync(path.join(REPO, ".ferry/testbed.env"))).toBe(false);
  }, 400_000);

  it("testbed-down stops a container whose agent died, and leaves nothing behind", async () => {
    await testbedCli("up");
    try {
      const env = { ...process.env, FERRY_CONTROLLER: "127.0.0.1:7440", FERRY_TLS_DIR: path.join(REPO, ".ferry/certs") };
      const ferry = path.join(REPO, "bin/ferry");
      await exec(
        ferry,
        ["run", "orphan", "--host", "edge-a", "--image", "testkit", "--ip", "10.77.0.20/24", "--", "/bin/busybox", "sleep", "600"],
        {
          env,
        },
      );
      expect((await testbedContainers()).length).toBeGreaterThan(0);
      // The agent dies; its container keeps running, and no agent can delete it any more.
      const st = JSON.parse(await readFile(path.join(REPO, ".ferry/testbed/state.json"), "utf8")) as { pids: Record<string, number> };
      const tini = st.pids["agent-edge-a"]!;
      const agent = Number((await readFile(`/proc/${tini}/task/${tini}/children`, "utf8")).trim().split(" ")[0]);
      process.kill(agent, "SIGKILL"); // tini, its parent, exits with it
    } finally {
      const { stdout } = await testbedCli("down");
      expect(stdout).toContain("stopped 1 container process(es) no agent could delete");
    }
    expect(await testbedContainers()).toEqual([]);
    expect(await testbedProcesses()).toEqual([]);
    expect((await readFile("/proc/mounts", "utf8")).split("\n").filter((l) => l.includes(".ferry/testbed"))).toEqual([]);
    expect(existsSync(path.join(REPO, ".ferry/testbed"))).toBe(false);
  }, 300_000);
});
