import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import {
  BlobKind,
  type BlobRef,
  type PushBlobRequest,
  type PushBlobResponse,
  type TagImageRequest,
  type TagImageResponse,
} from "@ferry/api/agent";
import type { DeepPartial } from "@ferry/common";

/** What pushing an image needs of an agent client. */
export interface ImagePushTarget {
  pushBlob(reqs: AsyncIterable<DeepPartial<PushBlobRequest>>): Promise<PushBlobResponse>;
  tagImage(req: DeepPartial<TagImageRequest>): Promise<TagImageResponse>;
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash("sha256");
  for await (const c of createReadStream(file)) h.update(c as Buffer);
  return `sha256:${h.digest("hex")}`;
}

/** Upload a root-filesystem tar to an agent in 1 MiB chunks and name it. */
export async function pushImage(client: ImagePushTarget, tar: string, name: string): Promise<BlobRef> {
  const ref: BlobRef = { digest: await sha256File(tar), sizeBytes: (await stat(tar)).size, kind: BlobKind.BLOB_KIND_IMAGE };
  await client.pushBlob(
    (async function* () {
      yield { msg: { $case: "header" as const, value: ref }, offset: 0 };
      for await (const c of createReadStream(tar, { highWaterMark: 1 << 20 }))
        yield { msg: { $case: "chunk" as const, value: c as Buffer } };
    })(),
  );
  await client.tagImage({ name, digest: ref.digest });
  return ref;
}
