// A/B of two downtime choices, interleaved in one run on the same testbed, through the agents
// (test/helpers/agents.ts migrateViaAgents), with a checking client connected:
//   --choice order:
//     A (COAT's order): clear the source namespace inside the downtime, in parallel with the
//       transfer; switch the flows host by host (destination, others, source).
//     B (the test helpers' default): the source namespace, locked by CRIU and unreachable once the
//       flows moved, is cleared after the restore; every host's flows switched at once, as the
//       controller's pipeline does.
//   --choice pack:
//     A: the source packs the checkpoint's blobs when asked (ExportCheckpoint), after the dump;
//     B: the checkpoint packs them in the same call (export_blobs), as the controller asks.
// --shape sockperf|iperf puts COAT's link shaping on the testbed's underlay (bench/shaping.ts).
// Prints the median downtime and client-seen gap of each, and the ratio B/A.
//   npx tsx --conditions=source bench/downtime-ab.ts [--choice order|pack] [--shape none|sockperf|iperf] [--rounds N]
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { destroyBeds, echoUnderTest, makeBed, median, migrateViaAgents, type MigrateOptions } from "../test/helpers/agents.js";
import { REPO } from "../test/helpers/certs.js";
import { COAT_SHAPES, Shaper } from "./shaping.js";

const { values } = parseArgs({
  options: {
    rounds: { type: "string", default: "8" },
    choice: { type: "string", default: "order" },
    shape: { type: "string", default: "none" },
  },
});
const rounds = Number(values.rounds);
const CHOICES: Record<string, Record<"A" | "B", MigrateOptions>> = {
  order: { A: { clearInDowntime: true, sequentialSwitch: true }, B: {} },
  pack: { A: {}, B: { packAtCheckpoint: true } },
};
const choice = CHOICES[values.choice];
if (!choice) throw new Error(`--choice: "${values.choice}" is none of ${Object.keys(CHOICES).join(", ")}`);
const shape = values.shape === "none" ? undefined : COAT_SHAPES[values.shape as keyof typeof COAT_SHAPES];
if (values.shape !== "none" && !shape) throw new Error(`--shape: "${values.shape}" is none of none, sockperf, iperf`);
const bed = await makeBed(["edge-a", "edge-b"]);
const work = await mkdtemp(path.join(tmpdir(), "ferry-ab-"));
const shaper = shape ? await Shaper.create(bed.tb, REPO, work) : undefined;
try {
  // The bed's client host has its own name; the rest are named as on the benchmark's testbed.
  if (shape)
    await shaper!.apply(Object.fromEntries(Object.entries(shape).map(([h, s]) => [h === "client-host" ? bed.clientHost.name : h, s])));
  const echo = await echoUnderTest(bed, "ab", "10.77.0.50");
  const { spec } = echo;
  const runs: { variant: "A" | "B"; downtimeMs: number; transferMs: number; atMs: number }[] = [];
  let where = "edge-a";
  for (let i = 0; i < rounds * 2; i++) {
    // A, B, B, A, ...: each variant moves both ways equally often (the links differ per host).
    const variant = ((i >> 1) ^ i) & 1 ? "B" : "A";
    const to = where === "edge-a" ? "edge-b" : "edge-a";
    const atMs = echo.mark();
    const t = await migrateViaAgents(bed, spec, where, to, `ab-${i}`, choice[variant]);
    runs.push({ variant, downtimeMs: t.downtimeMs, transferMs: t.transferMs, atMs });
    where = to;
    await new Promise((r) => setTimeout(r, 2000));
  }
  const report = await echo.finish();
  const gapOf = (r: (typeof runs)[number]): number => echo.gapAfter(r.atMs);
  const stat = (v: "A" | "B") => {
    const rs = runs.filter((r) => r.variant === v);
    return {
      downtime_ms: Math.round(median(rs.map((r) => r.downtimeMs))),
      transfer_ms: Math.round(median(rs.map((r) => r.transferMs))),
      client_gap_ms: Math.round(median(rs.map(gapOf))),
    };
  };
  const A = stat("A");
  const B = stat("B");
  console.log(
    JSON.stringify({
      choice: values.choice,
      shape: values.shape,
      rounds,
      A,
      B,
      ratio_downtime: +(B.downtime_ms / A.downtime_ms).toFixed(2),
      ratio_gap: +(B.client_gap_ms / A.client_gap_ms).toFixed(2),
      errors: report.errors,
      lost: report.sent - report.checked,
    }),
  );
} finally {
  await shaper?.clear();
  await rm(work, { recursive: true, force: true });
  await destroyBeds();
}
