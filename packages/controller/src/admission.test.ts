import { ContainerState, type GetCapabilitiesResponse, type GetResourcesResponse } from "@ferry/api/agent";
import { AdmissionStrategy } from "@ferry/api/controller";
import { FerryError } from "@ferry/common";
import { describe, expect, it } from "vitest";
import {
  checkAdmission,
  checkCapabilities,
  compareVersions,
  fmtBytes,
  strategyName,
  type IncomingContainer,
  type StrategyName,
} from "./admission.js";

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;

/** edge-b: 2 cores, 1 GiB; limits of all = 1050m / 704 MiB, of running = 550m / 320 MiB; used 300m / 400 MiB. */
function edgeB(over: Partial<GetResourcesResponse> = {}): GetResourcesResponse {
  return {
    capacity: { cpuCores: 2, memoryBytes: 1024 * MiB, diskBytes: 10 * GiB },
    free: { cpuMillicores: 1700, memoryBytes: 624 * MiB, diskBytes: 4 * GiB },
    used: { cpuMillicores: 300, memoryBytes: 400 * MiB, diskBytes: 6 * GiB },
    containers: [
      {
        name: "a",
        state: ContainerState.CONTAINER_STATE_RUNNING,
        cpuMillicores: 500,
        memoryLimitBytes: 256 * MiB,
        usage: { cpuMillicores: 100, memoryBytes: 100 * MiB, diskBytes: 0 },
      },
      { name: "b", state: ContainerState.CONTAINER_STATE_STOPPED, cpuMillicores: 500, memoryLimitBytes: 384 * MiB },
      // No limits: counted as its measured use (50m, 64 MiB) under the limit strategies.
      {
        name: "c",
        state: ContainerState.CONTAINER_STATE_RUNNING,
        cpuMillicores: 0,
        memoryLimitBytes: 0,
        usage: { cpuMillicores: 50, memoryBytes: 64 * MiB, diskBytes: 0 },
      },
    ],
    ...over,
  };
}

function web(over: Partial<IncomingContainer> = {}): IncomingContainer {
  return {
    name: "web",
    cpuMillicores: 500,
    memoryLimitBytes: 512 * MiB,
    usage: { cpuMillicores: 100, memoryBytes: 200 * MiB, diskBytes: 0 },
    imageBytes: 0,
    upperBytes: 10 * MiB,
    ...over,
  };
}

function refusal(f: () => unknown): FerryError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(FerryError);
    expect((e as FerryError).code).toBe("ResourceExhausted");
    return e as FerryError;
  }
  throw new Error("expected a refusal");
}

const admit = (
  strategy: StrategyName,
  incoming = web(),
  resources = edgeB(),
  reserved?: Parameters<typeof checkAdmission>[0]["reserved"],
) => checkAdmission({ host: "edge-b", resources, incoming, strategy, reserved });

