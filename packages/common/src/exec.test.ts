import { spawn } from "node:child_process";
import { mkdtempSync, readlinkSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ExecError, LAUNCHER_HELPER, exec, isRunning, processStat, useLauncher } from "./exec.js";

// The same behaviour whether this process spawns or the launcher's helper does.
describe.each([
  ["in this process", () => () => undefined],
  ["through the launcher", useLauncher],
])("exec %s", (_how, install) => {
  let uninstall: () => void;
  beforeAll(() => {
    uninstall = install();
  });
  afterAll(() => uninstall());

  it("captures stdout and stderr and feeds stdin", async () => {
    const r = await exec("sh", ["-c", "cat; echo err >&2"], { input: "hello" });
    expect(r.stdout).toBe("hello");
    expect(r.stderr).toBe("err\n");
    expect(r.exitCode).toBe(0);
    expect((await exec("sh", ["-c", "cat | wc -c"], { input: Buffer.alloc(300_000, 1) })).stdout.trim()).toBe("300000");
  });

  it("passes env and cwd", async () => {
    const r = await exec("sh", ["-c", 'echo "$FERRY_X" && pwd'], { env: { FERRY_X: "yes", PATH: process.env.PATH }, cwd: "/tmp" });
    expect(r.stdout).toBe("yes\n/tmp\n");
  });

  it("a non-zero exit carries command, args, exit code and stderr", async () => {
    const e = await exec("sh", ["-c", "echo nope >&2; exit 3"]).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(ExecError);
    const x = e as ExecError;
    expect(x.command).toBe("sh");
    expect(x.args).toEqual(["-c", "echo nope >&2; exit 3"]);
    expect(x.exitCode).toBe(3);
    expect(x.stderr).toBe("nope\n");
    expect(x.reason).toBe("exit");
    expect(x.message).toContain("exit code 3");
    expect(x.message).toContain("nope");
  });

  it("accepts listed exit codes", async () => {
    const r = await exec("sh", ["-c", "exit 1"], { okCodes: [0, 1] });
    expect(r.exitCode).toBe(1);
  });

  it("reports a program killed by a signal", async () => {
    const e = (await exec("sh", ["-c", "kill -TERM $$"]).catch((x: unknown) => x)) as ExecError;
    expect(e.reason).toBe("signal");
    expect(e.message).toContain("killed by SIGTERM");
  });

  it("kills a command that runs past its timeout", async () => {
    const t = performance.now();
    const e = (await exec("sleep", ["5"], { timeoutMs: 100 }).catch((x: unknown) => x)) as ExecError;
    expect(e.reason).toBe("timeout");
    expect(e.message).toContain("timed out after 100 ms");
    expect(performance.now() - t).toBeLessThan(3000);
  });

  it("stops on abort", async () => {
    const ac = new AbortController();
    const t = performance.now();
    const p = exec("sleep", ["5"], { signal: ac.signal });
    setTimeout(() => ac.abort(), 50);
    const e = (await p.catch((x: unknown) => x)) as ExecError;
    expect(e.reason).toBe("aborted");
    expect(performance.now() - t).toBeLessThan(3000);
  });

  it("reports a missing program as a spawn error", async () => {
    const e = (await exec("/nonexistent/ferry-tool", ["a"]).catch((x: unknown) => x)) as ExecError;
    expect(e).toBeInstanceOf(ExecError);
    expect(e.reason).toBe("spawn");
    expect(e.exitCode).toBeNull();
    expect(e.message).toContain("/nonexistent/ferry-tool a");
  });

  it("looks a bare command up in the PATH it is given", async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "ferry-exec-"));
    try {
      writeFileSync(path.join(dir, "ferry-exec-probe"), "#!/bin/sh\necho found $1\n", { mode: 0o755 });
      const r = await exec("ferry-exec-probe", ["it"], { env: { PATH: `/nonexistent:${dir}:${process.env.PATH}` } });
      expect(r.stdout).toBe("found it\n");
      const e = (await exec("ferry-exec-probe", [], { env: { PATH: "/nonexistent" } }).catch((x: unknown) => x)) as ExecError;
      expect(e.reason).toBe("spawn");
      expect(e.message).toContain("ENOENT");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("captures at most 8 MiB a stream, and still waits for the program's end", async () => {
    const r = await exec("sh", ["-c", "head -c 10000000 /dev/zero; echo done >&2"]);
    expect(r.stdout.length).toBe(8 * 1024 * 1024);
    expect(r.stderr).toBe("done\n");
  });

  it("runs many at once", async () => {
    const rs = await Promise.all(Array.from({ length: 20 }, (_, i) => exec("sh", ["-c", `echo ${i}`])));
    expect(rs.map((r) => r.stdout.trim())).toEqual(Array.from({ length: 20 }, (_, i) => String(i)));
  });
});

