import { spawn, type ChildProcess } from "node:child_process";
import { readFile } from "node:fs/promises";
import { FerryError } from "@ferry/common";

/** A daemon started inside a network namespace, remembered by its pidfile. */
export interface DaemonSpec {
  /** Program and args, run as `nsenter --net=<netnsPath> <program> <args...>`. */
  program: string;
  args: string[];
  netnsPath: string;
  env: NodeJS.ProcessEnv;
  pidfile: string;
  logfile: string;
  /** A path that must appear in the process's command line before we signal it (pid reuse guard). */
  marker: string;
  /**
   * true: the daemon forks away (OVS `--detach`) and outlives this process; it is then reparented
   * to the nearest subreaper (run under `tini -s`: PID 1 here does not reap, a killed daemon
   * would stay a zombie). false (default): it stays our child and Node reaps it.
   */
  detach?: boolean;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function tail(file: string): Promise<string> {
  const t = await readFile(file, "utf8").catch(() => "");
  return t.trim().split("\n").slice(-5).join(" | ");
}

/** Is `pid` alive and ours? Zombies and foreign processes count as "no". */
async function isOurs(pid: number, marker: string): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
  if (!stat) return false;
  const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
  if (state === "Z" || state === "X") return false;
  const cmdline = await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
  return cmdline.includes(marker);
}

/** Start a daemon and wait until its pidfile names a live process. */
export async function startDaemon(spec: DaemonSpec, readyTimeoutMs = 10_000): Promise<ChildProcess | undefined> {
  // Not `ip netns exec`: that also makes a new mount namespace (and CRIU must share ours).
  const args = [`--net=${spec.netnsPath}`, spec.program, ...spec.args, `--pidfile=${spec.pidfile}`, `--log-file=${spec.logfile}`];
  if (spec.detach) args.push("--detach", "--no-chdir");
  const child = spawn("nsenter", args, { env: spec.env, stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (b: Buffer) => {
    if (stderr.length < 4096) stderr += b.toString("utf8");
  });
  let exited: number | null | undefined;
  child.on("exit", (code) => {
    exited = code;
  });
  const deadline = performance.now() + readyTimeoutMs;
  for (;;) {
    const pid = await readPid(spec.pidfile);
    if (pid !== undefined && (await isOurs(pid, spec.marker))) break;
    // With --detach the launcher exits 0 once the daemon is ready; anything else is a failure.
    if (exited !== undefined && !(spec.detach && exited === 0)) {
      throw new FerryError(
        "Internal",
        `${spec.program} exited (${exited}) while starting: ${stderr.trim() || (await tail(spec.logfile))}`,
        {
          fix: `read ${spec.logfile}`,
        },
      );
    }
    if (performance.now() > deadline) {
      child.kill("SIGKILL");
      throw new FerryError(
        "DeadlineExceeded",
        `${spec.program} did not write ${spec.pidfile} within ${readyTimeoutMs} ms: ${await tail(spec.logfile)}`,
      );
    }
    await sleep(20);
  }
  return spec.detach ? undefined : child;
}

async function readPid(pidfile: string): Promise<number | undefined> {
  const t = await readFile(pidfile, "utf8").catch(() => "");
  const pid = Number(t.trim());
  return Number.isInteger(pid) && pid > 1 ? pid : undefined;
}

/**
 * Stop the daemon named by `pidfile` (TERM, then KILL after `graceMs`), only if its command line
 * holds `marker`: a stale pidfile must never make us signal somebody else's process. Safe to call
 * twice. `child` (when we started it without --detach) is awaited so that it is reaped.
 */
export async function stopDaemon(pidfile: string, marker: string, child?: ChildProcess, graceMs = 3000): Promise<void> {
  const pid = await readPid(pidfile);
  const childGone = (): boolean => !child || child.exitCode !== null || child.signalCode !== null;
  if (pid === undefined || !(await isOurs(pid, marker))) {
    if (!childGone()) child!.kill("SIGKILL");
  } else {
    process.kill(pid, "SIGTERM");
    const deadline = performance.now() + graceMs;
    while ((await isOurs(pid, marker)) && performance.now() < deadline) await sleep(20);
    if (await isOurs(pid, marker)) process.kill(pid, "SIGKILL");
  }
  if (child && !childGone()) await new Promise<void>((r) => child.once("exit", () => r()));
  while (pid !== undefined && (await isOurs(pid, marker))) await sleep(20);
}
