// What a spawn costs a process the size of an agent, two ways, interleaved in one run: exec()
// spawning from this process (fork copies its page tables on the event loop's thread) and from
// the launcher's helper. Per way and ballast: the exec's latency, and how long a timer that
// should fire every millisecond was held up (the stall every other call on the loop feels).
//   npx tsx --conditions=source bench/spawn.ts [--ballast 100,250] [--rounds 6]
import { monitorEventLoopDelay } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { exec, useLauncher } from "@ferry/common";
import { busyCpuMs } from "./stats.js";

const { values: flags } = parseArgs({
  options: { ballast: { type: "string", default: "60,250" }, rounds: { type: "string", default: "6" } },
});
const ROUNDS = Number(flags.rounds);
const PER_ROUND = 20; // execs per round: 4 at a time, like an agent serving calls in parallel
const ballast: Buffer[] = [];

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function round(): Promise<{ execMs: number[]; stallMaxMs: number; stallP99Ms: number }> {
  const h = monitorEventLoopDelay({ resolution: 1 });
  h.enable();
  const execMs: number[] = [];
  for (let i = 0; i < PER_ROUND; i += 4) {
    await Promise.all(
      [0, 1, 2, 3].map(async () => {
        const t = performance.now();
        await exec("/bin/true", []);
        execMs.push(performance.now() - t);
      }),
    );
  }
  h.disable();
  return { execMs, stallMaxMs: h.max / 1e6, stallP99Ms: h.percentile(99) / 1e6 };
}

const WAYS: Record<string, () => () => void> = {
  local: () => () => undefined,
  launcher: useLauncher,
};
type Round = Awaited<ReturnType<typeof round>> & { cpuMs: number };
console.log("ballast  rss MiB  way           exec median ms  CPU per exec ms  loop stall p99 ms  loop stall max ms");
for (const mib of flags.ballast.split(",").map(Number)) {
  // Touched memory, as an agent's heap and buffers are: what fork must copy page tables for.
  while (ballast.length < mib) ballast.push(Buffer.alloc(1 << 20, 1));
  const res: Record<string, Round[]> = Object.fromEntries(Object.keys(WAYS).map((w) => [w, []]));
  for (let r = -1; r < ROUNDS; r++) {
    for (const [way, install] of Object.entries(WAYS)) {
      const uninstall = install();
      const cpu0 = busyCpuMs();
      const x = await round();
      const cpuMs = (busyCpuMs() - cpu0) / PER_ROUND;
      uninstall();
      if (r >= 0) res[way]!.push({ ...x, cpuMs }); // round -1 warms every way up
    }
  }
  const rss = Math.round(process.memoryUsage().rss / 2 ** 20);
  const sum: Record<string, { exec: number; cpu: number; p99: number; max: number }> = {};
  for (const [way, rs] of Object.entries(res)) {
    const s = (sum[way] = {
      exec: median(rs.flatMap((r) => r.execMs)),
      cpu: median(rs.map((r) => r.cpuMs)),
      p99: median(rs.map((r) => r.stallP99Ms)),
      max: median(rs.map((r) => r.stallMaxMs)),
    });
    console.log(
      `${String(mib).padStart(7)}  ${String(rss).padStart(7)}  ${way.padEnd(12)}  ${s.exec.toFixed(2).padStart(14)}  ${s.cpu.toFixed(2).padStart(15)}  ${s.p99.toFixed(2).padStart(17)}  ${s.max.toFixed(2).padStart(17)}`,
    );
  }
  const l = sum.local!;
  for (const way of Object.keys(WAYS).slice(1)) {
    const w = sum[way]!;
    console.log(
      `${"".padStart(7)}  ${way} / local: exec ${(w.exec / l.exec).toFixed(2)}x, CPU ${(w.cpu / l.cpu).toFixed(2)}x, loop stall max ${(w.max / l.max).toFixed(2)}x`,
    );
  }
}
