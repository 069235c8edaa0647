// Streaming benchmark: how fast one agent pulls a blob from another over gRPC (the agent store's
// PullBlob -> ReadBlob path), next to a raw Node TCP socket on the same loopback.
//
//   npx tsx --conditions=source bench/streaming.ts [--insecure] [--size-mib 256] [--same-process]
//
// Two processes, as two agents would be: this one is the destination (and the controller that
// asks it to pull); a child process is the source agent (and, for the raw TCP run, the sender).
// mTLS by default with certificates from deploy/certs.sh; --insecure for plaintext gRPC.
// Each pull writes the blob to disk and verifies its sha256 (fsync off, as page-cache speed is
// what is compared); the TCP runs send the same number of bytes, once discarded, once written
// to a file and hashed like a pull does.
import { spawn } from "node:child_process";
import { createHash, randomFillSync } from "node:crypto";
import { once } from "node:events";
import { mkdtemp, open, rm } from "node:fs/promises";
import { createServer, connect as tcpConnect, type AddressInfo, type Socket } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import * as agentMessages from "@ferry/api/agent";
import { BlobKind, type BlobRef } from "@ferry/api/agent";
import { connect, exec, loadTls, serve, tlsFilesIn, type RunningServer, type Security } from "@ferry/common";
import { BlobStore, PEER_CHANNEL_OPTIONS, createStoreService, grpcPeerClients, storeServiceDefinition } from "@ferry/agent";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "..");
const MiB = 1024 * 1024;
const args = process.argv.slice(2);
const flag = (name: string): boolean => args.includes(name);
const value = (name: string, dflt: string): string => {
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] ? args[i + 1]! : dflt;
};
const sizeMiB = Number(value("--size-mib", "256"));
const size = sizeMiB * MiB;
const mbps = (bytes: number, ms: number): number => bytes / 1e6 / (ms / 1000);

function security(certDir: string | undefined, name: string): Security {
  return certDir ? { mode: "mtls", tls: loadTls(tlsFilesIn(certDir, name)) } : { mode: "insecure" };
}

async function startAgent(root: string, sec: Security, peerSec: Security): Promise<{ store: BlobStore; server: RunningServer }> {
  const store = new BlobStore({ root, fsync: false });
  const impl = createStoreService({ store, peerClient: grpcPeerClients(peerSec) });
  const server = await serve({
    address: "127.0.0.1:0",
    security: sec,
    services: [
      {
        name: "ferry.agent.v1.AgentService",
        definition: storeServiceDefinition,
        impl,
        access: { allow: ["controller"], methods: { readBlob: ["controller", "agent"] } },
      },
    ],
    protoFiles: ["ferry/agent/v1/agent.proto"],
    protoRoot: path.join(repo, "proto"),
  });
  return { store, server };
}

// ---------------------------------------------------------------------------------------------
// the source: an agent holding the blob, and a raw TCP sender

interface Source {
  grpcPort: number;
  tcpPort: number;
  ref: BlobRef;
  stop(): Promise<void>;
}

/** An agent holding a blob of `size` random bytes, and a raw TCP server sending as many. */
async function startSource(work: string, certDir: string | undefined): Promise<Source> {
  const sec = security(certDir, "src");
  const { store, server } = await startAgent(path.join(work, "src"), sec, sec);
  const file = path.join(work, "src-blob");
  const fh = await open(file, "w");
  const piece = Buffer.allocUnsafe(MiB);
  for (let i = 0; i < size / MiB; i++) await fh.write(randomFillSync(piece));
  await fh.close();
  // Random bytes, not an image (an image would be unpacked when stored).
  const ref = await store.importFile(file, BlobKind.BLOB_KIND_CHECKPOINT, { move: true });

  // Raw TCP: each connection gets `size` bytes from one reused buffer, with backpressure.
  const tcp = createServer((sock: Socket) => {
    void (async () => {
      const buf = Buffer.alloc(MiB, 7);
      for (let sent = 0; sent < size; sent += MiB) if (!sock.write(buf)) await once(sock, "drain");
      sock.end();
    })();
  });
  tcp.listen(0, "127.0.0.1");
  await once(tcp, "listening");
  return {
    grpcPort: server.port,
    tcpPort: (tcp.address() as AddressInfo).port,
    ref,
    stop: async () => {
      tcp.close();
      await server.close(500);
    },
  };
}

async function source(work: string, certDir: string | undefined): Promise<void> {
  const { stop, ...ports } = await startSource(work, certDir);
  process.stdout.write(JSON.stringify(ports) + "\n");
  process.stdin.resume();
  await once(process.stdin, "end");
  await stop();
}

// ---------------------------------------------------------------------------------------------
// the destination and the measurements

