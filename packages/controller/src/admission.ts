// MIRA's checking module: may the destination take the incoming container, and can a checkpoint
// taken on the source be restored there at all? Pure functions over the agents' reports.
import {
  ContainerState,
  type ContainerResources,
  type GetCapabilitiesResponse,
  type GetResourcesResponse,
  type Usage,
} from "@ferry/api/agent";
import { AdmissionStrategy } from "@ferry/api/controller";
import { FerryError } from "@ferry/common";

export type StrategyName = "conservative" | "semi-conservative" | "live";

/** CPU in millicores, memory and disk in bytes: what a migration adds to a host. */
export interface ResourceNeeds {
  cpuMillicores: number;
  memoryBytes: number;
  diskBytes: number;
}

export const NO_NEEDS: Readonly<ResourceNeeds> = Object.freeze({ cpuMillicores: 0, memoryBytes: 0, diskBytes: 0 });

/** The container to be moved, as the source reports it. */
export interface IncomingContainer {
  name: string;
  /** Limit from its config; 0 = unlimited. */
  cpuMillicores: number;
  /** Limit from its config; 0 = unlimited. */
  memoryLimitBytes: number;
  /** Measured on the source now, if known. */
  usage?: Usage | undefined;
  /** Bytes of image the destination lacks (0 for a partial migration: it has the image). */
  imageBytes: number;
  /** The container's own rootfs layer (overlay upper dir). */
  upperBytes: number;
  /** Estimated checkpoint size; default: its measured memory use, else its memory limit. */
  checkpointBytes?: number | undefined;
}

export interface AdmissionInput {
  /** The destination's name, for messages. */
  host: string;
  resources: GetResourcesResponse;
  incoming: IncomingContainer;
  /** UNSPECIFIED means conservative (callers resolve their configured default first). */
  strategy: AdmissionStrategy | StrategyName;
  /** What in-flight migrations to this host already reserved (see MigrationScheduler). */
  reserved?: ResourceNeeds | undefined;
}

export interface ResourceCheck {
  resource: "cpu" | "memory" | "disk";
  unit: "millicores" | "bytes";
  /** Counted for what is already on the host under the strategy (0 for disk: `capacity` is the free space). */
  committed: number;
  /** In-flight migrations to this host. */
  reserved: number;
  incoming: number;
  /** committed + reserved + incoming. */
  need: number;
  /** CPU cores × 1000, memory bytes; for disk, the measured free bytes. */
  capacity: number;
  /** capacity − committed − reserved: what is left for the incoming container (may be < 0). */
  free: number;
  ok: boolean;
  /** "limits 512 MiB + incoming 256 MiB" */
  breakdown: string;
}

export interface AdmissionReport {
  host: string;
  container: string;
  strategy: StrategyName;
  cpu: ResourceCheck;
  memory: ResourceCheck;
  disk: ResourceCheck;
  /** What the incoming container adds to the host: reserve this for the migration's duration. */
  needs: ResourceNeeds;
  /** E.g. "no limit and no measured use for "web": counted as 0". */
  warnings: string[];
}

/** The proto enum (or a name) as a name; UNSPECIFIED → `fallback`. */
export function strategyName(s: AdmissionStrategy | StrategyName, fallback: StrategyName = "conservative"): StrategyName {
  if (typeof s === "string") return s;
  switch (s) {
    case AdmissionStrategy.ADMISSION_STRATEGY_CONSERVATIVE:
      return "conservative";
    case AdmissionStrategy.ADMISSION_STRATEGY_SEMI_CONSERVATIVE:
      return "semi-conservative";
    case AdmissionStrategy.ADMISSION_STRATEGY_LIVE:
      return "live";
    default:
      return fallback;
  }
}

/** Containers that hold their resources now: running, or paused (a paused one keeps its memory). */
const ACTIVE: ReadonlySet<ContainerState> = new Set([ContainerState.CONTAINER_STATE_RUNNING, ContainerState.CONTAINER_STATE_PAUSED]);

