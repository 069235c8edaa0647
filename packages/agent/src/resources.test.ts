import { tmpdir } from "node:os";
import { describe, expect, it } from "vitest";
import { HostResources } from "./resources.js";

describe("HostResources", () => {
  it("measures the CPU load between two samples: a busy core shows", async () => {
    const r = new HostResources(tmpdir());
    const first = await r.sample();
    expect(first.capacity.cpuCores).toBeGreaterThan(0);
    expect(first.capacity.memoryBytes).toBeGreaterThan(0);
    expect(first.used.memoryBytes).toBeGreaterThan(0);
    expect(first.capacity.diskBytes).toBeGreaterThan(first.free.diskBytes);
    // Keep one core busy for 400 ms: at least half a core of load in the next sample, at most all of them.
    const until = performance.now() + 400;
    while (performance.now() < until);
    const busy = await r.sample();
    expect(busy.used.cpuMillicores).toBeGreaterThanOrEqual(400);
    expect(busy.used.cpuMillicores).toBeLessThanOrEqual(busy.capacity.cpuCores * 1000);
    expect(busy.used.cpuMillicores + busy.free.cpuMillicores).toBe(busy.capacity.cpuCores * 1000);
  });
});
