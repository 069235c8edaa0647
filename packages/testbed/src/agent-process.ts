import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { FerryError } from "@ferry/common";
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
  /** More ferry-agent flags, e.g. ["--criu", "/path/to/criu"]. */
  extraArgs?: string[];
  /** Called with every line the agent writes to stderr (its JSON log). */
  onLog?: (line: string) => void;
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
    o.host.netnsPrefix,
    "--ovs-rundir",
    o.host.ovsDir,
    "--ovs-db",
    o.host.dbSock,
    "--bridge",
    o.host.bridge,
    ...(o.extraArgs ?? []),
  ];
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