/**
 * The admission check (MIRA's checking module). For CPU and memory:
 * - conservative: limits of ALL containers on the destination (running and stopped) + the incoming
 *   container's limit ≤ capacity;
 * - semi-conservative: limits of running (and paused) containers only + incoming limit ≤ capacity;
 * - live: the host-wide measured use (`used`, which includes non-container processes) + the incoming
 *   container's measured use (its limit when its use is unknown) ≤ capacity.
 * A container with no limit (0) counts as its measured use under conservative and semi-conservative:
 * it has no reservation to count, and its use is the best estimate of what it holds.
 * Disk, always: image bytes the destination lacks + upper dir + checkpoint estimate ≤ free disk.
 * In-flight reservations (`reserved`) are added to every side. Throws ResourceExhausted naming each
 * resource that does not fit, the need and the free amount.
 */
export function checkAdmission(input: AdmissionInput): { ok: true; report: AdmissionReport } {
  const { host, resources: r, incoming: inc } = input;
  const strategy = strategyName(input.strategy);
  const reserved = input.reserved ?? NO_NEEDS;
  const warnings: string[] = [];
  const cap = r.capacity;
  if (!cap || (cap.cpuCores === 0 && cap.memoryBytes === 0)) {
    throw new FerryError("FailedPrecondition", `${host} reported no capacity: cannot run an admission check`, {
      fix: `check the agent on ${host} (GetResources must report its capacity)`,
    });
  }

  const useOf = (c: ContainerResources, k: "cpuMillicores" | "memoryBytes"): number => c.usage?.[k] ?? 0;
  const limitOrUse = (c: ContainerResources, limit: number, k: "cpuMillicores" | "memoryBytes"): number =>
    limit > 0 ? limit : useOf(c, k);

  // Incoming: its limit (or use) under the limit strategies; its use (or limit) under live.
  const incUse = { cpuMillicores: inc.usage?.cpuMillicores ?? 0, memoryBytes: inc.usage?.memoryBytes ?? 0 };
  const incomingOf = (limit: number, k: "cpuMillicores" | "memoryBytes", label: string): number => {
    const first = strategy === "live" ? incUse[k] : limit;
    const second = strategy === "live" ? limit : incUse[k];
    const v = first > 0 ? first : second;
    if (v === 0) warnings.push(`"${inc.name}" has no ${label} limit and no measured ${label} use: counted as 0`);
    return v;
  };
  const incCpu = incomingOf(inc.cpuMillicores, "cpuMillicores", "cpu");
  const incMem = incomingOf(inc.memoryLimitBytes, "memoryBytes", "memory");

  let cpuCommitted: number;
  let memCommitted: number;
  let label: string;
  if (strategy === "live") {
    label = "in use";
    if (r.used) {
      cpuCommitted = r.used.cpuMillicores;
      memCommitted = r.used.memoryBytes;
    } else {
      warnings.push(`${host} reported no host-wide use: summed its running containers' use`);
      const active = r.containers.filter((c) => ACTIVE.has(c.state));
      cpuCommitted = sum(active.map((c) => useOf(c, "cpuMillicores")));
      memCommitted = sum(active.map((c) => useOf(c, "memoryBytes")));
    }
  } else {
    const counted = strategy === "conservative" ? r.containers : r.containers.filter((c) => ACTIVE.has(c.state));
    label = strategy === "conservative" ? "limits" : "limits of running containers";
    cpuCommitted = sum(counted.map((c) => limitOrUse(c, c.cpuMillicores, "cpuMillicores")));
    memCommitted = sum(counted.map((c) => limitOrUse(c, c.memoryLimitBytes, "memoryBytes")));
  }

  const cpu = resourceCheck("cpu", "millicores", label, cpuCommitted, reserved.cpuMillicores, incCpu, cap.cpuCores * 1000);
  const memory = resourceCheck("memory", "bytes", label, memCommitted, reserved.memoryBytes, incMem, cap.memoryBytes);

  const checkpoint = inc.checkpointBytes ?? (incUse.memoryBytes > 0 ? incUse.memoryBytes : inc.memoryLimitBytes);
  const incDisk = inc.imageBytes + inc.upperBytes + checkpoint;
  const freeDisk = r.free?.diskBytes ?? Math.max(0, cap.diskBytes - (r.used?.diskBytes ?? 0));
  const disk: ResourceCheck = {
    resource: "disk",
    unit: "bytes",
    committed: 0,
    reserved: reserved.diskBytes,
    incoming: incDisk,
    need: reserved.diskBytes + incDisk,
    capacity: freeDisk,
    free: freeDisk - reserved.diskBytes,
    ok: reserved.diskBytes + incDisk <= freeDisk,
    breakdown: [
      ...(reserved.diskBytes ? [`in-flight migrations ${fmtBytes(reserved.diskBytes)}`] : []),
      ...(inc.imageBytes ? [`image ${fmtBytes(inc.imageBytes)}`] : []),
      `upper dir ${fmtBytes(inc.upperBytes)}`,
      `checkpoint ~${fmtBytes(checkpoint)}`,
    ].join(" + "),
  };

  const report: AdmissionReport = {
    host,
    container: inc.name,
    strategy,
    cpu,
    memory,
    disk,
    needs: { cpuMillicores: incCpu, memoryBytes: incMem, diskBytes: incDisk },
    warnings,
  };
  const failed = [memory, cpu, disk].filter((c) => !c.ok);
  if (failed.length === 0) return { ok: true, report };

  const first = failed[0]!;
  const parts = failed.map((c) => {
    const f = c.unit === "bytes" ? fmtBytes : fmtMilli;
    const limitWord = c.resource === "disk" ? "free" : "capacity";
    return `${c.resource} needs ${f(c.need)} (${c.breakdown}), ${limitWord} ${f(c.capacity)}`;
  });
  const lessStrict =
    strategy === "conservative"
      ? " or a less strict strategy (semi-conservative, live)"
      : strategy === "semi-conservative"
        ? " or the live strategy"
        : "";
  const amounts =
    first.unit === "bytes" ? { needBytes: first.need, freeBytes: first.free } : { needMillicores: first.need, freeMillicores: first.free };
  throw new FerryError("ResourceExhausted", `${host} cannot take "${inc.name}" under ${strategy} admission: ${parts.join("; ")}`, {
    fix: `pick another destination, free resources on ${host}${lessStrict}`,
    data: {
      resource: first.resource,
      ...amounts,
      strategy,
      failures: failed.map((c) => ({ resource: c.resource, unit: c.unit, need: c.need, free: c.free, capacity: c.capacity })),
      report,
    },
  });
}

