import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";

export interface ExecOptions {
  /** Written to the child's stdin, which is then closed. */
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** SIGKILL after this long; the error then says so. Default 60 s. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Exit codes that are not failures (default [0]). */
  okCodes?: number[];
}

export interface ExecResult {
  stdout: string;
  stderr: string;
  exitCode: number;
  durationMs: number;
}

/** A command that failed: it carries the command, its args, the exit code and stderr. */
export class ExecError extends Error {
  constructor(
    readonly command: string,
    readonly args: readonly string[],
    readonly exitCode: number | null,
    readonly stderr: string,
    readonly stdout: string,
    readonly reason: "exit" | "signal" | "timeout" | "spawn" | "aborted",
    detail?: string,
  ) {
    const what = detail ?? (exitCode === null ? reason : `exit code ${exitCode}`);
    const tail = stderr.trim().split("\n").slice(-5).join(" | ");
    super(`${command} ${args.join(" ")}: ${what}${tail ? `: ${tail}` : ""}`);
    this.name = "ExecError";
  }
}

/** One program to run, as it crosses to the launcher (structured-clone safe). */
interface RunRequest {
  command: string;
  args: readonly string[];
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  input?: string | Uint8Array;
  timeoutMs: number;
}

/** How it ended, before exit codes are judged. */
interface RunOutcome {
  stdout: string;
  stderr: string;
  code: number | null;
  signal: string | null;
  why?: "timeout" | "aborted";
  spawnError?: string;
  durationMs: number;
}

/**
 * Spawn, capture (capped at 8 MiB a stream), SIGKILL on timeout or `kill()`. Self-contained on
 * purpose (no imports, nothing from the enclosing scope): the launcher runs this function's
 * source text in its helper process, so both ways run the same code.
 */
function runProgram(spawnFn: typeof spawn, req: RunRequest, done: (o: RunOutcome) => void): { kill(): void } {
  const MAX_CAPTURE = 8 * 1024 * 1024;
  const started = performance.now();
  let child: ChildProcess;
  try {
    child = spawnFn(req.command, req.args, { env: req.env ?? process.env, cwd: req.cwd, stdio: ["pipe", "pipe", "pipe"] });
  } catch (e) {
    const durationMs = performance.now() - started;
    done({ stdout: "", stderr: "", code: null, signal: null, spawnError: (e as Error).message, durationMs });
    return { kill: () => undefined };
  }
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  let outLen = 0;
  let errLen = 0;
  let why: "timeout" | "aborted" | undefined;
  let ended = false;
  const end = (o: Omit<RunOutcome, "durationMs">): void => {
    if (ended) return;
    ended = true;
    clearTimeout(timer);
    done({ ...o, ...(why ? { why } : {}), durationMs: performance.now() - started });
  };
  child.stdout!.on("data", (b: Buffer) => {
    if (outLen < MAX_CAPTURE) out.push(b);
    outLen += b.length;
  });
  child.stderr!.on("data", (b: Buffer) => {
    if (errLen < MAX_CAPTURE) err.push(b);
    errLen += b.length;
  });
  const timer = setTimeout(() => {
    why = "timeout";
    child.kill("SIGKILL");
  }, req.timeoutMs);
  child.on("error", (e) => end({ stdout: "", stderr: "", code: null, signal: null, spawnError: e.message }));
  child.on("close", (code, sig) => {
    const text = (bs: Buffer[]): string => Buffer.concat(bs).toString("utf8");
    end({ stdout: text(out), stderr: text(err), code, signal: sig });
  });
  child.stdin!.on("error", () => {
    /* the child may exit without reading its input */
  });
  child.stdin!.end(req.input === undefined ? undefined : Buffer.from(req.input));
  return {
    kill: () => {
      why ??= "aborted";
      child.kill("SIGKILL");
    },
  };
}

/** Runs programs somewhere: in this process, or in the launcher's helper; an abort kills the program. */
interface Runner {
  run(req: RunRequest, signal?: AbortSignal): Promise<RunOutcome>;
}

const inProcess: Runner = {
  run: (req, signal) =>
    new Promise((resolve) => {
      const onAbort = (): void => h.kill();
      const h = runProgram(spawn, req, (o) => {
        signal?.removeEventListener("abort", onAbort);
        resolve(o);
      });
      signal?.addEventListener("abort", onAbort, { once: true });
    }),
};

let runner: Runner = inProcess;

/**
 * Run a program (no shell) and capture its output. The one way Ferry's adapters run external
 * tools, so that every failure reads the same: command, args, exit code, stderr. Runs from the
 * launcher's helper process once {@link useLauncher} was called, from this one otherwise.
 */
export async function exec(command: string, args: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
  if (opts.signal?.aborted) throw new ExecError(command, args, null, "", "", "aborted", "aborted before start");
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const req: RunRequest = {
    command,
    args: [...args],
    timeoutMs,
    ...(opts.env ? { env: opts.env } : {}),
    ...(opts.cwd ? { cwd: opts.cwd } : {}),
    ...(opts.input !== undefined ? { input: opts.input } : {}),
  };
  const o = await runner.run(req, opts.signal);
  if (o.spawnError !== undefined) throw new ExecError(command, args, null, "", "", "spawn", o.spawnError);
  if (o.why) {
    const detail = o.why === "timeout" ? `timed out after ${timeoutMs} ms` : "aborted";
    throw new ExecError(command, args, null, o.stderr, o.stdout, o.why, detail);
  }
  if (o.code === null) throw new ExecError(command, args, null, o.stderr, o.stdout, "signal", `killed by ${o.signal}`);
  if (!(opts.okCodes ?? [0]).includes(o.code)) throw new ExecError(command, args, o.code, o.stderr, o.stdout, "exit");
  return { stdout: o.stdout, stderr: o.stderr, exitCode: o.code, durationMs: o.durationMs };
}

