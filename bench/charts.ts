// Hand-written SVG charts for bench/README.md (no chart library).
import { writeFile } from "node:fs/promises";
import path from "node:path";

const W = 720;
const H = 360;
const M = { l: 64, r: 16, t: 36, b: 64 };
const COLORS = { baseline: "#d9534f", ferry: "#2b7bb9" };
const esc = (s: string): string => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");

function frame(title: string, body: string, xLabel: string, yLabel: string): string {
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="${W / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">${esc(title)}</text>
${body}
<text x="${W / 2}" y="${H - 8}" text-anchor="middle">${esc(xLabel)}</text>
<text transform="translate(14 ${H / 2}) rotate(-90)" text-anchor="middle">${esc(yLabel)}</text>
</svg>
`;
}

function yAxis(max: number, y: (v: number) => number): string {
  const step = niceStep(max / 5);
  let s = "";
  for (let v = 0; v <= max + 1e-9; v += step) {
    s += `<line x1="${M.l}" x2="${W - M.r}" y1="${y(v)}" y2="${y(v)}" stroke="#eee"/><text x="${M.l - 6}" y="${y(v) + 4}" text-anchor="end">${fmt(v)}</text>`;
  }
  return s + `<line x1="${M.l}" x2="${M.l}" y1="${M.t}" y2="${H - M.b}" stroke="#333"/>`;
}
function niceStep(raw: number): number {
  if (!(raw > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((k) => k * p).find((s) => s >= raw)!;
}
const fmt = (v: number): string => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(0) : v.toFixed(1));
function legend(items: Array<[string, string]>, x = W - M.r - 200, y = M.t + 4): string {
  return items
    .map(
      ([label, color], i) =>
        `<rect x="${x}" y="${y + i * 16}" width="10" height="10" fill="${color}"/><text x="${x + 14}" y="${y + 9 + i * 16}">${esc(label)}</text>`,
    )
    .join("");
}

/** Grouped bars: per step, baseline vs Ferry median (ms), with a p90 whisker. */
export function stepBars(
  title: string,
  steps: string[],
  series: Array<{ label: string; color: string; med: number[]; p90: number[] }>,
): string {
  const max = Math.max(1, ...series.flatMap((s) => s.p90.filter(Number.isFinite)));
  const y = (v: number): number => H - M.b - (v / max) * (H - M.t - M.b);
  const gw = (W - M.l - M.r) / steps.length;
  const bw = (gw * 0.8) / series.length;
  let body = yAxis(max, y);
  steps.forEach((st, i) => {
    series.forEach((s, k) => {
      const v = s.med[i];
      if (v === undefined || !Number.isFinite(v)) return;
      const x = M.l + i * gw + gw * 0.1 + k * bw;
      body += `<rect x="${x}" y="${y(v)}" width="${bw - 2}" height="${y(0) - y(v)}" fill="${s.color}"><title>${esc(`${s.label} ${st}: ${v} ms`)}</title></rect>`;
      const q = s.p90[i]!;
      if (Number.isFinite(q)) body += `<line x1="${x + bw / 2 - 1}" x2="${x + bw / 2 - 1}" y1="${y(v)}" y2="${y(q)}" stroke="#333"/>`;
    });
    body += `<text x="${M.l + i * gw + gw / 2}" y="${H - M.b + 16}" text-anchor="middle">${esc(st)}</text>`;
  });
  return frame(title, body + legend(series.map((s) => [s.label, s.color])), "migration step (bar: median, whisker: p90)", "ms");
}

/** Lines over time with the migration windows shaded. */
export function timeline(
  title: string,
  yLabel: string,
  series: Array<{ label: string; color: string; points: Array<[number, number]>; window: [number, number] }>,
  logY = false,
): string {
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = series.flatMap((s) => s.points.map((p) => p[1]));
  const xmax = Math.max(1, ...xs);
  const ymax = Math.max(1, ...ys);
  const ymin = logY ? Math.max(0.1, Math.min(...ys.filter((v) => v > 0))) : 0;
  const x = (v: number): number => M.l + (v / xmax) * (W - M.l - M.r);
  const y = logY
    ? (v: number): number =>
        H - M.b - ((Math.log10(Math.max(v, ymin)) - Math.log10(ymin)) / (Math.log10(ymax) - Math.log10(ymin) || 1)) * (H - M.t - M.b)
    : (v: number): number => H - M.b - (v / ymax) * (H - M.t - M.b);
  let body = "";
  if (logY) {
    for (let d = Math.floor(Math.log10(ymin)); d <= Math.ceil(Math.log10(ymax)); d++) {
      const v = 10 ** d;
      if (v < ymin || v > ymax * 1.0001) continue;
      body += `<line x1="${M.l}" x2="${W - M.r}" y1="${y(v)}" y2="${y(v)}" stroke="#eee"/><text x="${M.l - 6}" y="${y(v) + 4}" text-anchor="end">${fmt(v)}</text>`;
    }
    body += `<line x1="${M.l}" x2="${M.l}" y1="${M.t}" y2="${H - M.b}" stroke="#333"/>`;
  } else body += yAxis(ymax, y);
  for (let t = 0; t <= xmax; t += niceStep(xmax / 10))
    body += `<text x="${x(t)}" y="${H - M.b + 16}" text-anchor="middle">${fmt(t)}</text>`;
  for (const s of series) {
    body += `<rect x="${x(s.window[0])}" y="${M.t}" width="${Math.max(1, x(s.window[1]) - x(s.window[0]))}" height="${H - M.t - M.b}" fill="${s.color}" opacity="0.12"/>`;
    body += `<polyline fill="none" stroke="${s.color}" stroke-width="1.5" points="${s.points.map(([a, b]) => `${x(a).toFixed(1)},${y(b).toFixed(1)}`).join(" ")}"/>`;
  }
  return frame(title, body + legend(series.map((s) => [s.label, s.color])), "time since the client started (s); shaded: migration", yLabel);
}

interface ResultLike {
  experiments: Record<string, Record<"baseline" | "ferry", { steps: Record<string, { median: number; p90: number }> }>>;
  parallel: Array<{ n: number; wallMs: number; via?: "cli" | "api" }>;
  runs: Array<{
    experiment: string;
    way: "baseline" | "ferry";
    error?: string;
    disruptionMs: number;
    migrationAtS: number;
    migrationEndS: number;
    rtt?: Array<{ txS: number; rttMs: number }>;
    throughput?: Array<{ startS: number; endS: number; mbit: number }>;
  }>;
}

/** The run whose disruption is the median of its way: "one representative run". */
function representative(r: ResultLike, exp: string, way: "baseline" | "ferry"): ResultLike["runs"][number] | undefined {
  const rs = r.runs.filter((x) => x.experiment === exp && x.way === way && !x.error).sort((a, b) => a.disruptionMs - b.disruptionMs);
  return rs[Math.floor((rs.length - 1) / 2)];
}

/**
 * The chart's x slots: the same piece of work both ways (the baseline's step name, Ferry's), in
 * migration order. "ns" = the destination namespace: in downtime for COAT, before the freeze for Ferry.
 * Ferry clears the source's namespace with the rest of the source's copy in cleanup-source, after
 * the downtime ("clear-source-netns" in results of older versions, beside the transfer).
 */
const PHASES: Array<{ label: string; baseline?: string; ferry?: string }> = [
  { label: "image", ferry: "prepare-image" },
  { label: "dest ns", baseline: "create-ns", ferry: "prepare-netns" },
  { label: "checkpoint", baseline: "checkpoint", ferry: "checkpoint" },
  { label: "clear src ns", baseline: "clear-ns", ferry: "clear-source-netns" },
  { label: "transfer", baseline: "transfer", ferry: "transfer" },
  { label: "switch path", baseline: "flows", ferry: "switch-path" },
  { label: "restore", baseline: "restore", ferry: "restore" },
  { label: "cleanup", ferry: "cleanup-source" },
];

export async function writeCharts(dir: string, r: ResultLike): Promise<void> {
  for (const [exp, ways] of Object.entries(r.experiments)) {
    const known = new Set(PHASES.flatMap((p) => [p.baseline, p.ferry]));
    // Steps neither way maps (a renamed step) still get a slot of their own, at the end.
    const extra = [...new Set([...Object.keys(ways.baseline.steps), ...Object.keys(ways.ferry.steps)])].filter((n) => !known.has(n));
    const phases = [...PHASES, ...extra.map((n) => ({ label: n, baseline: n, ferry: n }))].filter(
      (p) => (p.baseline && ways.baseline.steps[p.baseline]) || (p.ferry && ways.ferry.steps[p.ferry]),
    );
    const ser = (["baseline", "ferry"] as const).map((w) => ({
      label: w === "baseline" ? "COAT over SSH" : "Ferry (controller, ferry CLI)",
      color: COLORS[w],
      med: phases.map((p) => (p[w] ? (ways[w].steps[p[w]]?.median ?? NaN) : NaN)),
      p90: phases.map((p) => (p[w] ? (ways[w].steps[p[w]]?.p90 ?? NaN) : NaN)),
    }));
    await writeFile(
      path.join(dir, `steps-${exp}.svg`),
      stepBars(
        `Per-step time, ${exp} experiment`,
        phases.map((p) => p.label),
        ser,
      ),
    );
  }
  const rttSeries = (["baseline", "ferry"] as const).flatMap((w) => {
    const run = representative(r, "sockperf", w);
    if (!run?.rtt) return [];
    return [
      {
        label: w === "baseline" ? "COAT over SSH" : "Ferry (controller)",
        color: COLORS[w],
        points: run.rtt.map((p) => [p.txS, p.rttMs] as [number, number]),
        window: [run.migrationAtS, run.migrationEndS] as [number, number],
      },
    ];
  });
  if (rttSeries.length)
    await writeFile(
      path.join(dir, "rtt-timeline.svg"),
      timeline("sockperf ping-pong RTT around the migration", "RTT (ms, log)", rttSeries, true),
    );
  const tpSeries = (["baseline", "ferry"] as const).flatMap((w) => {
    const run = representative(r, "iperf", w);
    if (!run?.throughput) return [];
    return [
      {
        label: w === "baseline" ? "COAT over SSH" : "Ferry (controller)",
        color: COLORS[w],
        points: run.throughput.map((p) => [p.endS, p.mbit] as [number, number]),
        window: [run.migrationAtS, run.migrationEndS] as [number, number],
      },
    ];
  });
  if (tpSeries.length)
    await writeFile(path.join(dir, "throughput-timeline.svg"), timeline("iperf3 -R throughput (100 ms intervals)", "Mbit/s", tpSeries));
  if (r.parallel.some((p) => Number.isFinite(p.wallMs))) {
    const par = r.parallel.filter((p) => Number.isFinite(p.wallMs));
    const ns = [1, 2, 3, 4].filter((n) => par.some((p) => p.n === n));
    const series = (via: "api" | "cli", label: string, color: string) => {
      const of = (n: number): number[] =>
        par
          .filter((p) => p.n === n && (p.via ?? "cli") === via)
          .map((p) => p.wallMs)
          .sort((a, b) => a - b);
      return {
        label,
        color,
        med: ns.map((n) => Math.round(of(n)[Math.floor((of(n).length - 1) / 2)] ?? 0)),
        p90: ns.map((n) => Math.round(Math.max(0, ...of(n)))),
      };
    };
    await writeFile(
      path.join(dir, "parallel.svg"),
      stepBars(
        "N migrations at once: first start to last end",
        ns.map((n) => `${n} at once`),
        [series("api", "one client, N StartMigration", COLORS.ferry), series("cli", "N `ferry migrate` processes", COLORS.baseline)],
      ),
    );
  }
}
