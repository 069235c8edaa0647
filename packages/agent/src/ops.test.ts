import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { AgentServiceService, type CreateNetnsResponse } from "@ferry/api/agent";
import type { CallContext } from "@ferry/common";
import { OperationLog, idempotent } from "./ops.js";

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), "ferry-ops-"));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

const ctx = {} as CallContext;

function counted() {
  let calls = 0;
  const impl = {
    createNetns: async (req: { container: string }): Promise<CreateNetnsResponse> => {
      calls++;
      await new Promise((r) => setTimeout(r, 20));
      return { netnsPath: `/run/netns/ferry-${req.container}`, veth: "fv1", ofport: 10 + calls, mac: "02:00:00:00:00:01" };
    },
  };
  return { impl, calls: () => calls };
}

describe("idempotent agent calls", () => {
  it("a retried call with the same key is answered from the record, not done twice", async () => {
    const { impl, calls } = counted();
    const wrapped = idempotent(AgentServiceService, impl as never, new OperationLog(dir)) as unknown as typeof impl & {
      createNetns: (r: object, c: CallContext) => Promise<CreateNetnsResponse>;
    };
    const req = { operationKey: "m-1/prepare-netns", container: "web", networkLock: [] };
    const a = await wrapped.createNetns(req, ctx);
    const b = await wrapped.createNetns(req, ctx);
    expect(calls()).toBe(1);
    expect(b).toEqual(a);
  });

  it("concurrent duplicates join the running call", async () => {
    const { impl, calls } = counted();
    const wrapped = idempotent(AgentServiceService, impl as never, new OperationLog(dir)) as unknown as {
      createNetns: (r: object, c: CallContext) => Promise<CreateNetnsResponse>;
    };
    const req = { operationKey: "m-2/prepare-netns", container: "web", networkLock: [] };
    const [a, b] = await Promise.all([wrapped.createNetns(req, ctx), wrapped.createNetns(req, ctx)]);
    expect(calls()).toBe(1);
    expect(a.ofport).toBe(b.ofport);
  });

  it("survives a restart: a new log over the same directory still answers", async () => {
    const first = counted();
    const req = { operationKey: "m-3/prepare-netns", container: "web", networkLock: [] };
    const w1 = idempotent(AgentServiceService, first.impl as never, new OperationLog(dir)) as unknown as {
      createNetns: (r: object, c: CallContext) => Promise<CreateNetnsResponse>;
    };
    const a = await w1.createNetns(req, ctx);
    const second = counted();
    const w2 = idempotent(AgentServiceService, second.impl as never, new OperationLog(dir)) as unknown as typeof w1;
    expect(await w2.createNetns(req, ctx)).toEqual(a);
    expect(second.calls()).toBe(0);
  });

  it("refuses a key reused for a different request, and runs calls without a key every time", async () => {
    const { impl, calls } = counted();
    const wrapped = idempotent(AgentServiceService, impl as never, new OperationLog(dir)) as unknown as {
      createNetns: (r: object, c: CallContext) => Promise<CreateNetnsResponse>;
    };
    await wrapped.createNetns({ operationKey: "m-4/x", container: "web", networkLock: [] }, ctx);
    const e = await wrapped.createNetns({ operationKey: "m-4/x", container: "db", networkLock: [] }, ctx).catch((x: unknown) => x);
    expect((e as { code: string }).code).toBe("AlreadyExists");
    await wrapped.createNetns({ operationKey: "", container: "web", networkLock: [] }, ctx);
    await wrapped.createNetns({ operationKey: "", container: "web", networkLock: [] }, ctx);
    expect(calls()).toBe(3);
  });

  it("does not record failures: a retry after a failure runs again", async () => {
    let n = 0;
    const impl = {
      createNetns: () => {
        n++;
        return n === 1 ? Promise.reject(new Error("transient")) : Promise.resolve({ netnsPath: "p", veth: "v", ofport: 1, mac: "m" });
      },
    };
    const wrapped = idempotent(AgentServiceService, impl as never, new OperationLog(dir)) as unknown as {
      createNetns: (r: object, c: CallContext) => Promise<CreateNetnsResponse>;
    };
    const req = { operationKey: "m-5/x", container: "web", networkLock: [] };
    await expect(wrapped.createNetns(req, ctx)).rejects.toThrow("transient");
    expect((await wrapped.createNetns(req, ctx)).netnsPath).toBe("p");
    expect(n).toBe(2);
  });
});
