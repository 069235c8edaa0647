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
 * Host capacity and use, measured: cores and memory from the OS, CPU load from
 * systeminformation (its own delta since the previous call), disk from the filesystem that
 * holds the agent's state (where images and checkpoints land).
 */
export class HostResources {
  constructor(private readonly stateDir: string) {}

  async sample(): Promise<HostSample> {
    const [load, mem, fs] = await Promise.all([si.currentLoad(), si.mem(), statfs(this.stateDir)]);
    const cores = os.cpus().length;
    const diskTotal = fs.blocks * fs.bsize;
    const diskFree = fs.bavail * fs.bsize;
    const cpuUsed = Math.round((load.currentLoad / 100) * cores * 1000);
    const memUsed = mem.total - mem.available;
    return {
      capacity: { cpuCores: cores, memoryBytes: mem.total, diskBytes: diskTotal },
      used: { cpuMillicores: cpuUsed, memoryBytes: memUsed, diskBytes: diskTotal - diskFree },
      free: { cpuMillicores: Math.max(0, cores * 1000 - cpuUsed), memoryBytes: mem.available, diskBytes: diskFree },
    };
  }
}
