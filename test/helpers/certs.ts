import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { exec, loadTls, tlsFilesIn, type Security } from "@ferry/common";

export const REPO = path.resolve(import.meta.dirname, "../..");

/** A throwaway certificate directory made by the project's own deploy/certs.sh. */
export interface TestPki {
  dir: string;
  security(name: string): Security;
  cleanup(): Promise<void>;
}

export async function makePki(identities: string[]): Promise<TestPki> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "ferry-pki-"));
  await exec("bash", [path.join(REPO, "deploy/certs.sh"), dir, ...identities]);
  return {
    dir,
    security: (name) => ({ mode: "mtls", tls: loadTls(tlsFilesIn(dir, name)) }),
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}
