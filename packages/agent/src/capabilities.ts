import { readFile } from "node:fs/promises";
import os from "node:os";
import type { GetCapabilitiesResponse } from "@ferry/api/agent";
import { exec } from "@ferry/common";

export interface CapabilityProbeOptions {
  criuPath: string;
  runcPath: string;
  /** Environment for ovs-vsctl (OVS_RUNDIR, --db) of this host's OVS instance. */
  ovsDbSock?: string;
  agentVersion: string;
}

async function tryExec(cmd: string, args: string[]): Promise<string | undefined> {
  try {
    const r = await exec(cmd, args, { timeoutMs: 15_000 });
    return r.stdout + r.stderr;
  } catch {
    return undefined;
  }
}

/** The features Ferry asks CRIU about; each decides whether a migration mode is possible. */
const CRIU_FEATURES = ["mem_dirty_track", "uffd", "uffd-noncoop", "lazy_pages"] as const;

/**
 * What this host can do, measured rather than assumed: CRIU's version and `criu check`,
 * kernel, CPU flags, runtime, OVS. Computed once at start-up (a few hundred ms of probes).
 */
export async function probeCapabilities(opts: CapabilityProbeOptions): Promise<GetCapabilitiesResponse> {
  const [criuVersionOut, criuCheckOut, runcOut, ovsOut, cpuinfo, cgroupV2] = await Promise.all([
    tryExec(opts.criuPath, ["--version"]),
    tryExec(opts.criuPath, ["check"]),
    tryExec(opts.runcPath, ["--version"]),
    tryExec("ovs-vswitchd", ["--version"]),
    readFile("/proc/cpuinfo", "utf8").catch(() => ""),
    readFile("/sys/fs/cgroup/cgroup.controllers", "utf8").then(
      () => true,
      () => false,
    ),
  ]);
  const features: string[] = [];
  if (criuCheckOut !== undefined) {
    const checks = await Promise.all(CRIU_FEATURES.map((f) => tryExec(opts.criuPath, ["check", "--feature", f])));
    CRIU_FEATURES.forEach((f, i) => {
      if (checks[i] !== undefined) features.push(f);
    });
  }
  const criuVersion = /Version:\s*([\d.]+)/.exec(criuVersionOut ?? "")?.[1] ?? "";
  const firstCpu = cpuinfo.split("\n\n")[0] ?? "";
  const flags = /^flags\s*:\s*(.*)$/m.exec(firstCpu)?.[1]?.trim().split(/\s+/) ?? [];
  const model = /^model name\s*:\s*(.*)$/m.exec(firstCpu)?.[1]?.trim() ?? os.cpus()[0]?.model ?? "";
  const runc = /runc version\s+(\S+)/.exec(runcOut ?? "")?.[1];
  return {
    hostname: os.hostname(),
    agentVersion: opts.agentVersion,
    kernel: os.release(),
    arch: process.arch,
    criu: { version: criuVersion, path: opts.criuPath, checkOk: criuCheckOut !== undefined, features },
    runtime: runc ? `runc ${runc}` : "",
    cpuFlags: flags,
    cpuModel: model,
    ovsVersion: /\(Open vSwitch\)\s*(\S+)/.exec(ovsOut ?? "")?.[1] ?? "",
    cgroupVersion: cgroupV2 ? "v2" : "v1",
    dirtyTracking: features.includes("mem_dirty_track"),
    userfaultfd: features.includes("uffd"),
  };
}

/** "4.2.1" >= "4.2"? Missing parts count as 0. */
export function versionAtLeast(version: string, min: string): boolean {
  const a = version.split(".").map(Number);
  const b = min.split(".").map(Number);
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    const x = a[i] ?? 0;
    const y = b[i] ?? 0;
    if (Number.isNaN(x)) return false;
    if (x !== y) return x > y;
  }
  return true;
}
