/**
 * The benchmark's link shaping (bench/shaping.ts, deploy/coat/delaywire.c) against the real
 * kernel: each shaped host's egress waits its own delay and leaves at its own rate, nothing is
 * lost on the way, and clearing joins the links back as they were. Runs as root.
 */
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runInNetns, Testbed, type EmulatedHost } from "@ferry/testbed";
import { Shaper } from "../../bench/shaping.js";
import { pingFrom } from "../helpers/ping.js";

const isRoot = process.getuid?.() === 0;
const REPO = path.resolve(import.meta.dirname, "../..");
const PREFIX = `ferry-t${randomBytes(2).toString("hex")}-`;
const COUNTERS = /^a->b fwd=(\d+) dropped=0 lost=0 kernel_drops=0; b->a fwd=(\d+) dropped=0 lost=0 kernel_drops=0$/;

let tb: Testbed | undefined;
let shaper: Shaper | undefined;
let work = "";
let a: EmulatedHost;
let b: EmulatedHost;

/** Average RTT of pings from host `from` to host `to`'s underlay address. */
async function rttMs(from: EmulatedHost, to: EmulatedHost): Promise<number> {
  const p = await pingFrom(from.netnsPath, to.underlayIp, 8, 2);
  expect(p.received).toBe(8);
  return p.avgMs;
}

/** iperf3 from `from` to `to` for 2 s; the receiver's rate in Mbit/s. */
async function throughputMbit(from: EmulatedHost, to: EmulatedHost): Promise<number> {
  const server = spawn("nsenter", [`--net=${to.netnsPath}`, "iperf3", "-s", "-1", "-p", "5299", "--forceflush"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  const exited = new Promise((r) => server.once("exit", r));
  try {
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error("iperf3 server did not start")), 5000);
      server.stdout.once("data", () => {
        clearTimeout(t);
        resolve();
      });
    });
    const r = await runInNetns(from.netnsPath, "iperf3", ["-c", to.underlayIp, "-p", "5299", "-t", "2", "-J"]);
    return (JSON.parse(r.stdout) as { end: { sum_received: { bits_per_second: number } } }).end.sum_received.bits_per_second / 1e6;
  } finally {
    if (server.exitCode === null && server.signalCode === null) server.kill("SIGKILL");
    await exited;
  }
}

describe.skipIf(!isRoot)("link shaping (delaywire)", () => {
  beforeAll(async () => {
    tb = await Testbed.create({ prefix: PREFIX, underlayNet: "172.31.3" });
    a = await tb.createHost({ name: "sa" });
    b = await tb.createHost({ name: "sb" });
    work = await mkdtemp(path.join(tmpdir(), "ferry-shaping-"));
    shaper = await Shaper.create(tb, REPO, work);
  });

  afterAll(async () => {
    await shaper?.clear();
    await tb?.destroy();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it("delays each host's egress by that host's delay, and loses nothing", async () => {
    const direct = await rttMs(a, b);
    await shaper!.apply({ sa: { delayMs: 20, rateMbit: 0 }, sb: { delayMs: 5, rateMbit: 0 } });
    const shaped = await rttMs(a, b);
    expect(shaped).toBeGreaterThanOrEqual(25);
    expect(shaped).toBeLessThan(25 + direct + 10);
    const counters = await shaper!.clear();
    for (const host of ["sa", "sb"]) {
      const m = COUNTERS.exec(counters[host] ?? "");
      expect(m, `${host}: ${counters[host]}`).not.toBeNull();
      // every ping out of each host, and every reply into it, crossed its wire
      expect(Number(m![1])).toBeGreaterThanOrEqual(8);
      expect(Number(m![2])).toBeGreaterThanOrEqual(8);
    }
    // cleared: the links are joined to the bridge directly again
    expect(await rttMs(a, b)).toBeLessThan(10);
  });

  it("serialises a host's egress at its rate, one direction only", async () => {
    await shaper!.apply({ sa: { delayMs: 0, rateMbit: 20 } });
    const out = await throughputMbit(a, b);
    const back = await throughputMbit(b, a);
    const counters = await shaper!.clear();
    expect(out).toBeLessThanOrEqual(20 * 1.05);
    expect(out).toBeGreaterThan(20 * 0.5);
    expect(back).toBeGreaterThan(100);
    // a tail-drop queue may drop by design under a rate; nothing may be lost otherwise
    expect(counters.sa).toMatch(/lost=0 kernel_drops=0; b->a fwd=\d+ dropped=0 lost=0 kernel_drops=0$/);
  });
});