function resourceCheck(
  resource: "cpu" | "memory",
  unit: "millicores" | "bytes",
  label: string,
  committed: number,
  reserved: number,
  incoming: number,
  capacity: number,
): ResourceCheck {
  const f = unit === "bytes" ? fmtBytes : fmtMilli;
  const need = committed + reserved + incoming;
  const breakdown = [
    `${label} ${f(committed)}`,
    ...(reserved ? [`in-flight migrations ${f(reserved)}`] : []),
    `incoming ${f(incoming)}`,
  ].join(" + ");
  return {
    resource,
    unit,
    committed,
    reserved,
    incoming,
    need,
    capacity,
    free: capacity - committed - reserved,
    ok: need <= capacity,
    breakdown,
  };
}

function sum(xs: number[]): number {
  return xs.reduce((a, b) => a + b, 0);
}

/** 805306368 → "768 MiB"; 1288490188 → "1.2 GiB". */
export function fmtBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  const s = i === 0 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(1).replace(/\.0$/, "");
  return `${s} ${units[i]}`;
}

function fmtMilli(n: number): string {
  return `${n}m`;
}

// ---------------------------------------------------------------------------------------------
// capabilities

/** The oldest CRIU that dumps TCP sockets on kernels ≥ 6.16 (DESIGN.md "Host facts": criu#2705). */
export const MIN_CRIU = "4.2";

