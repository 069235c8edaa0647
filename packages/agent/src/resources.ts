import { statfs } from "node:fs/promises";
import os from "node:os";
import si from "systeminformation";
import type { Capacity, Usage } from "@ferry/api/agent";

export interface HostSample {
  capacity: Capacity;
  used: Usage;
  free: Usage;
}

/**
 * Host capacity and use, measured: cores from the OS, memory from systeminformation, CPU load
 * from the OS's per-core times (the delta since the previous sample), disk from the filesystem
 * that holds the agent's state (where images and checkpoints land).
 *
 * Not systeminformation's currentLoad: on Linux it runs `cat /proc/stat | grep cpu` through
 * execSync on every call, a fork of the whole agent on its event loop (about 5 ms at 100 MiB)
 * once a second for the metrics stream, stalling whatever calls the agent is serving.
 */
export class HostResources {
  private last: { busy: number; total: number } | undefined;

  constructor(private readonly stateDir: string) {}

  async sample(): Promise<HostSample> {
    const [mem, fs] = await Promise.all([si.mem(), statfs(this.stateDir)]);
    const cpus = os.cpus();
    const cores = cpus.length;
    const diskTotal = fs.blocks * fs.bsize;
    const diskFree = fs.bavail * fs.bsize;
    const cpuUsed = Math.round(this.busyShare(cpus) * cores * 1000);
    const memUsed = mem.total - mem.available;
    return {
      capacity: { cpuCores: cores, memoryBytes: mem.total, diskBytes: diskTotal },
      used: { cpuMillicores: cpuUsed, memoryBytes: memUsed, diskBytes: diskTotal - diskFree },
      free: { cpuMillicores: Math.max(0, cores * 1000 - cpuUsed), memoryBytes: mem.available, diskBytes: diskFree },
    };
  }

  /** The share of all cores' time spent busy since the previous sample (the first: since boot). */
  private busyShare(cpus: os.CpuInfo[]): number {
    let busy = 0;
    let total = 0;
    for (const { times: t } of cpus) {
      const all = t.user + t.nice + t.sys + t.idle + t.irq;
      total += all;
      busy += all - t.idle;
    }
    const prev = this.last;
    this.last = { busy, total };
    const dBusy = busy - (prev?.busy ?? 0);
    const dTotal = total - (prev?.total ?? 0);
    return dTotal > 0 ? Math.min(1, Math.max(0, dBusy / dTotal)) : 0;
  }
}