describe("the launcher", () => {
  it("spawns from its helper, not from this process; a helper that dies fails its calls, and the next starts a new one", async () => {
    const uninstall = useLauncher();
    try {
      const parent = async (): Promise<number> => Number((await exec("sh", ["-c", "echo $PPID"])).stdout);
      const helper = await parent();
      expect(helper).not.toBe(process.pid);
      expect((await exec("ps", ["-o", "ppid=", "-p", String(helper)])).stdout.trim()).toBe(String(process.pid));
      expect(readlinkSync(`/proc/${helper}/exe`)).toBe(LAUNCHER_HELPER);
      // Kill the helper while it runs a program: that call fails, saying why; the next one works.
      const running = exec("sleep", ["5"]);
      await new Promise((r) => setTimeout(r, 100));
      process.kill(helper, "SIGKILL");
      const e = (await running.catch((x: unknown) => x)) as ExecError;
      expect(e.reason).toBe("spawn");
      expect(e.message).toMatch(/the launcher helper (went away|exited \(SIGKILL\)) while the program ran/);
      const next = await parent();
      expect(next).not.toBe(helper);
      expect(next).not.toBe(process.pid);
    } finally {
      uninstall();
    }
  });

  it("does not keep a finished process alive, and its helper goes with it", async () => {
    const execPath = fileURLToPath(new URL("./exec.ts", import.meta.url));
    const script = `import { exec, useLauncher } from ${JSON.stringify(execPath)};
      useLauncher();
      const r = await exec("sh", ["-c", "echo $PPID"]);
      process.stdout.write("helper " + r.stdout);`;
    const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      cwd: fileURLToPath(new URL("../../..", import.meta.url)),
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    const code = await new Promise<number | null>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`still running after 10 s: ${out}`)), 10_000);
      child.on("exit", (c) => {
        clearTimeout(t);
        resolve(c);
      });
    });
    expect(code).toBe(0);
    const helper = Number(/helper (\d+)/.exec(out)?.[1]);
    expect(helper).toBeGreaterThan(0);
    // The helper exits once its parent is gone (its IPC channel closes).
    for (let i = 0; i < 100 && isRunning(helper); i++) await new Promise((r) => setTimeout(r, 20));
    expect(isRunning(helper)).toBe(false);
  });
});

describe("processStat and isRunning", () => {
  it("read a live process, tell a reused pid by its start time, and count an exited one as gone", async () => {
    const me = processStat(process.pid)!;
    expect(me.state).toMatch(/^[RS]$/);
    expect(isRunning(process.pid)).toBe(true);
    expect(isRunning(process.pid, me.startTime)).toBe(true);
    expect(isRunning(process.pid, me.startTime + 1)).toBe(false);
    expect(processStat(0x3ffffff)).toBeUndefined();
    expect(isRunning(0x3ffffff)).toBe(false);
    // an exited process that its parent does not reap is a zombie: gone. sh's background child
    // exits only after sh has become a `sleep` that never waits (a child that exits at once may
    // be reaped by sh itself before its exec: seen once on CI)
    const parent = spawn("sh", ["-c", "sleep 0.3 & echo $!; exec sleep 5"], { stdio: ["ignore", "pipe", "ignore"] });
    const pid = Number(await new Promise<string>((r) => parent.stdout.once("data", (d: Buffer) => r(d.toString()))));
    for (let i = 0; i < 100 && processStat(pid)?.state !== "Z"; i++) await new Promise((r) => setTimeout(r, 10));
    expect(processStat(pid)?.state).toBe("Z");
    expect(isRunning(pid)).toBe(false);
    parent.kill("SIGKILL");
  });
});
