import { readFileSync } from "node:fs";
import { spawn } from "node:child_process";
import net from "node:net";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { ContainerState } from "@ferry/api/agent";
import { encodeCriuStats, IMG_SERVICE_MAGIC, parseCriuStats, STATS_MAGIC } from "./criu-stats.js";
import { KeyedMutex } from "./keyed-mutex.js";
import { buildOciConfig } from "./oci.js";
import { establishedConnections, formatIpv6, openTcpTables, parseProcNetTcp } from "./proc-net.js";
import { validateCheckpointId } from "./container-runtime.js";
import { readRuncState } from "./runc.js";

const spec = {
  name: "web",
  image: "testkit",
  args: ["/usr/local/bin/ferry-echo", "7000"],
  env: ["A=1"],
  cwd: "",
  cpuMillicores: 500,
  memoryLimitBytes: 64 << 20,
  labels: {},
};

describe("CRIU stats files", () => {
  it("decodes a dump entry as CRIU writes it (magics, size, protobuf)", () => {
    const dump = {
      freezingTimeUs: 2147,
      frozenTimeUs: 148396,
      memdumpTimeUs: 7581,
      memwriteTimeUs: 3477,
      pagesScanned: 2204,
      pagesSkippedParent: 0,
      pagesWritten: 2131,
      pagesLazy: 0,
    };
    const buf = encodeCriuStats({ dump });
    expect(new DataView(buf.buffer).getUint32(0, true)).toBe(IMG_SERVICE_MAGIC);
    expect(new DataView(buf.buffer).getUint32(4, true)).toBe(STATS_MAGIC);
    expect(parseCriuStats(buf)).toEqual({ dump });
  });

  it("decodes a restore entry and large varints", () => {
    const restore = { pagesCompared: 0, pagesSkippedCow: 0, forkingTimeUs: 5_000_000_000, restoreTimeUs: 91_234, pagesRestored: 2131 };
    expect(parseCriuStats(encodeCriuStats({ restore }))).toEqual({ restore });
  });

  it("refuses a file with the wrong magic or a truncated entry", () => {
    const buf = encodeCriuStats({
      restore: { pagesCompared: 1, pagesSkippedCow: 0, forkingTimeUs: 1, restoreTimeUs: 1, pagesRestored: 1 },
    });
    const bad = buf.slice();
    bad[0] = 0;
    expect(() => parseCriuStats(bad)).toThrow(/bad magic/);
    expect(() => parseCriuStats(buf.subarray(0, buf.length - 2))).toThrow(/overruns/);
  });

  // a real stats-dump from CRIU 4.2.1, when one is around (FERRY_STATS_DUMP=path)
  it.skipIf(!process.env.FERRY_STATS_DUMP)("decodes a real stats-dump", () => {
    const s = parseCriuStats(readFileSync(process.env.FERRY_STATS_DUMP!));
    expect(s.dump?.pagesWritten).toBeGreaterThan(0);
  });
});

