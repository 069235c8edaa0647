// `make demo`: the testbed up, a stateful TCP service on edge-a with a client connected from
// ferry-client, the service migrated to edge-b and back through the admin CLI while the client
// checks every byte it gets back, what happened printed and saved, and the testbed torn down.
import { spawn } from "node:child_process";
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { exec } from "@ferry/common";
import { REPO_ROOT, type EchoReport } from "@ferry/testbed";
import { CLIENT_NETNS, down, up } from "./testbed.js";

interface Step {
  name: string;
  state: string;
  durationMs: number;
  bytes: number;
  inDowntime: boolean;
  group: string;
  /** e.g. the restore's held_packets: what reached the new host during the downtime, delivered. */
  details?: Record<string, number>;
}
interface MigrationJson {
  id: string;
  source: string;
  destination: string;
  state: string;
  totalMs: number;
  downtimeMs: number;
  controlOverheadMs: number;
  bytesTransferred: number;
  partial: boolean;
  steps: Step[];
}

const ENV = {
  ...process.env,
  FERRY_CONTROLLER: "127.0.0.1:7440",
  FERRY_TLS_DIR: path.join(REPO_ROOT, ".ferry/certs"),
};
const FERRY = path.join(REPO_ROOT, "bin/ferry");
const CLIENT = path.join(REPO_ROOT, ".ferry/testbed/testkit/ferry-echo-client");

async function ferry(args: string[]): Promise<string> {
  const r = await exec(FERRY, args, { env: ENV, timeoutMs: 180_000 });
  return r.stdout;
}

const line = (s = ""): void => void process.stdout.write(s + "\n");

/** The restore's packets held through the downtime (the network lock queues, not drops, them). */
const heldNote = (s: Step): string => {
  const n = s.details?.held_packets;
  return n ? `  ${n} client packet${n === 1 ? "" : "s"} held, then delivered` : "";
};

async function main(): Promise<number> {
  line("== bringing the edge testbed up");
  await up();
  line("\n== ferry run web on edge-a (ferry-echo: a TCP echo whose state lives in memory)");
  process.stdout.write(
    await ferry([
      "run",
      "web",
      "--host",
      "edge-a",
      "--image",
      "testkit",
      "--ip",
      "10.77.0.10/24",
      "--memory",
      "256m",
      "--",
      "/usr/local/bin/ferry-echo",
      "7000",
    ]),
  );

  line(`\n== client connects from ${CLIENT_NETNS} and streams 100 kB/s, checking every echoed byte`);
  const client = spawn(
    "nsenter",
    [`--net=/run/netns/${CLIENT_NETNS}`, CLIENT, "10.77.0.10", "7000", "--rate", "100000", "--drain", "15", "--gap-ms", "100"],
    {
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let out = "";
  let err = "";
  client.stdout.on("data", (d: Buffer) => (out += d.toString()));
  client.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const done = new Promise<number | null>((resolve) => client.on("close", resolve));
  for (let i = 0; i < 100 && !/connected serial=1/.test(err); i++) await new Promise((r) => setTimeout(r, 100));
  if (!/connected serial=1/.test(err)) throw new Error(`the client did not connect: ${err}`);
  await new Promise((r) => setTimeout(r, 1500));

  const migrations: MigrationJson[] = [];
  for (const to of ["edge-b", "edge-a"]) {
    line(`\n== ferry migrate web --to ${to}`);
    const m = JSON.parse(await ferry(["migrate", "web", "--to", to, "--json"])) as MigrationJson;
    migrations.push(m);
    for (const s of m.steps) {
      line(
        `   ${s.name.padEnd(20)} ${String(s.durationMs).padStart(5)} ms${s.inDowntime ? "  downtime" : ""}${s.group ? `  ‖ ${s.group}` : ""}${s.bytes ? `  ${(s.bytes / 1024).toFixed(0)} KiB` : ""}${heldNote(s)}`,
      );
    }
    line(
      `   ${m.state}: total ${m.totalMs} ms, downtime ${m.downtimeMs} ms, control overhead ${m.controlOverheadMs} ms${m.partial ? ", base image already there" : ""}`,
    );
    await new Promise((r) => setTimeout(r, 1500));
  }
  client.kill("SIGTERM");
  const code = await done;
  const report = JSON.parse(out) as EchoReport;
  const lost = report.sent - report.checked;
  const ok =
    code === 0 &&
    report.errors === 0 &&
    lost === 0 &&
    report.serial === 1 &&
    migrations.every((m) => m.state === "MIGRATION_STATE_SUCCEEDED");

  line("\n== what the client saw");
  line(`   connection      the same one throughout (serial ${report.serial}), closed: ${report.closed ? "yes" : "no"}`);
  line(`   bytes checked   ${report.checked} of ${report.sent} sent, ${report.errors} wrong, ${lost} lost`);
  line(`   pauses          ${report.gaps.map((g) => `${Math.round(g.ms)} ms`).join(", ") || "none over 100 ms"}`);
  line(`   verdict         ${ok ? "OK: no reconnect, no lost and no duplicated bytes" : "FAILED"}`);

  const result = {
    ok,
    migrations: migrations.map((m) => ({
      id: m.id,
      from: m.source,
      to: m.destination,
      state: m.state,
      total_ms: m.totalMs,
      downtime_ms: m.downtimeMs,
      control_overhead_ms: m.controlOverheadMs,
      bytes_transferred: m.bytesTransferred,
      partial: m.partial,
      steps: m.steps.map((s) => ({
        name: s.name,
        ms: s.durationMs,
        downtime: s.inDowntime,
        group: s.group || undefined,
        bytes: s.bytes,
        held_packets: s.details?.held_packets,
      })),
    })),
    client: {
      same_connection: report.serial === 1,
      bytes_sent: report.sent,
      bytes_checked: report.checked,
      errors: report.errors,
      lost,
      gaps_ms: report.gaps.map((g) => g.ms),
      max_gap_ms: report.maxGapMs,
    },
  };
  await writeFile(path.join(REPO_ROOT, ".ferry/demo-result.json"), JSON.stringify(result, null, 2) + "\n");
  line("\n   written to .ferry/demo-result.json");
  return ok ? 0 : 1;
}

let status = 1;
try {
  status = await main();
} catch (e) {
  process.stderr.write(`demo: ${(e as Error).message}\n`);
} finally {
  line("\n== tearing the testbed down");
  await down().catch((e: unknown) => {
    process.stderr.write(`demo: teardown: ${(e as Error).message}\n`);
    status = 1;
  });
}
process.exit(status);
