// A/B of one agent flag, interleaved in one run on one testbed, through the agents: both agents
// are restarted with the round's value (containers survive it), then the container moves
// edge-a -> edge-b -> edge-a with a checking client connected. Prints the medians of each value
// (downtime, checkpoint, transfer, restore, the gap the client saw, wall and CPU time) and the
// ratios B/A.
//   npx tsx --conditions=source bench/agent-flag-ab.ts [--flag spawn --a in-process --b helper] [--rounds N]
// Measured with it: `--flag spawn` (the helper that spawns runc, criu, ip and ovs-*) and
// `--flag cgroup-favor-dynmods --a off --b on` (runtime/favor-dynmods.ts).
import { readFile } from "node:fs/promises";
import { parseArgs } from "node:util";
import { FAVOR_HIERARCHY } from "@ferry/agent";
import { destroyBeds, echoUnderTest, makeBed, median, migrateViaAgents, type MigrationTimes } from "../test/helpers/agents.js";
import { busyCpuMs } from "./stats.js";

const { values } = parseArgs({
  options: {
    flag: { type: "string", default: "spawn" },
    a: { type: "string", default: "in-process" },
    b: { type: "string", default: "helper" },
    rounds: { type: "string", default: "6" },
  },
});
const rounds = Number(values.rounds);
const VALUES = { A: values.a, B: values.b } as const;
/** What each flag's value must show on this machine, checked every round: an A/B that silently ran one way twice would mislead. */
const CHECKS: Record<string, (value: string) => Promise<string | undefined>> = {
  "cgroup-favor-dynmods": async (value) => {
    const held = (await readFile("/proc/self/cgroup", "utf8")).includes(`name=${FAVOR_HIERARCHY}:`);
    return held === (value === "on") ? undefined : `the ${FAVOR_HIERARCHY} hierarchy is ${held ? "" : "not "}there with ${value}`;
  },
};
const bed = await makeBed(["edge-a", "edge-b"]);
try {
  const echo = await echoUnderTest(bed, "ab", "10.77.0.51");
  const { spec } = echo;
  const runs: { variant: "A" | "B"; t: MigrationTimes; atMs: number; wallMs: number; cpuMs: number }[] = [];
  let where = "edge-a";
  for (let i = 0; i < rounds * 2; i++) {
    const variant = i % 2 === 0 ? "A" : "B";
    for (const h of ["edge-a", "edge-b"]) await bed.spawn(h, undefined, [`--${values.flag}`, VALUES[variant]]);
    await new Promise((r) => setTimeout(r, 1000));
    const wrong = await CHECKS[values.flag]?.(VALUES[variant]);
    if (wrong) throw new Error(`round ${i}: ${wrong}`);
    for (let leg = 0; leg < 2; leg++) {
      const to = where === "edge-a" ? "edge-b" : "edge-a";
      const atMs = echo.mark();
      const cpu0 = busyCpuMs();
      const w0 = performance.now();
      const t = await migrateViaAgents(bed, spec, where, to, `ab-${i}-${leg}`);
      runs.push({ variant, t, atMs, wallMs: performance.now() - w0, cpuMs: busyCpuMs() - cpu0 });
      where = to;
      await new Promise((r) => setTimeout(r, 1500));
    }
  }
  const report = await echo.finish();
  const gapOf = (r: (typeof runs)[number]): number => echo.gapAfter(r.atMs);
  const stat = (v: "A" | "B") => {
    const rs = runs.filter((r) => r.variant === v);
    const m = (f: (r: (typeof rs)[number]) => number): number => Math.round(median(rs.map(f)));
    return {
      [values.flag]: VALUES[v],
      migrations: rs.length,
      downtime_ms: m((r) => r.t.downtimeMs),
      checkpoint_ms: m((r) => r.t.checkpointMs),
      transfer_ms: m((r) => r.t.transferMs),
      restore_ms: m((r) => r.t.restoreMs),
      client_gap_ms: m(gapOf),
      wall_ms: m((r) => r.wallMs),
      cpu_ms: m((r) => r.cpuMs),
    };
  };
  const A = stat("A");
  const B = stat("B");
  console.log(
    JSON.stringify(
      {
        rounds,
        A,
        B,
        ratio_downtime: +(B.downtime_ms / A.downtime_ms).toFixed(2),
        ratio_gap: +(B.client_gap_ms / A.client_gap_ms).toFixed(2),
        ratio_wall: +(B.wall_ms / A.wall_ms).toFixed(2),
        ratio_cpu: +(B.cpu_ms / A.cpu_ms).toFixed(2),
        errors: report.errors,
        lost: report.sent - report.checked,
      },
      null,
      1,
    ),
  );
} finally {
  await destroyBeds();
}
