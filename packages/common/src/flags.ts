import { FerryError } from "./errors.js";
import { loadTls, tlsFilesIn, type Security } from "./tls.js";

/**
 * Security from a process's flags: `--tls-dir DIR` (+ `--tls-name NAME`, the certificate to
 * present) for mTLS, or the explicit `--insecure` for a local experiment. Neither is an error:
 * Ferry never falls back to plaintext on its own.
 */
export function securityFromFlags(flags: { "tls-dir"?: string; "tls-name"?: string; insecure?: boolean }, defaultName: string): Security {
  if (flags.insecure) {
    if (flags["tls-dir"]) throw FerryError.invalid("--insecure", "cannot be combined with --tls-dir", "choose one");
    return { mode: "insecure" };
  }
  const dir = flags["tls-dir"];
  if (!dir) {
    throw FerryError.invalid(
      "--tls-dir",
      "no TLS material given",
      "pass --tls-dir DIR (certificates from `make certs`), or --insecure for a local experiment",
    );
  }
  return { mode: "mtls", tls: loadTls(tlsFilesIn(dir, flags["tls-name"] ?? defaultName)) };
}