/** A process's state letter and start time (clock ticks since boot), from /proc/<pid>/stat. */
export interface ProcessStat {
  /** R, S, D, Z (exited, not reaped), X (dead), ... */
  state: string;
  /** Field 22: another process given the same pid later has another. */
  startTime: number;
}

/** undefined when there is no such process. */
export function processStat(pid: number): ProcessStat | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return undefined;
  }
  // "pid (comm) S ppid ...": comm may hold spaces and parentheses; the fields follow its last ')'
  const fields = text.slice(text.lastIndexOf(")") + 2).split(" ");
  return { state: fields[0] ?? "", startTime: Number(fields[19]) };
}

/**
 * Whether the process exists and has not exited (and, given `startTime`, is the one that started
 * then, not a later one given the same pid). A zombie counts as gone: PID 1 on these machines
 * does not reap orphans, so an exited process may keep its pid for good.
 */
export function isRunning(pid: number, startTime?: number): boolean {
  const st = processStat(pid);
  return st !== undefined && st.state !== "Z" && st.state !== "X" && (startTime === undefined || st.startTime === startTime);
}

/*
 * The launcher: exec()'s programs are spawned by a small helper process instead of this one.
 *
 * Node spawns with fork() + exec() on the event loop's thread (libuv's uv_spawn), and fork copies
 * the page tables of the whole process: each spawn stalls the event loop in proportion to the
 * resident size (1 ms at 44 MiB, 14 ms at 245 MiB on this machine). An agent holds about 100 MiB
 * and runs ip, ovs-vsctl, ovs-ofctl and runc for nearly every call, so every spawn would hold up
 * every other call it is serving, migrations in parallel above all. The helper is a bare Node
 * process (about 40 MiB, no modules) that runs `runProgram` on request over an IPC channel; it
 * exits when its parent does. It inherits the parent's namespaces, cwd and environment.
 */
const HELPER_SOURCE = `"use strict";
const { spawn } = require("node:child_process");
// Run from TypeScript sources (tsx, vitest), esbuild's keepNames wraps functions in __name().
const __name = (f) => f;
const runProgram = ${runProgram.toString()};
const running = new Map();
process.on("message", (m) => {
  if (m.t === "run") {
    running.set(m.id, runProgram(spawn, m.req, (out) => {
      running.delete(m.id);
      process.send({ id: m.id, out });
    }));
  } else if (m.t === "kill") running.get(m.id)?.kill();
});
process.on("disconnect", () => process.exit(0));
`;

/** One helper process and the programs it is running for us. */
interface Helper {
  proc: ChildProcess;
  pending: Map<number, (o: RunOutcome) => void>;
}

class Launcher implements Runner {
  private helper: Helper | undefined;
  private seq = 0;

  run(req: RunRequest, signal?: AbortSignal): Promise<RunOutcome> {
    const { proc, pending } = this.start();
    const id = ++this.seq;
    return new Promise((resolve) => {
      const onAbort = (): void => {
        proc.send({ t: "kill", id });
      };
      // The channel keeps this process alive only while a program runs.
      if (pending.size === 0) proc.channel?.ref();
      pending.set(id, (o) => {
        signal?.removeEventListener("abort", onAbort);
        if (pending.size === 0) proc.channel?.unref();
        resolve(o);
      });
      signal?.addEventListener("abort", onAbort, { once: true });
      proc.send({ t: "run", id, req });
    });
  }

  close(): void {
    if (this.helper?.proc.connected) this.helper.proc.disconnect();
    this.helper = undefined;
  }

  /** The helper, started now if there is none (or the last one died). */
  private start(): Helper {
    if (this.helper?.proc.connected) return this.helper;
    const proc = spawn(process.execPath, ["-e", HELPER_SOURCE], {
      stdio: ["ignore", "inherit", "inherit", "ipc"],
      serialization: "advanced",
    });
    const h: Helper = { proc, pending: new Map() };
    // Never keeps this process alive when idle (see run).
    proc.unref();
    proc.channel?.unref();
    proc.on("message", (m: { id: number; out: RunOutcome }) => {
      const done = h.pending.get(m.id);
      h.pending.delete(m.id);
      done?.(m.out);
    });
    // What a dead helper was running is lost with it: fail those calls; the next starts a new
    // helper. Its channel closes first ("disconnect"), and is what keeps this process waiting.
    const lost = (why: string): void => {
      if (this.helper === h) this.helper = undefined;
      for (const [id, done] of h.pending) {
        h.pending.delete(id);
        done({
          stdout: "",
          stderr: "",
          code: null,
          signal: null,
          spawnError: `the launcher helper ${why} while the program ran`,
          durationMs: 0,
        });
      }
    };
    proc.on("disconnect", () => lost("went away"));
    proc.on("exit", (code, sig) => lost(`exited (${sig ?? `code ${code}`})`));
    this.helper = h;
    return h;
  }
}

/**
 * From now on, exec() spawns from the launcher's helper process (see above). Returns a function
 * that goes back to spawning in this process and stops the helper.
 */
export function useLauncher(): () => void {
  const l = new Launcher();
  runner = l;
  return () => {
    if (runner === l) runner = inProcess;
    l.close();
  };
}
