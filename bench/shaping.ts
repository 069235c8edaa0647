// Link shaping like COAT's `tc netem delay` / rate limits on each VM's NIC, on a kernel without
// sch_netem: a userspace "delay wire" (deploy/coat/delaywire.c) is spliced into each emulated host's
// underlay link, inside the testbed's underlay namespace:
//
//   host netns: ul0 ═ veth ═ ul<N> ── delaywire ── dw<N>a ═ veth ═ dw<N>b ── br-ul
//
// Frames leaving host N (its egress, as tc on COAT's eth1/2/3) wait `delayMs` and are serialised
// at `rateMbit`; frames towards it pass untouched. Everything on the underlay is shaped: VXLAN,
// SSH, scp and gRPC alike, as netem on a VM's NIC shapes all its traffic.
//
// The key ROOT names the root namespace's link (`ulroot`, the controller's and the CLI's way to
// the agents): the benchmark gives it the client host's shape, so the controller's RPCs cross the
// same delays as the baseline's SSH commands from the client host.
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import path from "node:path";
import { FerryError, exec } from "@ferry/common";
import type { Testbed } from "@ferry/testbed";

/** One host's egress shaping; 0 = none. */
export interface LinkShape {
  delayMs: number;
  rateMbit: number;
}

/** Shape key of the root namespace's underlay link (where the controller runs). */
export const ROOT = "root";

/** COAT's shaping; the root namespace (controller + CLI) gets the client host's, see the README. */
export const COAT_SHAPES: Record<"sockperf" | "iperf", Record<string, LinkShape>> = {
  sockperf: {
    "edge-a": { delayMs: 20, rateMbit: 0 },
    "edge-b": { delayMs: 2, rateMbit: 0 },
    "client-host": { delayMs: 2, rateMbit: 0 },
    [ROOT]: { delayMs: 2, rateMbit: 0 },
  },
  iperf: {
    "edge-a": { delayMs: 0, rateMbit: 100 },
    "edge-b": { delayMs: 0, rateMbit: 500 },
    "client-host": { delayMs: 0, rateMbit: 500 },
    [ROOT]: { delayMs: 0, rateMbit: 500 },
  },
};

interface Wire {
  /** The underlay-side link of the host (ul<N>, or ulroot) and the tag of our veth pair (dw<tag>a/b). */
  link: string;
  tag: string;
  child: ChildProcess;
  exited: Promise<unknown>;
  /** What the wire wrote to stderr: its counters line when it exits. */
  stderr: string;
}

/** Builds delaywire once and splices wires into (and out of) the testbed's underlay links. */
export class Shaper {
  private readonly wires = new Map<string, Wire>();

  private constructor(
    private readonly tb: Testbed,
    private readonly binary: string,
  ) {}

  static async create(tb: Testbed, repo: string, workDir: string): Promise<Shaper> {
    const bin = path.join(workDir, "delaywire");
    await exec("gcc", ["-O2", "-Wall", "-o", bin, path.join(repo, "deploy/coat/delaywire.c")]);
    return new Shaper(tb, bin);
  }

  private ul(args: string[]): Promise<unknown> {
    return exec("ip", ["-n", this.tb.underlayNs, ...args]);
  }

  /** Shape each named host's egress; hosts not named are joined directly. Replaces earlier shaping. */
  async apply(shapes: Record<string, LinkShape>): Promise<void> {
    await this.clear();
    for (const [name, s] of Object.entries(shapes)) {
      if (!s.delayMs && !s.rateMbit) continue;
      const link = name === ROOT ? "ulroot" : `ul${this.tb.host(name).index}`;
      const n = name === ROOT ? "r" : String(this.tb.host(name).index);
      await this.ul(["link", "set", link, "nomaster"]);
      await this.ul(["link", "add", `dw${n}a`, "type", "veth", "peer", "name", `dw${n}b`]);
      await this.ul(["link", "set", `dw${n}b`, "master", "br-ul", "up"]);
      await this.ul(["link", "set", `dw${n}a`, "up"]);
      // What we write with AF_PACKET is complete; keep the kernel from expecting offloads on the way.
      await exec("ip", ["netns", "exec", this.tb.underlayNs, "ethtool", "-K", `dw${n}a`, "tx", "off"], { okCodes: [0, 1] });
      const args = [link, `dw${n}a`, String(Math.round(s.delayMs * 1000)), "0", String(Math.round(s.rateMbit * 1e6)), "0"];
      const child = spawn("nsenter", [`--net=/run/netns/${this.tb.underlayNs}`, this.binary, ...args], {
        stdio: ["ignore", "pipe", "pipe"],
      });
      const exited = once(child, "exit");
      const wire: Wire = { link, tag: n, child, exited, stderr: "" };
      child.stderr.on("data", (b: Buffer) => (wire.stderr += b.toString()));
      this.wires.set(name, wire);
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new FerryError("DeadlineExceeded", `delaywire for ${name} did not start`)), 5000);
        child.stdout.once("data", () => {
          clearTimeout(t);
          resolve();
        });
        child.once("exit", (code) => {
          clearTimeout(t);
          reject(new FerryError("Internal", `delaywire for ${name} exited with ${code}`));
        });
      });
    }
  }

  /**
   * Stop every wire and join the links back to the bridge directly. Safe to call twice. Returns
   * each stopped wire's counters line (see deploy/coat/delaywire.c).
   */
  async clear(): Promise<Record<string, string>> {
    const counters: Record<string, string> = {};
    for (const [name, w] of this.wires) {
      if (w.child.exitCode === null && w.child.signalCode === null) w.child.kill("SIGTERM");
      await w.exited;
      counters[name] = w.stderr.trim();
      await exec("ip", ["-n", this.tb.underlayNs, "link", "del", `dw${w.tag}a`], { okCodes: [0, 1] }).catch(() => undefined);
      await exec("ip", ["-n", this.tb.underlayNs, "link", "set", w.link, "master", "br-ul"], { okCodes: [0, 1, 2] }).catch(() => undefined);
      this.wires.delete(name);
    }
    return counters;
  }
}
