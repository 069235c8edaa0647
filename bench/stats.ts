// Small statistics and client-side timeline analysis for the benchmark.
import { readFileSync } from "node:fs";

/** /proc/stat counts in USER_HZ, 1/100 s on Linux whatever the kernel's tick. */
const CLK_TCK = 100;

/** Busy CPU time of the whole machine so far, ms, all cores (user, system, irq, steal; not idle or iowait). */
export function busyCpuMs(): number {
  const f = readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
  const [user, nice, system, , , irq, softirq, steal] = f;
  return ((user! + nice! + system! + irq! + softirq! + steal!) * 1000) / CLK_TCK;
}

export function quantile(xs: readonly number[], q: number): number {
  const s = [...xs].filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!s.length) return NaN;
  const i = (s.length - 1) * q;
  const lo = Math.floor(i);
  const hi = Math.ceil(i);
  return s[lo]! + (s[hi]! - s[lo]!) * (i - lo);
}
export const median = (xs: readonly number[]): number => quantile(xs, 0.5);
export const p90 = (xs: readonly number[]): number => quantile(xs, 0.9);
export const round = (x: number, d = 1): number => (Number.isFinite(x) ? Math.round(x * 10 ** d) / 10 ** d : x);

/** One sockperf ping-pong message: when it left (s, sockperf's clock) and its round trip (ms). */
export interface RttSample {
  seq: number;
  txS: number;
  rttMs: number;
}

/** sockperf --full-log CSV: "packet, txTime(sec), rxTime(sec), latency(usec)". */
export function parseSockperfLog(text: string): RttSample[] {
  const out: RttSample[] = [];
  for (const line of text.split("\n")) {
    const m = /^\s*(\d+),\s*([\d.]+),\s*([\d.]+),\s*([\d.]+)/.exec(line);
    if (m) out.push({ seq: Number(m[1]), txS: Number(m[2]), rttMs: (Number(m[3]) - Number(m[2])) * 1000 });
  }
  return out;
}

/**
 * Service disruption seen by a ping-pong client: the longest time between two consecutive
 * replies (a message sent just before the freeze is answered only after the restore).
 */
export function rttDisruptionMs(samples: readonly RttSample[]): number {
  let worst = 0;
  for (let i = 1; i < samples.length; i++) {
    const prevRx = samples[i - 1]!.txS * 1000 + samples[i - 1]!.rttMs;
    const rx = samples[i]!.txS * 1000 + samples[i]!.rttMs;
    worst = Math.max(worst, rx - prevRx);
  }
  return worst;
}

export interface ThroughputSample {
  startS: number;
  endS: number;
  mbit: number;
}

/** iperf3 --json intervals. */
export function parseIperf(json: string): ThroughputSample[] {
  const r = JSON.parse(json) as { intervals?: { sum: { start: number; end: number; bits_per_second: number } }[] };
  return (r.intervals ?? []).map((i) => ({ startS: i.sum.start, endS: i.sum.end, mbit: i.sum.bits_per_second / 1e6 }));
}

/**
 * Service disruption seen by an iperf3 -R client: the longest run of consecutive intervals whose
 * throughput is under 10% of the median before the migration.
 */
export function throughputDisruptionMs(samples: readonly ThroughputSample[], migrationAtS: number): number {
  const before = samples.filter((s) => s.endS <= migrationAtS).map((s) => s.mbit);
  const floor = 0.1 * (before.length ? median(before) : median(samples.map((s) => s.mbit)));
  let worst = 0;
  let runStart: number | undefined;
  for (const s of samples) {
    if (s.mbit < floor) {
      runStart ??= s.startS;
      worst = Math.max(worst, (s.endS - runStart) * 1000);
    } else runStart = undefined;
  }
  return worst;
}
