/**
 * packages/agent/src/runtime/favor-dynmods.ts: the agent holds a cgroup hierarchy with the
 * kernel's favordynmods option for as long as it lives, in a mount namespace of its own, and
 * nothing of it outlives the agent. Real mounts, real processes; needs root and a kernel with the
 * option (/sys/kernel/cgroup/features).
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { exec } from "@ferry/common";
import { FAVOR_HIERARCHY, favorCgroupDynmods, type FavorDynmods } from "@ferry/agent";

const REPO = path.resolve(import.meta.dirname, "../..");
const features = await readFile("/sys/kernel/cgroup/features", "utf8").catch(() => "");
const usable = process.getuid?.() === 0 && features.split("\n").includes("favordynmods");

/** A process that is gone or a zombie (its parent has not reaped it yet) has ended. */
async function ended(pid: number): Promise<boolean> {
  const st = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
  return st === "" || st.slice(st.lastIndexOf(")") + 2).startsWith("Z");
}

async function waitEnded(pid: number, ms = 5000): Promise<boolean> {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 20))) if (await ended(pid)) return true;
  return false;
}

/** The hierarchy's mounts in `pid`'s mount namespace: "<mount point> <super options>". */
async function hierarchyMounts(pid: number | "self"): Promise<string[]> {
  const info = await readFile(`/proc/${pid}/mountinfo`, "utf8");
  return info
    .split("\n")
    .filter((l) => l.includes(`name=${FAVOR_HIERARCHY}`))
    .map((l) => `${l.split(" ")[4]} ${l.split(" - ")[1]?.split(" ")[2]}`);
}

function holderPid(f: FavorDynmods): number {
  if (f.status.state !== "held") throw new Error(`not held: ${JSON.stringify(f.status)}`);
  return f.status.pid;
}

describe.skipIf(!usable)("favordynmods holder", () => {
  it("holds the hierarchy in its own mount namespace, shared by two agents, until the last lets go", async () => {
    const a = await favorCgroupDynmods();
    const b = await favorCgroupDynmods();
    try {
      const [pa, pb] = [holderPid(a), holderPid(b)];
      expect(pa).not.toBe(pb);
      // The hierarchy exists (every process is in its root) and favours dynamic modifications...
      expect(await readFile("/proc/self/cgroup", "utf8")).toMatch(new RegExp(`^\\d+:name=${FAVOR_HIERARCHY}:/$`, "m"));
      for (const p of [pa, pb]) expect(await hierarchyMounts(p)).toEqual([`/tmp/cgroup rw,favordynmods,name=${FAVOR_HIERARCHY}`]);
      // ...but is mounted nowhere the host sees.
      expect(await hierarchyMounts("self")).toEqual([]);
      expect((await readFile("/proc/mounts", "utf8")).includes(FAVOR_HIERARCHY)).toBe(false);

      a.release();
      expect(await waitEnded(pa)).toBe(true);
      expect(await ended(pb)).toBe(false);
      expect(await hierarchyMounts(pb)).toHaveLength(1);
    } finally {
      a.release();
      b.release();
    }
    expect(await waitEnded(holderPid(b))).toBe(true);
  });

  it("ends with the process that holds it, even one killed with SIGKILL", async () => {
    const script = `import { favorCgroupDynmods } from "@ferry/agent";
const f = await favorCgroupDynmods();
console.log(JSON.stringify(f.status));
setInterval(() => undefined, 1000);`;
    const child = spawn(process.execPath, ["--conditions=source", "--import", "tsx", "--input-type=module", "-e", script], {
      cwd: REPO,
      stdio: ["ignore", "pipe", "inherit"],
    });
    try {
      const [line] = (await once(child.stdout.setEncoding("utf8"), "data")) as [string];
      const status = JSON.parse(line) as { state: string; pid: number };
      expect(status.state).toBe("held");
      expect(await ended(status.pid)).toBe(false);
      child.kill("SIGKILL");
      expect(await waitEnded(status.pid)).toBe(true);
    } finally {
      child.kill("SIGKILL");
    }
  });

  it("holds nothing where the host already favours dynamic modifications", async () => {
    const dir = await mkdtemp(path.join(tmpdir(), "ferry-favor-"));
    const name = `${FAVOR_HIERARCHY}-test`;
    await exec("mount", ["-t", "cgroup", "-o", `none,name=${name},favordynmods`, name, dir]);
    try {
      const f = await favorCgroupDynmods();
      f.release();
      expect(f.status).toEqual({ state: "host" });
    } finally {
      await exec("umount", [dir]);
      await rm(dir, { recursive: true });
    }
  });
});
