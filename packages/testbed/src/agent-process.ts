import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, openSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { FerryError, isRunning } from "@ferry/common";
import type { EmulatedHost } from "./testbed.js";

const AGENT_DIR = fileURLToPath(new URL("../../agent/", import.meta.url));
export const REPO_ROOT = fileURLToPath(new URL("../../../", import.meta.url));

export interface AgentProcessOptions {
  host: EmulatedHost;
  /** Directory made by deploy/certs.sh holding ca.crt and <host name>.crt/.key; insecure when absent. */
  certsDir?: string;
  stateDir: string;
  port?: number;
  /** Run packages/agent/src/main.ts through tsx (tests) instead of the built dist/main.js. */
  fromSource?: boolean;
  env?: NodeJS.ProcessEnv;
  /** Container namespaces' prefix; default the host's own ("<host netns>-"). */
  netnsPrefix?: string;
  /** More ferry-agent flags, e.g. ["--criu", "/path/to/criu"]. */
  extraArgs?: string[];
  /**
   * Outlive this process (`make testbed-up`): stdout and stderr go to this file, and `stop()`
   * (or {@link stopPid} from another process) ends it by pid.
   */
  detachedLog?: string;
  /** Called with every line the agent writes to stderr (its JSON log). */
  onLog?: (line: string) => void;
  /** With `detachedLog`: see {@link DetachedOptions}. */
  detached?: DetachedOptions;
}

export interface DetachedOptions {
  /** Called with the pid as soon as the process exists, before it is ready: record it for `down`. */
  onSpawn?: (pid: number) => Promise<void>;
  /** Stop waiting for "ready" (the process is left to whoever recorded its pid). */
  signal?: AbortSignal;
}

export interface AgentProcess {
  child: ChildProcess;
  /** "<underlay ip>:<port>": where the controller and peer agents reach it. */
  address: string;
  name: string;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process is gone. */
  stop(graceMs?: number): Promise<void>;
}

/**
 * Start a ferry-agent inside an emulated host: `nsenter --net` (not `ip netns exec`, which would
 * give it a mount namespace of its own, and CRIU must share the mounts of what it dumps) under
 * `tini -s`, so that containers it restores, re-parented to the nearest subreaper, get reaped.
 */
export async function spawnAgent(o: AgentProcessOptions): Promise<AgentProcess> {
  const port = o.port ?? 7441;
  const entry = o.fromSource ? [`--conditions=source`, "--import", "tsx", `${AGENT_DIR}src/main.ts`] : [`${AGENT_DIR}dist/main.js`];
  const args = [
    `--net=${o.host.netnsPath}`,
    "tini",
    "-s",
    "--",
    process.execPath,
    ...entry,
    "--name",
    o.host.name,
    "--listen",
    `${o.host.underlayIp}:${port}`,
    "--state-dir",
    o.stateDir,
    ...(o.certsDir ? ["--tls-dir", o.certsDir] : ["--insecure"]),
    "--netns-prefix",
    o.netnsPrefix ?? o.host.netnsPrefix,
    "--ovs-rundir",
    o.host.ovsDir,
    "--ovs-db",
    o.host.dbSock,
    "--bridge",
    o.host.bridge,
    ...(o.extraArgs ?? []),
  ];
  if (o.detachedLog) {
    return spawnDetached(o.host.name, ["nsenter", ...args], o.detachedLog, `${o.host.underlayIp}:${port}`, o.env, o.detached);
  }
  const child = spawn("nsenter", args, { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...o.env } });
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (d: string) => {
    stderr = (stderr + d).slice(-8000);
    if (o.onLog) for (const l of d.split("\n").filter(Boolean)) o.onLog(l);
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  await new Promise<void>((resolve, reject) => {
    let out = "";
    const timer = setTimeout(
      () => reject(new FerryError("DeadlineExceeded", `agent ${o.host.name} did not start in 30 s: ${stderr}`)),
      30_000,
    );
    child.stdout.setEncoding("utf8").on("data", (d: string) => {
      out += d;
      if (/ready port=\d+/.test(out)) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new FerryError("Internal", `agent ${o.host.name} exited with ${code} before it was ready: ${stderr}`));
    });
  });
  return {
    child,
    address: `${o.host.underlayIp}:${port}`,
    name: o.host.name,
    stop: async (graceMs = 5000) => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), graceMs);
      await exited;
      clearTimeout(t);
    },
  };
}

/**
 * Start a process that outlives us (its own session, output to `logFile`) and wait until it
 * prints "ready port=N". Used by `make testbed-up` for agents and the controller.
 */
export async function spawnDetached(
  name: string,
  argv: string[],
  logFile: string,
  address: string,
  env?: NodeJS.ProcessEnv,
  opts: DetachedOptions = {},
): Promise<AgentProcess> {
  const fd = openSync(logFile, "a");
  const child = spawn(argv[0]!, argv.slice(1), {
    cwd: REPO_ROOT,
    detached: true,
    stdio: ["ignore", fd, fd],
    env: { ...process.env, ...env },
  });
  closeSync(fd);
  child.unref();
  if (child.pid !== undefined) await opts.onSpawn?.(child.pid);
  const deadline = Date.now() + 30_000;
  for (;;) {
    opts.signal?.throwIfAborted();
    const text = readFileSync(logFile, "utf8");
    if (/ready port=\d+/.test(text)) break;
    if (child.exitCode !== null || Date.now() > deadline) {
      throw new FerryError("Internal", `${name} did not start (see ${logFile}): ${text.slice(-2000)}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return { child, address, name, stop: (graceMs) => stopPid(child.pid!, graceMs) };
}

/** SIGTERM a process we started (by pid), SIGKILL after `graceMs`; resolves when it is gone. */
export async function stopPid(pid: number, graceMs = 5000): Promise<void> {
  if (!isRunning(pid)) return;
  process.kill(pid, "SIGTERM");
  const end = Date.now() + graceMs;
  while (isRunning(pid) && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
  if (isRunning(pid)) process.kill(pid, "SIGKILL");
  while (isRunning(pid)) await new Promise((r) => setTimeout(r, 50));
}
