import { setTimeout as sleep } from "node:timers/promises";
import { FerryError } from "@ferry/common";

/**
 * Failpoints make a real RPC fail (or stall) on purpose, for tests of rollback and of a
 * controller restart against the real tools (containerd's failpoint idea). Configured from
 * FERRY_FAILPOINTS, e.g. "restore=1,checkpoint=always,createNetns=delay:3000": the named RPC
 * fails before doing anything, once (or N times) or always, or first waits that many ms.
 * Off unless set.
 */
export class Failpoints {
  private readonly left = new Map<string, number>();
  private readonly delays = new Map<string, number>();

  constructor(spec = "") {
    for (const part of spec.split(",").map((s) => s.trim())) {
      if (!part) continue;
      const [name = "", what = "1"] = part.split("=");
      if (what.startsWith("delay:")) this.delays.set(name, Number(what.slice("delay:".length)));
      else this.left.set(name, what === "always" ? Infinity : Number(what));
    }
  }

  /** Waits when `name` has a delay; throws when it is armed to fail, counting it down. */
  async check(name: string): Promise<void> {
    const ms = this.delays.get(name);
    if (ms) await sleep(ms);
    const n = this.left.get(name);
    if (!n) return;
    this.left.set(name, n - 1);
    throw new FerryError("Internal", `failpoint ${name} fired (FERRY_FAILPOINTS)`, { fix: "unset FERRY_FAILPOINTS" });
  }
}