describe("checkAdmission", () => {
  it("conservative refuses what semi-conservative and live admit (limits of stopped containers count)", () => {
    const e = refusal(() => admit("conservative"));
    expect(e.message).toBe(
      'edge-b cannot take "web" under conservative admission: memory needs 1.2 GiB (limits 704 MiB + incoming 512 MiB), capacity 1 GiB',
    );
    expect(e.data).toMatchObject({ resource: "memory", needBytes: 1216 * MiB, freeBytes: 320 * MiB, strategy: "conservative" });
    expect(e.fix).toMatch(/less strict strategy/);

    const semi = admit("semi-conservative").report;
    expect(semi.memory).toMatchObject({ committed: 320 * MiB, incoming: 512 * MiB, need: 832 * MiB, ok: true });
    const live = admit("live").report;
    expect(live.memory).toMatchObject({ committed: 400 * MiB, incoming: 200 * MiB, need: 600 * MiB, ok: true });
    expect(live.cpu).toMatchObject({ committed: 300, incoming: 100, need: 400, capacity: 2000 });
    expect(live.needs).toEqual({ cpuMillicores: 100, memoryBytes: 200 * MiB, diskBytes: 210 * MiB });
  });

  it("conservative admits when all limits fit", () => {
    const { ok, report } = admit("conservative", web({ memoryLimitBytes: 256 * MiB, cpuMillicores: 300 }));
    expect(ok).toBe(true);
    expect(report.memory).toMatchObject({ committed: 704 * MiB, need: 960 * MiB, free: 320 * MiB });
    expect(report.cpu).toMatchObject({ committed: 1050, need: 1350 });
  });

  it("conservative refuses on CPU: limits in millicores against cores × 1000", () => {
    const e = refusal(() => admit("conservative", web({ memoryLimitBytes: 256 * MiB, cpuMillicores: 1000 })));
    expect(e.message).toBe(
      'edge-b cannot take "web" under conservative admission: cpu needs 2050m (limits 1050m + incoming 1000m), capacity 2000m',
    );
    expect(e.data).toMatchObject({ resource: "cpu", needMillicores: 2050, freeMillicores: 950 });
  });

  it("semi-conservative refuses when the running containers' limits leave too little", () => {
    const e = refusal(() => admit("semi-conservative", web({ memoryLimitBytes: 768 * MiB })));
    expect(e.message).toBe(
      'edge-b cannot take "web" under semi-conservative admission: memory needs 1.1 GiB (limits of running containers 320 MiB + incoming 768 MiB), capacity 1 GiB',
    );
    expect(e.fix).toMatch(/or the live strategy/);
  });

  it("live refuses when the host is busy, whatever the limits", () => {
    const busy = edgeB({ used: { cpuMillicores: 300, memoryBytes: 900 * MiB, diskBytes: 0 } });
    const e = refusal(() => admit("live", web(), busy));
    expect(e.message).toBe(
      'edge-b cannot take "web" under live admission: memory needs 1.1 GiB (in use 900 MiB + incoming 200 MiB), capacity 1 GiB',
    );
    expect(e.fix).not.toMatch(/strategy/);
  });

  it("live counts the incoming container's limit when its use is unknown", () => {
    const { report } = admit("live", web({ usage: undefined, memoryLimitBytes: 300 * MiB }));
    expect(report.memory.incoming).toBe(300 * MiB);
  });

  it("a container without a limit counts as its measured use under the limit strategies", () => {
    const { report } = admit("conservative", web({ memoryLimitBytes: 0, cpuMillicores: 0 }));
    expect(report.memory).toMatchObject({ incoming: 200 * MiB, need: 904 * MiB });
    expect(report.warnings).toEqual([]);
    const blind = admit("conservative", web({ memoryLimitBytes: 0, cpuMillicores: 0, usage: undefined, checkpointBytes: MiB })).report;
    expect(blind.warnings).toEqual([
      '"web" has no cpu limit and no measured cpu use: counted as 0',
      '"web" has no memory limit and no measured memory use: counted as 0',
    ]);
  });

  it("produces the message of the design's example", () => {
    const r = edgeB({
      capacity: { cpuCores: 4, memoryBytes: 640 * MiB, diskBytes: 10 * GiB },
      containers: [{ name: "x", state: ContainerState.CONTAINER_STATE_RUNNING, cpuMillicores: 100, memoryLimitBytes: 512 * MiB }],
    });
    const e = refusal(() => admit("conservative", web({ memoryLimitBytes: 256 * MiB }), r));
    expect(e.message).toBe(
      'edge-b cannot take "web" under conservative admission: memory needs 768 MiB (limits 512 MiB + incoming 256 MiB), capacity 640 MiB',
    );
  });

  it("always checks disk: image (unless partial) + upper dir + checkpoint ≤ free", () => {
    const small = edgeB({ free: { cpuMillicores: 0, memoryBytes: 0, diskBytes: 1 * GiB } });
    const full = web({ imageBytes: 800 * MiB, upperBytes: 100 * MiB });
    for (const s of ["conservative", "semi-conservative", "live"] as const) {
      const e = refusal(() => admit(s, { ...full, memoryLimitBytes: 128 * MiB }, small));
      expect(e.message).toMatch(/disk needs 1\.1 GiB \(image 800 MiB \+ upper dir 100 MiB \+ checkpoint ~200 MiB\), free 1 GiB$/);
      expect(e.data).toMatchObject({ resource: "disk", needBytes: 1100 * MiB, freeBytes: 1 * GiB });
    }
    // Partial migration: the destination has the image.
    const { report } = admit("semi-conservative", { ...full, imageBytes: 0 }, small);
    expect(report.disk).toMatchObject({ need: 300 * MiB, ok: true });
  });

  it("counts what in-flight migrations reserved, and names every resource short", () => {
    expect(admit("conservative", web({ memoryLimitBytes: 256 * MiB })).ok).toBe(true);
    const e = refusal(() =>
      admit("conservative", web({ memoryLimitBytes: 256 * MiB }), edgeB(), { cpuMillicores: 800, memoryBytes: 128 * MiB, diskBytes: 0 }),
    );
    expect(e.message).toBe(
      'edge-b cannot take "web" under conservative admission: memory needs 1.1 GiB (limits 704 MiB + in-flight migrations 128 MiB + incoming 256 MiB), capacity 1 GiB; ' +
        "cpu needs 2350m (limits 1050m + in-flight migrations 800m + incoming 500m), capacity 2000m",
    );
    expect((e.data?.["failures"] as unknown[]).length).toBe(2);
  });

  it("refuses to guess without a capacity, and maps the proto enum", () => {
    expect(() => admit("live", web(), edgeB({ capacity: undefined }))).toThrow(/edge-b reported no capacity/);
    expect(strategyName(AdmissionStrategy.ADMISSION_STRATEGY_SEMI_CONSERVATIVE)).toBe("semi-conservative");
    expect(strategyName(AdmissionStrategy.ADMISSION_STRATEGY_UNSPECIFIED, "live")).toBe("live");
    expect(
      checkAdmission({ host: "edge-b", resources: edgeB(), incoming: web(), strategy: AdmissionStrategy.ADMISSION_STRATEGY_LIVE }).report
        .strategy,
    ).toBe("live");
    expect(fmtBytes(1536)).toBe("1.5 KiB");
  });
});

