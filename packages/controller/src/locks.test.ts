import { FerryError } from "@ferry/common";
import { describe, expect, it } from "vitest";
import { LockTable, containerLock, hostLock } from "./locks.js";

const migrate = (t: LockTable, id: string, container: string, from: string, to: string) =>
  t.tryAcquire([containerLock(container), hostLock(from), hostLock(to)], id, `migration ${id} (${from} → ${to})`, { doing: "migrated" });

function thrown(f: () => unknown): FerryError {
  try {
    f();
  } catch (e) {
    return e as FerryError;
  }
  throw new Error("expected a throw");
}

describe("LockTable", () => {
  it("refuses a second migration of the same container with a message naming the holder", () => {
    const t = new LockTable();
    migrate(t, "m-123", "web", "edge-a", "edge-b");
    const e = thrown(() => migrate(t, "m-124", "web", "edge-a", "edge-c"));
    expect(e).toBeInstanceOf(FerryError);
    expect(e.code).toBe("FailedPrecondition");
    expect(e.message).toBe('container "web" is being migrated by migration m-123 (edge-a → edge-b); retry when it ends or cancel it');
    expect(e.data).toMatchObject({ key: "container:web", owner: "m-123", mode: "exclusive" });
    expect(t.holder("container:web")?.owner).toBe("m-123");
  });

  it("lets migrations of different containers share hosts (MIRA's parallel migrations)", () => {
    const t = new LockTable();
    migrate(t, "m-1", "web", "edge-a", "edge-b");
    migrate(t, "m-2", "db", "edge-a", "edge-b");
    migrate(t, "m-3", "cache", "edge-b", "edge-c");
    expect(t.holders("host:edge-b").map((h) => h.owner)).toEqual(["m-1", "m-2", "m-3"]);
  });

  it("makes a host-level operation exclusive against migrations, both ways", () => {
    const t = new LockTable();
    const release = migrate(t, "m-1", "web", "edge-a", "edge-b");
    const e = thrown(() => t.tryAcquire([hostLock("edge-b", "exclusive")], "drain-1", "drain of edge-b", { doing: "drained" }));
    expect(e.message).toBe(
      'host "edge-b" is being used by migration m-1 (edge-a → edge-b) (shared; this operation needs it alone); retry when it ends or cancel it',
    );
    release();
    const releaseDrain = t.tryAcquire([hostLock("edge-b", "exclusive")], "drain-1", "drain of edge-b", { doing: "drained" });
    expect(thrown(() => migrate(t, "m-2", "db", "edge-a", "edge-b")).message).toBe(
      'host "edge-b" is being drained by drain of edge-b; retry when it ends or cancel it',
    );
    releaseDrain();
    expect(() => migrate(t, "m-2", "db", "edge-a", "edge-b")).not.toThrow();
  });

  it("takes all keys or none", () => {
    const t = new LockTable();
    t.tryAcquire([hostLock("edge-c", "exclusive")], "rm-1", "removal of edge-c", { doing: "removed" });
    expect(() => migrate(t, "m-1", "web", "edge-a", "edge-c")).toThrow(/host "edge-c" is being removed/);
    // Nothing of the refused request stayed held.
    expect(t.holder("container:web")).toBeUndefined();
    expect(t.holder("host:edge-a")).toBeUndefined();
    expect(t.all().map((h) => h.key)).toEqual(["host:edge-c"]);
  });

  it("release is idempotent and frees only its own holds", () => {
    const t = new LockTable();
    const r1 = migrate(t, "m-1", "web", "edge-a", "edge-b");
    migrate(t, "m-2", "db", "edge-a", "edge-b");
    r1();
    r1();
    expect(t.holders("host:edge-a").map((h) => h.owner)).toEqual(["m-2"]);
    expect(t.holder("container:web")).toBeUndefined();
    expect(t.holder("container:db")?.owner).toBe("m-2");
  });

  it("is not re-entrant, and takes the strongest mode for a key asked twice", () => {
    const t = new LockTable();
    t.tryAcquire(["container:web"], "m-1", "migration m-1");
    expect(() => t.tryAcquire(["container:web"], "m-1", "migration m-1")).toThrow(FerryError);
    t.tryAcquire([hostLock("edge-a"), hostLock("edge-a", "exclusive")], "op", "an op");
    expect(t.holders("host:edge-a")).toHaveLength(1);
    expect(t.holder("host:edge-a")?.mode).toBe("exclusive");
    expect(() => t.tryAcquire(["web"], "x", "x")).toThrow(/not "<kind>:<name>"/);
  });
});
