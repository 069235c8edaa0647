import { ContainerState, type GetResourcesResponse } from "@ferry/api/agent";
import { type FerryError } from "@ferry/common";
import { describe, expect, it } from "vitest";
import { checkAdmission, type IncomingContainer } from "./admission.js";
import { MigrationScheduler } from "./scheduler.js";

const MiB = 1024 ** 2;

/** 1 GiB host with 512 MiB of limits already placed. */
const dest: GetResourcesResponse = {
  capacity: { cpuCores: 4, memoryBytes: 1024 * MiB, diskBytes: 100 * 1024 * MiB },
  free: { cpuMillicores: 4000, memoryBytes: 512 * MiB, diskBytes: 50 * 1024 * MiB },
  used: { cpuMillicores: 0, memoryBytes: 512 * MiB, diskBytes: 0 },
  containers: [{ name: "x", state: ContainerState.CONTAINER_STATE_RUNNING, cpuMillicores: 500, memoryLimitBytes: 512 * MiB }],
};
const incoming = (name: string): IncomingContainer => ({
  name,
  cpuMillicores: 250,
  memoryLimitBytes: 300 * MiB,
  imageBytes: 0,
  upperBytes: MiB,
  checkpointBytes: 10 * MiB,
});

function req(id: string, destination = "edge-b", source = "edge-a") {
  return {
    id,
    source,
    destination,
    admit: (reserved: Parameters<typeof checkAdmission>[0]["reserved"]) =>
      checkAdmission({ host: destination, resources: dest, incoming: incoming(id), strategy: "conservative", reserved }),
  };
}

function code(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    return (e as FerryError).code;
  }
  return "none";
}

describe("MigrationScheduler", () => {
  it("admits a second migration to one host against capacity minus the first's reservation", () => {
    const s = new MigrationScheduler({ maxParallel: 4 });
    const first = s.reserve(req("m-1"));
    expect(first.needs).toEqual({ cpuMillicores: 250, memoryBytes: 300 * MiB, diskBytes: 11 * MiB });
    expect(s.reserved("edge-b").memoryBytes).toBe(300 * MiB);
    // Alone it fits (512 + 300 ≤ 1024); with m-1's 300 MiB reserved it does not.
    let err: FerryError | undefined;
    try {
      s.reserve(req("m-2"));
    } catch (e) {
      err = e as FerryError;
    }
    expect(err?.code).toBe("ResourceExhausted");
    expect(err?.message).toMatch(/memory needs 1.1 GiB \(limits 512 MiB \+ in-flight migrations 300 MiB \+ incoming 300 MiB\)/);
    expect(s.running()).toBe(1); // a refused admission takes no slot
    // Another destination is unaffected.
    expect(() => s.reserve(req("m-3", "edge-c"))).not.toThrow();
    first.release();
    expect(s.reserved("edge-b").memoryBytes).toBe(0);
    expect(() => s.reserve(req("m-2"))).not.toThrow();
  });

  it("refuses past the global limit, and frees the slot on release (idempotently)", () => {
    const s = new MigrationScheduler({ maxParallel: 2 });
    const a = s.reserve(req("m-1", "h1"));
    s.reserve(req("m-2", "h2"));
    let err: FerryError | undefined;
    try {
      s.reserve(req("m-3", "h3"));
    } catch (e) {
      err = e as FerryError;
    }
    expect(err?.code).toBe("ResourceExhausted");
    expect(err?.message).toBe("2 migrations are running (m-1, m-2), the limit is 2");
    a.release();
    a.release();
    expect(s.running()).toBe(1);
    s.reserve(req("m-3", "h3"));
    expect(s.ids()).toEqual(["m-2", "m-3"]);
    expect(code(() => s.reserve(req("m-4", "h4")))).toBe("ResourceExhausted");
  });

  it("bounds migrations per host, as source or destination", () => {
    const s = new MigrationScheduler({ maxParallel: 10, maxPerHost: 1 });
    s.reserve(req("m-1", "edge-b", "edge-a"));
    expect(code(() => s.reserve(req("m-2", "edge-c", "edge-a")))).toBe("ResourceExhausted");
    expect(code(() => s.reserve(req("m-3", "edge-a", "edge-d")))).toBe("ResourceExhausted");
    expect(code(() => s.reserve(req("m-4", "edge-c", "edge-d")))).toBe("none");
  });

  it("refuses a duplicate id and a bad limit", () => {
    const s = new MigrationScheduler();
    s.reserve(req("m-1", "h1"));
    expect(code(() => s.reserve(req("m-1", "h2")))).toBe("AlreadyExists");
    expect(code(() => new MigrationScheduler({ maxParallel: 0 }))).toBe("InvalidArgument");
  });
});