function caps(host: string, over: Partial<GetCapabilitiesResponse> = {}): GetCapabilitiesResponse {
  return {
    hostname: host,
    agentVersion: "0.1.0",
    kernel: "6.18.0-1-amd64",
    arch: "x86_64",
    criu: { version: "4.2.1", path: "/opt/ferry/bin/criu", checkOk: true, features: [] },
    runtime: "runc 1.1.5",
    cpuFlags: ["fpu", "sse2", "avx2"],
    cpuModel: "x",
    ovsVersion: "3.1.0",
    cgroupVersion: "v1",
    dirtyTracking: false,
    userfaultfd: true,
    ...over,
  };
}

function precondition(f: () => unknown): FerryError {
  try {
    f();
  } catch (e) {
    expect((e as FerryError).code).toBe("FailedPrecondition");
    return e as FerryError;
  }
  throw new Error("expected a refusal");
}

describe("checkCapabilities", () => {
  it("passes two alike hosts, and warns about an older destination kernel", () => {
    expect(checkCapabilities(caps("edge-a"), caps("edge-b"))).toEqual({ warnings: [] });
    const r = checkCapabilities(caps("edge-a"), caps("edge-b", { kernel: "6.1.0-13-amd64", cpuFlags: ["fpu", "sse2", "avx2", "avx512f"] }));
    expect(r.warnings).toEqual(["edge-b runs kernel 6.1, older than edge-a's 6.18: the restore may miss kernel features"]);
  });

  it("refuses an old, missing or broken CRIU on either end, with the setup fix", () => {
    let e = precondition(() =>
      checkCapabilities(caps("edge-a"), caps("edge-b", { criu: { version: "4.1", path: "", checkOk: true, features: [] } })),
    );
    expect(e.message).toBe(
      "cannot migrate from edge-a to edge-b: edge-b has CRIU 4.1, older than 4.2 (it cannot dump TCP sockets on this kernel)",
    );
    expect(e.fix).toBe("run deploy/host/setup.sh on edge-b");
    e = precondition(() => checkCapabilities(caps("edge-a", { criu: undefined }), caps("edge-b")));
    expect(e.message).toMatch(/edge-a has no CRIU/);
    e = precondition(() =>
      checkCapabilities(caps("edge-a"), caps("edge-b", { criu: { version: "4.2.1", path: "", checkOk: false, features: [] } })),
    );
    expect(e.message).toMatch(/`criu check` failed on edge-b/);
    expect(compareVersions("Version: 4.10", "4.2")).toBe(1);
  });

  it("refuses a destination CPU lacking a flag of the source's, before anything is frozen", () => {
    const e = precondition(() =>
      checkCapabilities(caps("edge-a", { cpuFlags: ["fpu", "sse2", "avx2", "avx512f", "sha_ni"] }), caps("edge-b")),
    );
    expect(e.message).toBe(
      "cannot migrate from edge-a to edge-b: edge-b's CPU lacks flags edge-a's has: avx512f, sha_ni (the restored process may use them and crash)",
    );
    expect(e.data?.["missingCpuFlags"]).toEqual(["avx512f", "sha_ni"]);
  });

  it("refuses across architectures, listing every problem at once", () => {
    const e = precondition(() =>
      checkCapabilities(
        caps("edge-a"),
        caps("edge-b", { arch: "aarch64", cpuFlags: [], criu: { version: "3.17", path: "", checkOk: false, features: [] } }),
      ),
    );
    expect(e.message).toMatch(/edge-b has CRIU 3\.17, older than 4\.2/);
    expect(e.message).toMatch(/edge-a is x86_64 but edge-b is aarch64/);
    expect(e.message).toMatch(/lacks flags edge-a's has: fpu, sse2, avx2/);
    expect(e.fix).toBe(
      "run deploy/host/setup.sh on edge-b; pick a x86_64 destination; pick a destination whose CPU has every flag of edge-a's",
    );
  });
});
