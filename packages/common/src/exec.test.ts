import { describe, expect, it } from "vitest";
import { ExecError, exec } from "./exec.js";

describe("exec", () => {
  it("captures stdout and stderr and feeds stdin", async () => {
    const r = await exec("sh", ["-c", "cat; echo err >&2"], { input: "hello" });
    expect(r.stdout).toBe("hello");
    expect(r.stderr).toBe("err\n");
    expect(r.exitCode).toBe(0);
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

  it("kills a command that runs past its timeout", async () => {
    const t = performance.now();
    const e = (await exec("sleep", ["5"], { timeoutMs: 100 }).catch((x: unknown) => x)) as ExecError;
    expect(e.reason).toBe("timeout");
    expect(e.message).toContain("timed out after 100 ms");
    expect(performance.now() - t).toBeLessThan(3000);
  });

  it("stops on abort", async () => {
    const ac = new AbortController();
    const p = exec("sleep", ["5"], { signal: ac.signal });
    ac.abort();
    const e = (await p.catch((x: unknown) => x)) as ExecError;
    expect(e.reason).toBe("aborted");
  });

  it("reports a missing program as a spawn error", async () => {
    const e = (await exec("/nonexistent/ferry-tool", ["a"]).catch((x: unknown) => x)) as ExecError;
    expect(e).toBeInstanceOf(ExecError);
    expect(e.reason).toBe("spawn");
    expect(e.exitCode).toBeNull();
    expect(e.message).toContain("/nonexistent/ferry-tool a");
  });
});