describe("/proc/net/tcp parsing", () => {
  // Lines as this (little-endian) kernel writes them; the header line is skipped.
  const head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
  it("keeps established connections, IPv4 and IPv6, and decodes the kernel's word order", () => {
    const v4 = [
      head,
      "   0: 00000000:1B58 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0",
      "   1: 0A004D0A:1B58 63004D0A:A112 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1",
      "   2: 0A004D0A:1B58 64004D0A:A113 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0",
      "",
    ].join("\n");
    const v6 = [
      head,
      "   0: 0000000000000000FFFF00000A004D0A:0050 0000000000000000FFFF00000100000A:15B3 01 00000000:00000000 00:00000000 00000000 0 0 3 1",
      "   1: 000080FE00000000000000000100000000:0016 000080FE00000000000000000200000000:9C40 01 00000000:00000000 00:00000000 00000000 0 0 4 1",
      "   2: 000080FE000000000000000001000000:0016 000080FE000000000000000002000000:9C40 01 00000000:00000000 00:00000000 00000000 0 0 4 1",
    ].join("\n");
    expect(parseProcNetTcp(v4)).toEqual([{ localAddress: "10.77.0.10", localPort: 7000, remoteAddress: "10.77.0.99", remotePort: 41234 }]);
    // the second line has 34 hex digits: not an address, skipped
    expect(parseProcNetTcp(v6)).toEqual([
      { localAddress: "::ffff:10.77.0.10", localPort: 80, remoteAddress: "::ffff:10.0.0.1", remotePort: 5555 },
      { localAddress: "fe80::1", localPort: 22, remoteAddress: "fe80::2", remotePort: 40000 },
    ]);
  });

  it("writes IPv6 addresses as inet_ntop does", () => {
    const f = (groups: number[]): string => {
      const b = Buffer.alloc(16);
      groups.forEach((g, i) => b.writeUInt16BE(g, i * 2));
      return formatIpv6(b);
    };
    expect(f([0, 0, 0, 0, 0, 0, 0, 0])).toBe("::");
    expect(f([0, 0, 0, 0, 0, 0, 0, 1])).toBe("::1");
    expect(f([1, 0, 0, 0, 0, 0, 0, 0])).toBe("1::");
    expect(f([0x2001, 0xdb8, 0, 0, 1, 0, 0, 1])).toBe("2001:db8::1:0:0:1");
    expect(f([0x2001, 0xdb8, 0, 1, 0, 0, 0, 1])).toBe("2001:db8:0:1::1");
    expect(f([0x2001, 0xdb8, 1, 1, 1, 1, 0, 1])).toBe("2001:db8:1:1:1:1:0:1");
    expect(f([0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001])).toBe("::ffff:10.0.0.1");
    expect(f([0, 0, 0, 0, 0, 0, 0x0a00, 0x0001])).toBe("::10.0.0.1");
  });

  it("reads tables opened while a process lived after it is gone (its namespace is held)", async () => {
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as net.AddressInfo).port;
    const accepted = new Promise<net.Socket>((r) => server.once("connection", r));
    const client = net.connect(port, "127.0.0.1");
    await new Promise((r) => client.once("connect", r));
    const peer = await accepted;
    const child = spawn("sleep", ["30"], { stdio: "ignore" });
    try {
      const tables = await openTcpTables(child.pid!);
      child.kill("SIGKILL");
      await new Promise((r) => child.once("exit", r));
      await expect(readFile(`/proc/${child.pid}/net/tcp`)).rejects.toMatchObject({ code: "ENOENT" });
      expect(await tables.read()).toContainEqual({
        localAddress: "127.0.0.1",
        localPort: port,
        remoteAddress: "127.0.0.1",
        remotePort: client.localPort,
      });
    } finally {
      child.kill("SIGKILL");
      client.destroy();
      peer.destroy();
      server.close();
    }
  });

  it("finds this process's own loopback connection, both ends, IPv4 and IPv6", async () => {
    for (const host of ["127.0.0.1", "::1"]) {
      const server = net.createServer();
      await new Promise<void>((r) => server.listen(0, host, r));
      const port = (server.address() as net.AddressInfo).port;
      const accepted = new Promise<net.Socket>((r) => server.once("connection", r));
      const client = net.connect(port, host);
      await new Promise((r) => client.once("connect", r));
      const peer = await accepted;
      try {
        const conns = await establishedConnections(process.pid);
        expect(conns).toContainEqual({ localAddress: host, localPort: port, remoteAddress: host, remotePort: client.localPort });
        expect(conns).toContainEqual({ localAddress: host, localPort: client.localPort, remoteAddress: host, remotePort: port });
      } finally {
        client.destroy();
        peer.destroy();
        server.close();
      }
    }
  });
});

