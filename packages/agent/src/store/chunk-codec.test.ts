import { randomBytes } from "node:crypto";
import { BinaryWriter } from "@bufbuild/protobuf/wire";
import { describe, expect, it } from "vitest";
import { ReadBlobResponse } from "@ferry/api/agent";
import { ChunkPacer, decodeReadBlobResponse, encodeReadBlobResponse } from "./chunk-codec.js";

describe("ReadBlobResponse lean codec", () => {
  const cases = [
    { data: randomBytes(1 << 20), offset: 0 },
    { data: randomBytes(4 << 20), offset: 3 * 2 ** 32 + 17 }, // above 32 bits
    { data: Buffer.alloc(0), offset: 123 },
    { data: Buffer.alloc(0), offset: 0 },
    { data: randomBytes(200), offset: Number.MAX_SAFE_INTEGER },
  ];

  it.each(cases.map((c, i) => [i, c] as const))("is wire-compatible with the generated codec (case %i)", (_, msg) => {
    const lean = encodeReadBlobResponse({ ...msg });
    const decodedByGenerated = ReadBlobResponse.decode(lean);
    expect(decodedByGenerated.offset).toBe(msg.offset);
    expect(Buffer.compare(decodedByGenerated.data, msg.data)).toBe(0);

    const generated = Buffer.from(ReadBlobResponse.encode(msg).finish());
    const decodedByLean = decodeReadBlobResponse(generated);
    expect(decodedByLean.offset).toBe(msg.offset);
    expect(Buffer.compare(decodedByLean.data, msg.data)).toBe(0);
    expect(lean.length).toBe(generated.length);
  });

  it("skips unknown fields (a newer peer may add some)", () => {
    const w = new BinaryWriter();
    w.uint32((7 << 3) | 2).bytes(Buffer.from("future"));
    w.uint32((1 << 3) | 2).bytes(Buffer.from("abc"));
    w.uint32((8 << 3) | 0).uint64(99);
    w.uint32((9 << 3) | 5).fixed32(1);
    w.uint32((10 << 3) | 1).fixed64(1);
    w.uint32((2 << 3) | 0).uint64(42);
    const m = decodeReadBlobResponse(Buffer.from(w.finish()));
    expect(m.data.toString()).toBe("abc");
    expect(m.offset).toBe(42);
  });

  it("rejects a truncated message", () => {
    const full = encodeReadBlobResponse({ data: Buffer.from("hello"), offset: 5 });
    expect(() => decodeReadBlobResponse(full.subarray(0, full.length - 2))).toThrow(/runs past/);
  });
});

describe("ChunkPacer", () => {
  it("holds a producer until the serializer has taken chunks, and lets it go on abort", async () => {
    const pacer = new ChunkPacer(2, 10_000);
    const ac = new AbortController();
    const a = pacer.track({ data: Buffer.from("a"), offset: 0 });
    pacer.track({ data: Buffer.from("b"), offset: 1 });
    let released = false;
    const waiting = pacer.ready(ac.signal).then(() => (released = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(released).toBe(false);
    encodeReadBlobResponse(a); // grpc-js serializes the first chunk
    await waiting;
    expect(released).toBe(true);

    pacer.track({ data: Buffer.from("c"), offset: 2 });
    const held = pacer.ready(ac.signal);
    ac.abort();
    await held; // resolves: the stream is over
  });

  it("switches itself off when chunks are never serialized by the lean codec", async () => {
    const pacer = new ChunkPacer(1, 30);
    pacer.track({ data: Buffer.from("a"), offset: 0 });
    const t0 = performance.now();
    await pacer.ready(new AbortController().signal);
    pacer.track({ data: Buffer.from("b"), offset: 1 });
    await pacer.ready(new AbortController().signal); // no second wait
    expect(performance.now() - t0).toBeLessThan(1000);
  });
});
