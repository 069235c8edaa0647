import { FerryError } from "@ferry/common";

/**
 * CRIU's `stats-dump` / `stats-restore` files, decoded without `crit` (which is not installed).
 *
 * Layout (criu/include/magic.h, criu/protobuf.c, images/stats.proto):
 *   u32 LE IMG_SERVICE_MAGIC (0x55105940) | u32 LE STATS_MAGIC (0x57093306)
 *   | u32 LE size | StatsEntry protobuf (size bytes)
 * StatsEntry { optional DumpStatsEntry dump = 1; optional RestoreStatsEntry restore = 2; }
 * Times are in microseconds.
 */
export const IMG_SERVICE_MAGIC = 0x55105940;
export const STATS_MAGIC = 0x57093306;

/** images/stats.proto dump_stats_entry (times in µs). */
export interface DumpStats {
  freezingTimeUs: number;
  frozenTimeUs: number;
  memdumpTimeUs: number;
  memwriteTimeUs: number;
  pagesScanned: number;
  pagesSkippedParent: number;
  pagesWritten: number;
  pagesLazy: number;
}

/** images/stats.proto restore_stats_entry (times in µs). */
export interface RestoreStats {
  pagesCompared: number;
  pagesSkippedCow: number;
  forkingTimeUs: number;
  restoreTimeUs: number;
  pagesRestored: number;
}

export interface StatsEntry {
  dump?: DumpStats;
  restore?: RestoreStats;
}

/** A minimal protobuf reader: varints and length-delimited fields are all stats.proto uses. */
class PbReader {
  pos = 0;
  constructor(private readonly buf: Uint8Array) {}

  get done(): boolean {
    return this.pos >= this.buf.length;
  }

  varint(): number {
    // Values fit in 53 bits (page counts, µs), so plain arithmetic is exact.
    let result = 0;
    let mul = 1;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.buf.length) throw new Error("truncated varint");
      const b = this.buf[this.pos++]!;
      result += (b & 0x7f) * mul;
      if ((b & 0x80) === 0) return result;
      mul *= 128;
    }
    throw new Error("varint longer than 10 bytes");
  }

  bytes(): Uint8Array {
    const len = this.varint();
    if (this.pos + len > this.buf.length) throw new Error("truncated length-delimited field");
    const out = this.buf.subarray(this.pos, this.pos + len);
    this.pos += len;
    return out;
  }

  skip(wireType: number): void {
    if (wireType === 0) this.varint();
    else if (wireType === 1) this.pos += 8;
    else if (wireType === 2) this.bytes();
    else if (wireType === 5) this.pos += 4;
    else throw new Error(`unsupported wire type ${wireType}`);
  }

  /** Calls `onField(number, value)` for varint fields and `onBytes` for length-delimited ones. */
  fields(onVarint: (field: number, v: number) => void, onBytes?: (field: number, b: Uint8Array) => void): void {
    while (!this.done) {
      const key = this.varint();
      const field = Math.floor(key / 8);
      const wire = key & 7;
      if (wire === 0) onVarint(field, this.varint());
      else if (wire === 2 && onBytes) onBytes(field, this.bytes());
      else this.skip(wire);
    }
  }
}

function decodeDump(b: Uint8Array): DumpStats {
  const d: DumpStats = {
    freezingTimeUs: 0,
    frozenTimeUs: 0,
    memdumpTimeUs: 0,
    memwriteTimeUs: 0,
    pagesScanned: 0,
    pagesSkippedParent: 0,
    pagesWritten: 0,
    pagesLazy: 0,
  };
  new PbReader(b).fields((f, v) => {
    if (f === 1) d.freezingTimeUs = v;
    else if (f === 2) d.frozenTimeUs = v;
    else if (f === 3) d.memdumpTimeUs = v;
    else if (f === 4) d.memwriteTimeUs = v;
    else if (f === 5) d.pagesScanned = v;
    else if (f === 6) d.pagesSkippedParent = v;
    else if (f === 7) d.pagesWritten = v;
    else if (f === 9) d.pagesLazy = v;
  });
  return d;
}

function decodeRestore(b: Uint8Array): RestoreStats {
  const r: RestoreStats = { pagesCompared: 0, pagesSkippedCow: 0, forkingTimeUs: 0, restoreTimeUs: 0, pagesRestored: 0 };
  new PbReader(b).fields((f, v) => {
    if (f === 1) r.pagesCompared = v;
    else if (f === 2) r.pagesSkippedCow = v;
    else if (f === 3) r.forkingTimeUs = v;
    else if (f === 4) r.restoreTimeUs = v;
    else if (f === 5) r.pagesRestored = v;
  });
  return r;
}

/** Decode a whole `stats-dump` or `stats-restore` file. Throws FerryError(DataLoss) on bad input. */
export function parseCriuStats(file: Uint8Array, what = "stats file"): StatsEntry {
  try {
    if (file.length < 12) throw new Error(`only ${file.length} bytes`);
    const dv = new DataView(file.buffer, file.byteOffset, file.byteLength);
    const m0 = dv.getUint32(0, true);
    const m1 = dv.getUint32(4, true);
    if (m0 !== IMG_SERVICE_MAGIC || m1 !== STATS_MAGIC) {
      throw new Error(`bad magic 0x${m0.toString(16)} 0x${m1.toString(16)}`);
    }
    const size = dv.getUint32(8, true);
    if (12 + size > file.length) throw new Error(`entry of ${size} bytes overruns the file`);
    const entry: StatsEntry = {};
    new PbReader(file.subarray(12, 12 + size)).fields(
      () => undefined,
      (f, b) => {
        if (f === 1) entry.dump = decodeDump(b);
        else if (f === 2) entry.restore = decodeRestore(b);
      },
    );
    return entry;
  } catch (e) {
    throw new FerryError("DataLoss", `cannot decode CRIU ${what}: ${(e as Error).message}`, { cause: e });
  }
}

/** Encode a StatsEntry like CRIU does; used by tests to build fixtures. */
export function encodeCriuStats(entry: StatsEntry): Uint8Array {
  const varint = (v: number): number[] => {
    const out: number[] = [];
    do {
      let b = v % 128;
      v = Math.floor(v / 128);
      if (v > 0) b |= 0x80;
      out.push(b);
    } while (v > 0);
    return out;
  };
  const field = (n: number, v: number): number[] => [...varint(n * 8), ...varint(v)];
  const msg = (n: number, body: number[]): number[] => [...varint(n * 8 + 2), ...varint(body.length), ...body];
  let body: number[] = [];
  if (entry.dump) {
    const d = entry.dump;
    body = body.concat(
      msg(1, [
        ...field(1, d.freezingTimeUs),
        ...field(2, d.frozenTimeUs),
        ...field(3, d.memdumpTimeUs),
        ...field(4, d.memwriteTimeUs),
        ...field(5, d.pagesScanned),
        ...field(6, d.pagesSkippedParent),
        ...field(7, d.pagesWritten),
        ...field(9, d.pagesLazy),
      ]),
    );
  }
  if (entry.restore) {
    const r = entry.restore;
    body = body.concat(
      msg(2, [
        ...field(1, r.pagesCompared),
        ...field(2, r.pagesSkippedCow),
        ...field(3, r.forkingTimeUs),
        ...field(4, r.restoreTimeUs),
        ...field(5, r.pagesRestored),
      ]),
    );
  }
  const out = new Uint8Array(12 + body.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, IMG_SERVICE_MAGIC, true);
  dv.setUint32(4, STATS_MAGIC, true);
  dv.setUint32(8, body.length, true);
  out.set(body, 12);
  return out;
}