describe("OCI config", () => {
  it("puts limits, the netns path and the one-level cgroup path, and no rlimits", () => {
    const c = buildOciConfig(spec, { netnsPath: "/run/netns/ferry-web", cgroupsPath: "/ferry-a1-web" }) as {
      process: Record<string, unknown>;
      linux: { cgroupsPath: string; resources: { cpu: unknown; memory: unknown }; namespaces: { type: string; path?: string }[] };
    };
    expect(c.process.terminal).toBe(false);
    expect(c.process.rlimits).toBeUndefined();
    expect(c.process.cwd).toBe("/");
    expect(c.process.env).toEqual(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "A=1"]);
    expect(c.linux.cgroupsPath).toBe("/ferry-a1-web");
    expect(c.linux.resources.cpu).toEqual({ quota: 50_000, period: 100_000 });
    expect(c.linux.resources.memory).toEqual({ limit: 64 << 20 });
    expect(c.linux.namespaces).toContainEqual({ type: "network", path: "/run/netns/ferry-web" });
    expect(c.linux.namespaces.map((n) => n.type).sort()).toEqual(["ipc", "mount", "network", "pid", "uts"]);
  });

  it("leaves out limits of 0 (unlimited)", () => {
    const c = buildOciConfig({ ...spec, cpuMillicores: 0, memoryLimitBytes: 0 }, { netnsPath: "/x", cgroupsPath: "/y" }) as {
      linux: { resources: Record<string, unknown> };
    };
    expect(c.linux.resources.cpu).toBeUndefined();
    expect(c.linux.resources.memory).toBeUndefined();
    expect(ContainerState.CONTAINER_STATE_CHECKPOINTED).toBe(5);
  });
});

describe("checkpoint ids and keyed locks", () => {
  it("accepts generated ids, refuses traversal", () => {
    expect(validateCheckpointId("id", "web-mwso2yny-dcb08c")).toBe("web-mwso2yny-dcb08c");
    expect(() => validateCheckpointId("id", "../etc")).toThrow(/checkpoint id/);
    expect(() => validateCheckpointId("id", "a..b")).toThrow(/checkpoint id/);
  });

  it("serialises work per key, runs keys in parallel, survives a failure", async () => {
    const m = new KeyedMutex();
    const order: string[] = [];
    const slow = (k: string, ms: number, fail = false) =>
      m.run(k, async () => {
        order.push(`${k}+`);
        await new Promise((r) => setTimeout(r, ms));
        order.push(`${k}-`);
        if (fail) throw new Error("boom");
      });
    const a1 = slow("a", 30, true);
    const a2 = slow("a", 1);
    const b = slow("b", 1);
    await expect(a1).rejects.toThrow("boom");
    await Promise.all([a2, b]);
    expect(order.indexOf("a-")).toBeLessThan(order.lastIndexOf("a+"));
    expect(order.indexOf("b-")).toBeLessThan(order.indexOf("a-"));
  });
});

describe("runc's state file", () => {
  // this test process stands in for a container's init: its pid and start time are real
  const stat = readFileSync("/proc/self/stat", "utf8");
  const startTime = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19]);
  const file = (over: object = {}): object => ({
    id: "web",
    init_process_pid: process.pid,
    init_process_start: startTime,
    created: "2026-11-23T07:21:33.93213196Z",
    config: { labels: ["bundle=/b/web"] },
    cgroup_paths: {},
    ...over,
  });

  it("reads running, created, stopped (a pid reused by another process) as runc does; unknown shapes go to runc", async () => {
    const root = await mkdtemp(path.join(tmpdir(), "ferry-runc-"));
    try {
      await mkdir(path.join(root, "web"));
      const put = (f: object): Promise<void> => writeFile(path.join(root, "web", "state.json"), JSON.stringify(f));
      const base = { id: "web", bundle: "/b/web", created: "2026-11-23T07:21:33.93213196Z" };
      await put(file());
      expect(await readRuncState(root, "web")).toEqual({ ...base, pid: process.pid, status: "running" });
      await writeFile(path.join(root, "web", "exec.fifo"), "");
      expect(await readRuncState(root, "web")).toMatchObject({ status: "created" });
      await put(file({ init_process_start: startTime + 1 }));
      expect(await readRuncState(root, "web")).toEqual({ ...base, pid: 0, status: "stopped" });
      await put(file({ init_process_pid: 0x3ffffff }));
      expect(await readRuncState(root, "web")).toMatchObject({ pid: 0, status: "stopped" });
      expect(await readRuncState(root, "nope")).toBeUndefined();
      await put(file({ config: {} }));
      expect(await readRuncState(root, "web")).toBe("unknown");
      await writeFile(path.join(root, "web", "state.json"), "{");
      expect(await readRuncState(root, "web")).toBe("unknown");
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });
});
