// Every write of a pid to a cgroup's cgroup.procs (runc putting CRIU into the container's
// cgroups before a restore, runc run, CRIU's own cgroup work) takes the kernel's global
// cgroup_threadgroup_rwsem for writing. Unless a cgroup hierarchy "favours dynamic
// modifications", that lock is kept in its fast-reader mode, and each writer first waits for an
// RCU grace period (10-20 ms here, the CPU idle) to switch it over: one such wait in each runc
// restore, and one in each CRIU dump and restore (its cgroup2 mount re-applies the root's flags,
// under the same lock). The kernel's `favordynmods` mount option keeps the lock in the writers'
// mode for as long as one hierarchy with it exists, at the cost of an atomic operation in every
// fork and exit (not measurable here: 137 us per fork and wait either way, 20000 of each).
//
// The agent holds such a hierarchy while it runs: a named cgroup v1 hierarchy with no controllers
// ("none,name=ferry-favordynmods"), mounted in a mount namespace of its own by a small process
// that lives as long as the agent (it reads the agent's pipe and exits at its end, however the
// agent ends). Nothing is mounted where the host sees it, and nothing outlives the agent: with
// the last holder gone, the kernel destroys the hierarchy and the lock returns to fast-reader mode.
// Two agents on one machine (the testbed) share the hierarchy.
import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import type { Logger } from "@ferry/common";

export const FAVOR_HIERARCHY = "ferry-favordynmods";

/**
 * In the holder's own mount namespace: a private tmpfs over /tmp (so no directory is made where
 * the host sees it), the hierarchy on a directory in it, a line to say so, then wait for the
 * agent's pipe to end.
 */
const HOLD_SCRIPT = `set -e
mount -t tmpfs ${FAVOR_HIERARCHY} /tmp
mkdir /tmp/cgroup
mount -t cgroup -o none,name=${FAVOR_HIERARCHY},favordynmods ${FAVOR_HIERARCHY} /tmp/cgroup
echo held
exec cat >/dev/null`;

export type FavorDynmodsState =
  /** This agent holds the hierarchy (`pid` is the holder). */
  | { state: "held"; pid: number }
  /** The host already favours dynamic modifications: a cgroup mount the agent can see has the option. */
  | { state: "host" }
  /** Not available: `reason` says why (a kernel without the option or without cgroup v1, the mount refused). */
  | { state: "unavailable"; reason: string }
  | { state: "off" };

export interface FavorDynmods {
  readonly status: FavorDynmodsState;
  /** End the holder (the agent's exit ends it too). */
  release(): void;
}

/** Whether a cgroup mount visible here has favordynmods among its super options (mountinfo, after " - "). */
async function hostFavours(): Promise<boolean> {
  const info = await readFile("/proc/self/mountinfo", "utf8");
  return info.split("\n").some((l) => {
    const [fs, , opts] = l.split(" - ")[1]?.split(" ") ?? [];
    return (fs === "cgroup" || fs === "cgroup2") && (opts ?? "").split(",").includes("favordynmods");
  });
}

/**
 * Hold a hierarchy that favours dynamic modifications for as long as this process lives, unless
 * the host already has one or the kernel cannot. Never throws: a host where it fails only keeps
 * the grace-period waits; the state says why.
 */
export async function favorCgroupDynmods(opts: { log?: Logger; timeoutMs?: number } = {}): Promise<FavorDynmods> {
  const none = (status: FavorDynmodsState): FavorDynmods => ({ status, release: () => undefined });
  const features = await readFile("/sys/kernel/cgroup/features", "utf8").catch(() => "");
  if (!features.split("\n").includes("favordynmods")) {
    return none({ state: "unavailable", reason: "this kernel has no favordynmods option (/sys/kernel/cgroup/features)" });
  }
  if (await hostFavours()) return none({ state: "host" });

  const child = spawn("unshare", ["--mount", "--propagation", "private", "--", "sh", "-c", HOLD_SCRIPT], {
    stdio: ["pipe", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  child.stdin.on("error", () => undefined); // EPIPE once the holder is gone
  const release = (): void => {
    child.stdin.end();
  };
  const outcome = await new Promise<FavorDynmodsState>((resolve) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      resolve({ state: "unavailable", reason: `the holder did not mount in ${opts.timeoutMs ?? 10_000} ms` });
    }, opts.timeoutMs ?? 10_000);
    child.stdout.setEncoding("utf8").on("data", (d: string) => {
      if (!d.includes("held")) return;
      clearTimeout(timer);
      resolve({ state: "held", pid: child.pid! });
    });
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ state: "unavailable", reason: `cannot run unshare: ${e.message}` });
    });
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      resolve({ state: "unavailable", reason: `the holder exited (${signal ?? code}): ${stderr.trim() || "no message"}` });
    });
  });
  if (outcome.state !== "held") return none(outcome);
  child.on("exit", (code, signal) => {
    if (child.stdin.writableEnded) return;
    opts.log?.warn(
      { code, signal, stderr: stderr.trim() },
      "the cgroup favordynmods holder exited; runc and CRIU wait for RCU grace periods again",
    );
  });
  return { status: outcome, release };
}
