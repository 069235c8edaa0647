// A/B of two downtime choices, interleaved in one run on the same testbed, through the agents:
//   A (COAT's order): clear the source namespace inside the downtime, in parallel with the
//     transfer; switch the flows host by host (destination, others, source).
//   B (Ferry now): the source namespace, locked by CRIU and unreachable once the flows moved, is
//     cleared after the restore; every host's flows switched at once.
// Prints the median downtime and client-seen gap of each, and the ratio B/A.
//   npx tsx --conditions=source bench/downtime-ab.ts [--rounds N]
import { spawn } from "node:child_process";
import { parseArgs } from "node:util";
import type { ContainerSpec } from "@ferry/api/agent";
import { destroyBeds, makeBed, median, migrateViaAgents, routeTo } from "../test/helpers/agents.js";

const { values } = parseArgs({ options: { rounds: { type: "string", default: "8" } } });
const rounds = Number(values.rounds);
const bed = await makeBed(["edge-a", "edge-b"]);
try {
  const spec: ContainerSpec = {
    name: "ab",
    image: "testkit",
    args: ["/usr/local/bin/ferry-echo", "7000"],
    env: [],
    cwd: "/",
    cpuMillicores: 0,
    memoryLimitBytes: 0,
    network: { ipCidr: "10.77.0.50/24", mac: "", gateway: "", bridge: "", ofport: 0 },
    labels: {},
  };
  const a = bed.edges.get("edge-a")!;
  const { container } = await a.client.createContainer({ spec, createNetns: true });
  await a.client.startContainer({ name: "ab" });
  await routeTo(bed, "10.77.0.50", a.host, container!.spec!.network!.ofport);
  const client = spawn(
    "nsenter",
    [`--net=${bed.workload.netnsPath}`, bed.echoClient, "10.77.0.50", "7000", "--rate", "100000", "--gap-ms", "50"],
    {
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let out = "";
  client.stdout.on("data", (d: Buffer) => (out += d.toString()));
  await new Promise((r) => setTimeout(r, 1500));
  const t0 = Date.now();
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
  client.kill("SIGTERM");
  await new Promise((r) => client.on("close", r));
  const report = JSON.parse(out) as { errors: number; sent: number; checked: number; gaps: { atMs: number; ms: number }[] };
  // The client's clock starts ~1.5 s before ours: match each gap to the migration it follows.
  const gapOf = (r: (typeof runs)[number]): number =>
    Math.max(0, ...report.gaps.filter((g) => g.atMs >= r.atMs && g.atMs <= r.atMs + 1500 + 3000).map((g) => g.ms));
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
