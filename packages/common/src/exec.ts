import { spawn, type ChildProcess } from "node:child_process";
import { accessSync, constants as fsConstants, readFileSync } from "node:fs";
import type { Socket } from "node:net";
import { constants as osConstants } from "node:os";
import type { Writable } from "node:stream";
import { fileURLToPath } from "node:url";
import { FerryError } from "./errors.js";

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

/** One program to run, as it crosses to the launcher. */
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
 * Spawn from this process, capture (capped at 8 MiB a stream), SIGKILL on timeout or `kill()`:
 * what the launcher's helper does too (see below).
 */
function runProgram(req: RunRequest, done: (o: RunOutcome) => void): { kill(): void } {
  const MAX_CAPTURE = 8 * 1024 * 1024;
  const started = performance.now();
  let child: ChildProcess;
  try {
    child = spawn(req.command, req.args, { env: req.env ?? process.env, cwd: req.cwd, stdio: ["pipe", "pipe", "pipe"] });
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
    if (outLen < MAX_CAPTURE) out.push(b.subarray(0, MAX_CAPTURE - outLen));
    outLen += b.length;
  });
  child.stderr!.on("data", (b: Buffer) => {
    if (errLen < MAX_CAPTURE) err.push(b.subarray(0, MAX_CAPTURE - errLen));
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
      const h = runProgram(req, (o) => {
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
 * every other call it is serving, migrations in parallel above all. The helper is `ferry-spawn`
 * (../native/ferry-spawn.c, built by `npm run build` into dist/): it starts each program with
 * posix_spawn (no page tables copied), feeds it, captures it, kills it on a timeout or an abort,
 * and answers when it has closed its outputs and exited. Frames over the helper's stdin and stdout;
 * the protocol is written at the top of the C file. It inherits this process's namespaces, cwd
 * and environment, and exits when this process does (its stdin closes).
 */
export const LAUNCHER_HELPER = fileURLToPath(new URL("../dist/ferry-spawn", import.meta.url));

const SIGNAL_NAMES = new Map(Object.entries(osConstants.signals).map(([name, n]) => [n, name]));

function str(s: string | Uint8Array): Buffer[] {
  const b = typeof s === "string" ? Buffer.from(s) : Buffer.from(s.buffer, s.byteOffset, s.byteLength);
  const n = Buffer.alloc(4);
  n.writeUInt32LE(b.length);
  return [n, b];
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v);
  return b;
}

function frame(parts: Buffer[]): Buffer {
  const body = Buffer.concat(parts);
  return Buffer.concat([u32(body.length), body]);
}

function runFrame(id: number, req: RunRequest): Buffer {
  const env = req.env ? Object.entries(req.env).filter((kv): kv is [string, string] => kv[1] !== undefined) : undefined;
  const flags = (env ? 1 : 0) | (req.cwd !== undefined ? 2 : 0);
  return frame([
    Buffer.from([1]),
    u32(id),
    u32(Math.min(Math.max(0, Math.round(req.timeoutMs)), 0xffffffff)),
    Buffer.from([flags]),
    ...str(req.command),
    u32(req.args.length + 1),
    ...[req.command, ...req.args].flatMap((a) => str(a)),
    ...(env ? [u32(env.length), ...env.flatMap(([k, v]) => str(`${k}=${v}`))] : []),
    ...(req.cwd !== undefined ? str(req.cwd) : []),
    ...str(req.input ?? ""),
  ]);
}

/** One answer frame's body (see the C file). */
function parseAnswer(b: Buffer): { id: number; out: RunOutcome } {
  const id = b.readUInt32LE(0);
  const how = b.readUInt8(4);
  const value = b.readInt32LE(5);
  const why = b.readUInt8(9);
  const durationMs = b.readUInt32LE(10) / 1000;
  const outLen = b.readUInt32LE(14);
  const stdout = b.toString("utf8", 18, 18 + outLen);
  const errAt = 18 + outLen;
  const stderr = b.toString("utf8", errAt + 4, errAt + 4 + b.readUInt32LE(errAt));
  if (how === 2) return { id, out: { stdout: "", stderr: "", code: null, signal: null, spawnError: stderr, durationMs } };
  return {
    id,
    out: {
      stdout,
      stderr,
      code: how === 0 ? value : null,
      signal: how === 1 ? (SIGNAL_NAMES.get(value) ?? `signal ${value}`) : null,
      ...(why === 1 ? { why: "timeout" as const } : why === 2 ? { why: "aborted" as const } : {}),
      durationMs,
    },
  };
}

/** The helper's ends of its pipes, and the programs it is running for us. */
interface Helper {
  requests: Writable;
  answers: Socket;
  pending: Map<number, (o: RunOutcome) => void>;
}

class Launcher implements Runner {
  private helper: Helper | undefined;
  private seq = 0;

  run(req: RunRequest, signal?: AbortSignal): Promise<RunOutcome> {
    const { requests, answers, pending } = this.start();
    const id = ++this.seq;
    return new Promise((resolve) => {
      const onAbort = (): void => void requests.write(frame([Buffer.from([2]), u32(id)]));
      // The answer pipe keeps this process alive only while a program runs.
      if (pending.size === 0) answers.ref();
      pending.set(id, (o) => {
        signal?.removeEventListener("abort", onAbort);
        if (pending.size === 0) answers.unref();
        resolve(o);
      });
      signal?.addEventListener("abort", onAbort, { once: true });
      requests.write(runFrame(id, req));
    });
  }

  close(): void {
    this.helper?.requests.end();
    this.helper = undefined;
  }

  /** The helper, started now if there is none (or the last one died). */
  private start(): Helper {
    if (this.helper) return this.helper;
    const proc = spawn(LAUNCHER_HELPER, [], { stdio: ["pipe", "pipe", "inherit"] });
    // Child pipes are sockets; an idle helper never keeps this process alive (see run).
    const answers = proc.stdout as unknown as Socket;
    const h: Helper = { requests: proc.stdin, answers, pending: new Map() };
    proc.unref();
    (proc.stdin as unknown as Socket).unref();
    answers.unref();
    proc.stdin.on("error", () => {
      /* a dead helper: "exit" fails its calls */
    });
    // An answer's chunks are joined once it is whole, not chunk by chunk (16 MiB of output
    // arrive in ~250 reads of 64 KiB).
    let chunks: Buffer[] = [];
    let have = 0;
    answers.on("data", (d: Buffer) => {
      chunks.push(d);
      have += d.length;
      while (have >= 4) {
        if (chunks[0]!.length < 4) chunks = [Buffer.concat(chunks, have)];
        const need = 4 + chunks[0]!.readUInt32LE(0);
        if (have < need) return;
        const all = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, have);
        const { id, out } = parseAnswer(all.subarray(4, need));
        chunks = all.length > need ? [all.subarray(need)] : [];
        have -= need;
        const done = h.pending.get(id);
        h.pending.delete(id);
        done?.(out);
      }
    });
    // What a dead helper was running is lost with it: fail those calls; the next starts a new helper.
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
    proc.on("error", (e) => lost(`could not start (${e.message})`));
    answers.on("close", () => lost("went away"));
    proc.on("exit", (code, sig) => lost(`exited (${sig ?? `code ${code}`})`));
    this.helper = h;
    return h;
  }
}

/**
 * From now on, exec() spawns from the launcher's helper (see above). Returns a function that goes
 * back to spawning in this process and stops the helper. Throws when the helper was not built.
 */
export function useLauncher(): () => void {
  try {
    accessSync(LAUNCHER_HELPER, fsConstants.X_OK);
  } catch {
    throw new FerryError("FailedPrecondition", `the launcher's helper ${LAUNCHER_HELPER} is missing`, {
      fix: "build it with `make build` (needs gcc), or spawn from this process (ferry-agent --spawn in-process)",
    });
  }
  const l = new Launcher();
  runner = l;
  return () => {
    if (runner === l) runner = inProcess;
    l.close();
  };
}