export interface CapabilityReport {
  /** Things that do not block the migration but may hurt it, e.g. an older destination kernel. */
  warnings: string[];
}

/**
 * Can a checkpoint taken on `source` be restored on `dest`? Runs before anything is frozen.
 * Refuses (FailedPrecondition, every reason in one message) when: CRIU is missing, older than
 * 4.2, or its check failed on either end; the architectures differ; the destination's CPU lacks a
 * flag the source's has (a restored process may use that instruction and crash). A destination
 * kernel older (major.minor) than the source's is a warning.
 */
export function checkCapabilities(source: GetCapabilitiesResponse, dest: GetCapabilitiesResponse, minCriu = MIN_CRIU): CapabilityReport {
  const problems: string[] = [];
  const fixes: string[] = [];
  const warnings: string[] = [];
  const srcName = source.hostname || "the source";
  const dstName = dest.hostname || "the destination";

  for (const [caps, name] of [
    [source, srcName],
    [dest, dstName],
  ] as const) {
    const v = caps.criu?.version ?? "";
    if (!v) {
      problems.push(`${name} has no CRIU`);
      fixes.push(`run deploy/host/setup.sh on ${name}`);
    } else if (compareVersions(v, minCriu) < 0) {
      problems.push(`${name} has CRIU ${v}, older than ${minCriu} (it cannot dump TCP sockets on this kernel)`);
      fixes.push(`run deploy/host/setup.sh on ${name}`);
    } else if (!caps.criu?.checkOk) {
      problems.push(`\`criu check\` failed on ${name}`);
      fixes.push(`run deploy/host/setup.sh on ${name}`);
    }
  }
  if (source.arch && dest.arch && source.arch !== dest.arch) {
    problems.push(`${srcName} is ${source.arch} but ${dstName} is ${dest.arch}: a checkpoint cannot cross architectures`);
    fixes.push(`pick a ${source.arch} destination`);
  }
  const destFlags = new Set(dest.cpuFlags);
  const missing = source.cpuFlags.filter((f) => !destFlags.has(f));
  if (missing.length) {
    problems.push(`${dstName}'s CPU lacks flags ${srcName}'s has: ${missing.join(", ")} (the restored process may use them and crash)`);
    fixes.push(`pick a destination whose CPU has every flag of ${srcName}'s`);
  }
  const sk = kernelVersion(source.kernel);
  const dk = kernelVersion(dest.kernel);
  if (!sk || !dk) {
    warnings.push(`cannot compare kernels ("${source.kernel}" on ${srcName}, "${dest.kernel}" on ${dstName})`);
  } else if (dk[0] < sk[0] || (dk[0] === sk[0] && dk[1] < sk[1])) {
    warnings.push(`${dstName} runs kernel ${dk.join(".")}, older than ${srcName}'s ${sk.join(".")}: the restore may miss kernel features`);
  }
  if (problems.length) {
    throw new FerryError("FailedPrecondition", `cannot migrate from ${srcName} to ${dstName}: ${problems.join("; ")}`, {
      fix: [...new Set(fixes)].join("; "),
      data: { problems, missingCpuFlags: missing },
    });
  }
  return { warnings };
}

/** "4.2.1" vs "4.2" → 1; the first dotted number in each string is compared ("Version: 4.2" works). */
export function compareVersions(a: string, b: string): number {
  const pa = (a.match(/\d+(?:\.\d+)*/)?.[0] ?? "0").split(".").map(Number);
  const pb = (b.match(/\d+(?:\.\d+)*/)?.[0] ?? "0").split(".").map(Number);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return Math.sign(d);
  }
  return 0;
}

function kernelVersion(k: string): [number, number] | undefined {
  const m = /^(\d+)\.(\d+)/.exec(k.trim());
  return m ? [Number(m[1]), Number(m[2])] : undefined;
}
