// A/B of two downtime choices, interleaved in one run on the same testbed, through the agents:
//   A (COAT's order): clear the source namespace inside the downtime, in parallel with the
//     transfer; switch the flows host by host (destination, others, source).
//   B (the test helpers' default): the source namespace, locked by CRIU and unreachable once the
//     flows moved, is cleared after the restore; every host's flows switched at once, as the
//     controller's pipeline does.
// Prints the median downtime and client-seen gap of each, and the ratio B/A.
//   npx tsx --conditions=source bench/downtime-ab.ts [--rounds N]
import { parseArgs } from "node:util";
import { destroyBeds, echoUnderTest, makeBed, median, migrateViaAgents } from "../test/helpers/agents.js";

const { values } = parseArgs({ options: { rounds: { type: "string", default: "8" } } });
const rounds = Number(values.rounds);
const bed = await makeBed(["edge-a", "edge-b"]);
try {
  const echo = await echoUnderTest(bed, "ab", "10.77.0.50");
  const { spec, t0 } = echo;
  const runs: { variant: "A" | "B"; downtimeMs: number; atMs: number }[] = [];
  let where = "edge-a";
  for (let i = 0; i < rounds * 2; i++) {
    const variant = i % 2 === 0 ? "A" : "B";
    const to = where === "edge-a" ? "edge-b" : "edge-a";
    const atMs = Date.now() - t0;
    const t = await migrateViaAgents(
      bed,
      spec,
      where,
      to,
      `ab-${i}`,
      variant === "A" ? { clearInDowntime: true, sequentialSwitch: true } : {},
    );
    runs.push({ variant, downtimeMs: t.downtimeMs, atMs });
    where = to;
    await new Promise((r) => setTimeout(r, 2000));
  }
  const report = await echo.finish();
  const gapOf = (r: (typeof runs)[number]): number => echo.gapAfter(r.atMs);
  const stat = (v: "A" | "B") => {
    const rs = runs.filter((r) => r.variant === v);
    return { downtime_ms: Math.round(median(rs.map((r) => r.downtimeMs))), client_gap_ms: Math.round(median(rs.map(gapOf))) };
  };
  const A = stat("A");
  const B = stat("B");
  console.log(
    JSON.stringify({
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
  await destroyBeds();
}
