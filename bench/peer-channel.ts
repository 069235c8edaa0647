// A small pull (a 256 KiB blob: a checkpoint's size order) over mTLS on loopback, two ways,
// interleaved: a fresh channel per pull (what each pull used to open) and one kept channel.
// Prints the median time of each and the ratio.   npx tsx --conditions=source bench/peer-channel.ts
import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import * as agentApi from "@ferry/api/agent";
import { PROTO_ROOT } from "@ferry/api/proto-root";
import { BlobKind } from "@ferry/api/agent";
import {
  BlobStore,
  PEER_CHANNEL_OPTIONS,
  agentServiceDefinition,
  createStoreService,
  grpcPeerClients,
  storeServiceDefinition,
} from "@ferry/agent";
import { connect, exec, loadTls, serve, tlsFilesIn, type Security } from "@ferry/common";

const dir = await mkdtemp(path.join(os.tmpdir(), "ferry-peer-"));
try {
  await exec("bash", [path.join(import.meta.dirname, "../deploy/certs.sh"), `${dir}/certs`, "agent:src", "agent:dst"]);
  const sec = (n: string): Security => ({ mode: "mtls", tls: loadTls(tlsFilesIn(`${dir}/certs`, n)) });
  const store = new BlobStore({ root: `${dir}/src`, fsync: false });
  await store.init();
  const file = `${dir}/blob`;
  await writeFile(file, randomBytes(256 * 1024));
  const ref = await store.importFile(file, BlobKind.BLOB_KIND_CHECKPOINT);
  const server = await serve({
    address: "127.0.0.1:0",
    security: sec("src"),
    services: [
      {
        name: "ferry.agent.v1.AgentService",
        definition: storeServiceDefinition,
        impl: createStoreService({ store, peerClient: grpcPeerClients(sec("src")) }),
        access: { allow: ["agent"] },
      },
    ],
    protoFiles: ["ferry/agent/v1/agent.proto"],
    protoRoot: PROTO_ROOT,
  });
  const address = `127.0.0.1:${server.port}`;
  const pull = async (c: { readBlob: (r: object) => AsyncIterable<unknown> }): Promise<number> => {
    const t = performance.now();
    for await (const _ of c.readBlob({ digest: ref.digest, chunkBytes: 1 << 20 }));
    return performance.now() - t;
  };
  const kept = grpcPeerClients(sec("dst"))(address, "src");
  await pull(kept); // warm: the first pull of both ways opens a channel
  const fresh: number[] = [];
  const warm: number[] = [];
  for (let i = 0; i < 30; i++) {
    const c = connect(agentServiceDefinition, agentApi as unknown as Record<string, unknown>, {
      address,
      security: sec("dst"),
      serverName: "src",
      options: PEER_CHANNEL_OPTIONS,
    });
    fresh.push(await pull(c));
    c.close();
    warm.push(await pull(kept));
  }
  const med = (x: number[]): number => [...x].sort((a, b) => a - b)[Math.floor((x.length - 1) / 2)]!;
  console.log(
    JSON.stringify({
      pulls: 30,
      fresh_channel_ms: +med(fresh).toFixed(1),
      kept_channel_ms: +med(warm).toFixed(1),
      ratio: +(med(warm) / med(fresh)).toFixed(2),
    }),
  );
  await server.close();
} finally {
  await rm(dir, { recursive: true, force: true });
}
