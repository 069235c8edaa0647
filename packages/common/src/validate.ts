import { isIPv4 } from "node:net";
import path from "node:path";
import { FerryError } from "./errors.js";

const NAME = /^[a-z0-9][a-z0-9-]{0,30}$/;
const IMAGE_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const DIGEST = /^sha256:[0-9a-f]{64}$/;
const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
const OPERATION_KEY = /^[A-Za-z0-9._:/-]{0,200}$/;
const IFNAME = /^[a-z0-9][a-z0-9-]{0,14}$/;

/** A container, host or policy name: also used in paths, runc ids and namespace names. */
export function validateName(field: string, value: string): string {
  if (!NAME.test(value)) {
    throw FerryError.invalid(
      field,
      `"${value}" is not a valid name`,
      "use 1-31 characters: lowercase letters, digits and '-', starting with a letter or digit",
    );
  }
  return value;
}

export function validateImageName(field: string, value: string): string {
  if (!IMAGE_NAME.test(value)) {
    throw FerryError.invalid(
      field,
      `"${value}" is not a valid image name`,
      "use 1-63 characters: lowercase letters, digits, '.', '_' and '-', starting with a letter or digit",
    );
  }
  return value;
}

export function isDigest(value: string): boolean {
  return DIGEST.test(value);
}

export function validateDigest(field: string, value: string): string {
  if (!DIGEST.test(value)) {
    throw FerryError.invalid(field, `"${value}" is not a sha256 digest`, 'use "sha256:" followed by 64 lowercase hex digits');
  }
  return value;
}

export function validateInterfaceName(field: string, value: string): string {
  if (!IFNAME.test(value)) {
    throw FerryError.invalid(field, `"${value}" is not a valid interface name`, "use 1-15 lowercase letters, digits or '-'");
  }
  return value;
}

export function validateOperationKey(field: string, value: string): string {
  if (!OPERATION_KEY.test(value)) {
    throw FerryError.invalid(
      field,
      "operation key has characters outside [A-Za-z0-9._:/-] or is over 200 long",
      "send a key such as '<migration id>/<step>'",
    );
  }
  return value;
}

export interface Cidr {
  ip: string;
  prefix: number;
}

/** "10.77.0.10/24" → { ip, prefix }; the error names the field and the expected form. */
export function parseIpv4Cidr(field: string, value: string): Cidr {
  const m = /^(\d{1,3}(?:\.\d{1,3}){3})\/(\d{1,2})$/.exec(value);
  const prefix = m ? Number(m[2]) : NaN;
  if (!m || !isIPv4(m[1]!) || prefix < 1 || prefix > 32) {
    throw FerryError.invalid(
      field,
      `"${value}" is not an IPv4 address with a prefix length`,
      'write it as "A.B.C.D/N", e.g. "10.77.0.10/24"',
    );
  }
  return { ip: m[1]!, prefix };
}

export function validateIpv4(field: string, value: string): string {
  if (!isIPv4(value)) throw FerryError.invalid(field, `"${value}" is not an IPv4 address`, 'write it as "A.B.C.D"');
  return value;
}

export function validateMac(field: string, value: string): string {
  const v = value.toLowerCase();
  if (!MAC.test(v))
    throw FerryError.invalid(field, `"${value}" is not a MAC address`, 'write it as six hex pairs, e.g. "02:00:0a:4d:00:0a"');
  const first = parseInt(v.slice(0, 2), 16);
  if (first & 1)
    throw FerryError.invalid(
      field,
      `"${value}" is a multicast MAC address`,
      "use a unicast address (even first byte), e.g. starting with 02",
    );
  return v;
}

/** A locally administered MAC derived from an IPv4 address: 02:00:<four bytes of the IP>. */
export function macFromIp(ip: string): string {
  return ["02", "00", ...ip.split(".").map((o) => Number(o).toString(16).padStart(2, "0"))].join(":");
}

/**
 * Join untrusted parts under a root and refuse anything that escapes it (`..`, absolute parts,
 * symlink-free lexical check). Callers validate the parts' shape first; this is the last guard.
 */
export function safeJoin(root: string, ...parts: string[]): string {
  const base = path.resolve(root);
  const full = path.resolve(base, ...parts);
  if (full !== base && !full.startsWith(base + path.sep)) {
    throw new FerryError("InvalidArgument", `path escapes ${base}: ${parts.join("/")}`, { fix: "use a plain name without '/' or '..'" });
  }
  return full;
}

/** A size such as "256m", "1g", "512Mi", "1048576" in bytes. */
export function parseSize(field: string, value: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?$/i.exec(value.trim());
  if (!m) throw FerryError.invalid(field, `"${value}" is not a size`, 'write a number of bytes or use a suffix: "256m", "1g", "512Mi"');
  const mult = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[m[2]!.toLowerCase()] ?? 1;
  return Math.round(Number(m[1]) * mult);
}
