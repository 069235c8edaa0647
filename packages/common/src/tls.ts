import { readFileSync } from "node:fs";
import { ServerCredentials, credentials, type ChannelCredentials, type ChannelOptions } from "@grpc/grpc-js";
import { FerryError } from "./errors.js";

/** A role is the OU of a certificate issued by Ferry's CA (deploy/certs.sh). */
export type Role = "controller" | "agent" | "admin";

export interface TlsFiles {
  /** The CA that signed every Ferry certificate. */
  ca: string;
  cert: string;
  key: string;
}

export interface TlsMaterial {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

/**
 * Either mTLS material, or the explicit choice of no security at all. There is no default:
 * every process must say which, and insecure only behind a flag named `--insecure`.
 */
export type Security = { mode: "mtls"; tls: TlsMaterial } | { mode: "insecure" };

export function loadTls(files: TlsFiles): TlsMaterial {
  const read = (what: keyof TlsFiles): Buffer => {
    try {
      return readFileSync(files[what]);
    } catch (e) {
      throw new FerryError("FailedPrecondition", `cannot read the TLS ${what} file ${files[what]}: ${(e as Error).message}`, {
        field: what,
        fix: "create certificates with `make certs` (deploy/certs.sh) or pass --insecure for a local experiment",
      });
    }
  };
  return { ca: read("ca"), cert: read("cert"), key: read("key") };
}

/** Files of a named identity in a certificate directory made by deploy/certs.sh. */
export function tlsFilesIn(dir: string, name: string): TlsFiles {
  return { ca: `${dir}/ca.crt`, cert: `${dir}/${name}.crt`, key: `${dir}/${name}.key` };
}

/** Server credentials that require a client certificate signed by the CA. */
export function serverCredentials(sec: Security): ServerCredentials {
  if (sec.mode === "insecure") return ServerCredentials.createInsecure();
  return ServerCredentials.createSsl(sec.tls.ca, [{ private_key: sec.tls.key, cert_chain: sec.tls.cert }], true);
}

export function channelCredentials(sec: Security): ChannelCredentials {
  if (sec.mode === "insecure") return credentials.createInsecure();
  return credentials.createSsl(sec.tls.ca, sec.tls.key, sec.tls.cert);
}

/** Channel options for talking to a server whose certificate is issued for `serverName`. */
export function channelOptions(serverName: string | undefined, extra: ChannelOptions = {}): ChannelOptions {
  return {
    ...(serverName ? { "grpc.ssl_target_name_override": serverName, "grpc.default_authority": serverName } : {}),
    "grpc.max_receive_message_length": 16 * 1024 * 1024,
    "grpc.max_send_message_length": 16 * 1024 * 1024,
    "grpc.keepalive_time_ms": 20_000,
    "grpc.keepalive_timeout_ms": 10_000,
    ...extra,
  };
}
