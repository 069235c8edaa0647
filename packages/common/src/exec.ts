import { spawn } from "node:child_process";

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

const MAX_CAPTURE = 8 * 1024 * 1024;

/**
 * Run a program (no shell) and capture its output. The one way Ferry's adapters run external
 * tools, so that every failure reads the same: command, args, exit code, stderr.
 */
export function exec(command: string, args: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
  const started = performance.now();
  const okCodes = opts.okCodes ?? [0];
  return new Promise((resolve, reject) => {
    if (opts.signal?.aborted) {
      reject(new ExecError(command, args, null, "", "", "aborted", "aborted before start"));
      return;
    }
    const child = spawn(command, args, {
      env: opts.env ?? process.env,
      cwd: opts.cwd,
      stdio: ["pipe", "pipe", "pipe"],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outLen = 0;
    let errLen = 0;
    let why: "timeout" | "aborted" | undefined;
    child.stdout.on("data", (b: Buffer) => {
      if (outLen < MAX_CAPTURE) out.push(b);
      outLen += b.length;
    });
    child.stderr.on("data", (b: Buffer) => {
      if (errLen < MAX_CAPTURE) err.push(b);
      errLen += b.length;
    });
    const timer = setTimeout(() => {
      why = "timeout";
      child.kill("SIGKILL");
    }, opts.timeoutMs ?? 60_000);
    const onAbort = (): void => {
      why = "aborted";
      child.kill("SIGKILL");
    };
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    child.on("error", (e) => {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
      reject(new ExecError(command, args, null, "", "", "spawn", e.message));
    });
    child.on("close", (code, sig) => {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
      const stdout = Buffer.concat(out).toString("utf8");
      const stderr = Buffer.concat(err).toString("utf8");
      const durationMs = performance.now() - started;
      if (why) {
        const detail = why === "timeout" ? `timed out after ${opts.timeoutMs ?? 60_000} ms` : "aborted";
        reject(new ExecError(command, args, null, stderr, stdout, why, detail));
      } else if (code === null) {
        reject(new ExecError(command, args, null, stderr, stdout, "signal", `killed by ${sig}`));
      } else if (!okCodes.includes(code)) {
        reject(new ExecError(command, args, code, stderr, stdout, "exit"));
      } else {
        resolve({ stdout, stderr, exitCode: code, durationMs });
      }
    });
    child.stdin.on("error", () => {
      /* the child may exit without reading its input */
    });
    child.stdin.end(opts.input);
  });
}
