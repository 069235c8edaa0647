import type { ReadBlobResponse } from "@ferry/api/agent";
import { FerryError } from "@ferry/common";

// A hand-written protobuf codec for ReadBlobResponse { bytes data = 1; uint64 offset = 2; }.
// ts-proto's BinaryWriter copies a bytes field several times per message; this one copies the
// chunk once on encode and never on decode (the data is a view of the received message), which
// roughly doubles streaming throughput. Wire-compatible with any protobuf implementation: fields
// may come in any order, and unknown fields are skipped.

const MAX_VARINT_BYTES = 10;

function writeVarint(buf: Buffer, pos: number, value: number): number {
  // Numbers up to 2^53 only (sizes and offsets); division instead of bit ops, which are 32-bit.
  let v = value;
  while (v >= 0x80) {
    buf[pos++] = (v % 0x80) | 0x80;
    v = Math.floor(v / 0x80);
  }
  buf[pos++] = v;
  return pos;
}

function readVarint(buf: Uint8Array, pos: number): [value: number, next: number] {
  let value = 0;
  let mult = 1;
  for (let i = 0; i < MAX_VARINT_BYTES; i++) {
    const b = buf[pos++];
    if (b === undefined) throw new FerryError("DataLoss", "ReadBlobResponse: truncated varint");
    value += (b & 0x7f) * mult;
    if (b < 0x80) return [value, pos];
    mult *= 0x80;
  }
  throw new FerryError("DataLoss", "ReadBlobResponse: varint longer than 10 bytes");
}

/**
 * A callback a chunk may carry, called when grpc-js serializes it. grpc-js serializes a server
 * stream's message only once the previous one was written to the socket, so this tells a
 * producer how many chunks are really queued (see {@link ChunkPacer}).
 */
export const ON_SERIALIZE: unique symbol = Symbol("ferry.onSerialize");
export type PacedChunk = ReadBlobResponse & { [ON_SERIALIZE]?: () => void };

/** Encode a chunk: `offset` first (when not 0), then `data`, in one buffer with one copy of the data. */
export function encodeReadBlobResponse(msg: PacedChunk): Buffer {
  msg[ON_SERIALIZE]?.();
  const data = msg.data;
  const head = Buffer.allocUnsafe(2 + 2 * MAX_VARINT_BYTES);
  let p = 0;
  if (msg.offset !== 0) {
    head[p++] = 0x10; // field 2, varint
    p = writeVarint(head, p, msg.offset);
  }
  if (data.length !== 0) {
    head[p++] = 0x0a; // field 1, length-delimited
    p = writeVarint(head, p, data.length);
  }
  const out = Buffer.allocUnsafe(p + data.length);
  head.copy(out, 0, 0, p);
  if (data.length !== 0) out.set(data, p);
  return out;
}

/** Decode a chunk without copying its data (a view of `buf`). */
export function decodeReadBlobResponse(buf: Buffer): ReadBlobResponse {
  let data: Buffer = Buffer.alloc(0);
  let offset = 0;
  let p = 0;
  while (p < buf.length) {
    let tag: number;
    [tag, p] = readVarint(buf, p);
    const field = Math.floor(tag / 8);
    const wire = tag & 7;
    if (field === 1 && wire === 2) {
      let len: number;
      [len, p] = readVarint(buf, p);
      if (p + len > buf.length) throw new FerryError("DataLoss", "ReadBlobResponse: data field runs past the message");
      data = buf.subarray(p, p + len);
      p += len;
    } else if (field === 2 && wire === 0) {
      [offset, p] = readVarint(buf, p);
    } else if (wire === 0) {
      [, p] = readVarint(buf, p);
    } else if (wire === 1) {
      p += 8;
    } else if (wire === 5) {
      p += 4;
    } else if (wire === 2) {
      let len: number;
      [len, p] = readVarint(buf, p);
      p += len;
    } else {
      throw new FerryError("DataLoss", `ReadBlobResponse: unsupported wire type ${wire} for field ${field}`);
    }
  }
  if (p > buf.length) throw new FerryError("DataLoss", "ReadBlobResponse: truncated message");
  return { data, offset };
}

/**
 * Bounds how many chunks a server stream has queued but not yet sent. grpc-js's server stream
 * buffers up to 16 messages before it signals backpressure (16 x 4 MiB per transfer); with the
 * pacer a producer waits until at most `max` chunks are ahead of the socket. When the serializer
 * turns out not to be {@link encodeReadBlobResponse} (no callback ever arrives), pacing switches
 * itself off after `fallbackMs` rather than stalling the stream.
 */
export class ChunkPacer {
  private outstanding = 0;
  private seen = false;
  private disabled = false;
  private wake: (() => void) | undefined;

  constructor(
    private readonly max = 2,
    private readonly fallbackMs = 1000,
  ) {}

  /** Tag a chunk so that its serialization is counted. */
  track(chunk: ReadBlobResponse): PacedChunk {
    this.outstanding++;
    return Object.assign(chunk, {
      [ON_SERIALIZE]: () => {
        this.seen = true;
        this.outstanding--;
        this.wake?.();
      },
    });
  }

  /** Resolve when fewer than `max` chunks are queued, or when `signal` aborts. */
  async ready(signal: AbortSignal): Promise<void> {
    while (!this.disabled && this.outstanding >= this.max && !signal.aborted) {
      const timedOut = await new Promise<boolean>((resolve) => {
        const onAbort = (): void => finish(false);
        const timer = this.seen ? undefined : setTimeout(() => finish(true), this.fallbackMs);
        const finish = (t: boolean): void => {
          if (timer) clearTimeout(timer);
          signal.removeEventListener("abort", onAbort);
          this.wake = undefined;
          resolve(t);
        };
        this.wake = () => finish(false);
        signal.addEventListener("abort", onAbort, { once: true });
      });
      if (timedOut) this.disabled = true;
    }
  }
}