async function rawTcp(port: number, sink: "discard" | "file+sha256", dir: string): Promise<number> {
  const started = performance.now();
  const sock = tcpConnect(port, "127.0.0.1");
  let got = 0;
  if (sink === "discard") {
    for await (const b of sock) got += (b as Buffer).length;
  } else {
    const fh = await open(path.join(dir, `tcp-${Date.now()}`), "w");
    const hash = createHash("sha256");
    for await (const b of sock) {
      const w = fh.write(b as Buffer);
      hash.update(b as Buffer);
      await w;
      got += (b as Buffer).length;
    }
    hash.digest();
    await fh.close();
  }
  if (got !== size) throw new Error(`raw TCP received ${got} of ${size} bytes`);
  return mbps(size, performance.now() - started);
}

async function main(): Promise<void> {
  if (args[0] === "--role=source") return source(args[1]!, args[2] === "-" ? undefined : args[2]);

  const insecure = flag("--insecure");
  const work = await mkdtemp(path.join(tmpdir(), "ferry-bench-"));
  let child: ReturnType<typeof spawn> | undefined;
  try {
    let certDir: string | undefined;
    if (!insecure) {
      certDir = path.join(work, "certs");
      await exec(path.join(repo, "deploy/certs.sh"), [certDir, "controller:controller", "agent:src", "agent:dst"]);
    }
    const dst = await startAgent(path.join(work, "dst"), security(certDir, "dst"), security(certDir, "dst"));

    let src: { grpcPort: number; tcpPort: number; ref: BlobRef };
    let stopSource: () => Promise<void>;
    if (flag("--same-process")) {
      const started = await startSource(work, certDir);
      src = started;
      stopSource = started.stop;
    } else {
      child = spawn(
        process.execPath,
        [...process.execArgv, fileURLToPath(import.meta.url), "--role=source", work, certDir ?? "-", "--size-mib", String(sizeMiB)],
        {
          stdio: ["pipe", "pipe", "inherit"],
        },
      );
      const line = await new Promise<string>((resolve, reject) => {
        createInterface({ input: child!.stdout! }).once("line", resolve);
        child!.once("exit", (code) => reject(new Error(`source process exited with ${code}`)));
      });
      src = JSON.parse(line) as typeof src;
      stopSource = async () => {
        child!.stdin!.end();
        await once(child!, "exit");
      };
    }

    const controller = connect(storeServiceDefinition, agentMessages, {
      address: `127.0.0.1:${dst.server.port}`,
      security: security(certDir, "controller"),
      serverName: "dst",
      options: PEER_CHANNEL_OPTIONS,
    });
    const mode = insecure ? "insecure gRPC (plaintext)" : "mTLS gRPC (deploy/certs.sh)";
    console.log(
      `streaming ${sizeMiB} MiB on loopback, ${mode}, ${flag("--same-process") ? "one process" : "source in a child process"}, node ${process.version}`,
    );

    const results: Array<[string, number]> = [];
    for (const chunkMiB of [1, 2, 4]) {
      const runs: number[] = [];
      for (let rep = 0; rep < 3; rep++) {
        let stats;
        const t0 = performance.now();
        for await (const m of controller.pullBlob({
          blob: src.ref,
          sourceAddress: `127.0.0.1:${src.grpcPort}`,
          sourceServerName: "src",
          chunkBytes: chunkMiB * MiB,
        })) {
          if (m.done) stats = m.stats;
        }
        const wall = performance.now() - t0;
        if (!stats || stats.bytes !== size) throw new Error("pull did not complete");
        runs.push(mbps(size, wall));
        await controller.deleteBlob({ digest: src.ref.digest });
      }
      const best = Math.max(...runs);
      results.push([`gRPC PullBlob, ${chunkMiB} MiB chunks`, best]);
      console.log(`  gRPC PullBlob ${chunkMiB} MiB chunks: ${runs.map((r) => r.toFixed(0)).join(", ")} MB/s (best ${best.toFixed(0)})`);
    }
    for (const sink of ["discard", "file+sha256"] as const) {
      const runs: number[] = [];
      for (let rep = 0; rep < 3; rep++) runs.push(await rawTcp(src.tcpPort, sink, work));
      const best = Math.max(...runs);
      results.push([`raw TCP socket, ${sink}`, best]);
      console.log(`  raw TCP (${sink}): ${runs.map((r) => r.toFixed(0)).join(", ")} MB/s (best ${best.toFixed(0)})`);
    }
    const tcp = results.find(([n]) => n === "raw TCP socket, discard")![1];
    const tcpWork = results.find(([n]) => n === "raw TCP socket, file+sha256")![1];
    console.log("\nbest of 3 (MB = 10^6 bytes; each pull includes writing and sha256-verifying the blob):");
    for (const [name, v] of results) {
      console.log(
        `  ${name.padEnd(34)} ${v.toFixed(0).padStart(6)} MB/s   ${(v / tcp).toFixed(2)} x raw TCP   ${(v / tcpWork).toFixed(2)} x TCP+file+sha256`,
      );
    }
    controller.close();
    await stopSource();
    child = undefined;
    await dst.server.close(500);
  } finally {
    if (child && child.exitCode === null) child.kill("SIGKILL");
    await rm(work, { recursive: true, force: true });
  }
}

await main();
