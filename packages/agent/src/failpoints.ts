import { FerryError } from "@ferry/common";

/**
 * Failpoints make a real RPC fail on purpose, for tests of rollback against the real tools
 * (containerd's failpoint idea). Configured from FERRY_FAILPOINTS, e.g. "restore=1,checkpoint=always":
 * the named RPC fails before doing anything, once (or N times) or always. Off unless set.
 */
export class Failpoints {
  private readonly left = new Map<string, number>();

  constructor(spec = "") {
    for (const part of spec
      .split(",")
      .map((s) => s.trim())
      .filter(Boolean)) {
      const [name, count = "1"] = part.split("=");
      this.left.set(name!, count === "always" ? Infinity : Number(count));
    }
  }

  /** Throws when the failpoint `name` is armed; counts it down. */
  check(name: string): void {
    const n = this.left.get(name);
    if (!n) return;
    this.left.set(name, n - 1);
    throw new FerryError("Internal", `failpoint ${name} fired (FERRY_FAILPOINTS)`, { fix: "unset FERRY_FAILPOINTS" });
  }
}
