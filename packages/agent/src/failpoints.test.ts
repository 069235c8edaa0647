import { describe, expect, it } from "vitest";
import { Failpoints } from "./failpoints.js";

describe("failpoints", () => {
  it("fail the named call the given number of times, then let it through", async () => {
    const f = new Failpoints("restore=2, checkpoint=always");
    await expect(f.check("restore")).rejects.toThrow("failpoint restore");
    await expect(f.check("restore")).rejects.toThrow("failpoint restore");
    await expect(f.check("restore")).resolves.toBeUndefined();
    for (let i = 0; i < 5; i++) await expect(f.check("checkpoint")).rejects.toThrow("checkpoint");
    await expect(f.check("createNetns")).resolves.toBeUndefined();
  });

  it("delay a call without failing it", async () => {
    const f = new Failpoints("restore=delay:120");
    const t = performance.now();
    await f.check("restore");
    expect(performance.now() - t).toBeGreaterThanOrEqual(100);
  });

  it("do nothing when unset", async () => {
    await expect(new Failpoints("").check("restore")).resolves.toBeUndefined();
  });
});
