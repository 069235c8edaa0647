import { describe, expect, it } from "vitest";
import { type FerryError } from "./errors.js";
import { macFromIp, parseIpv4Cidr, parseSize, safeJoin, validateDigest, validateMac, validateName } from "./validate.js";

function refused(fn: () => unknown): FerryError {
  try {
    fn();
  } catch (e) {
    return e as FerryError;
  }
  throw new Error("expected a refusal");
}

describe("validation", () => {
  it("accepts good names and refuses traversal, case and length", () => {
    expect(validateName("name", "web-1")).toBe("web-1");
    for (const bad of ["../etc", "Web", "", "-x", "a/b", "a".repeat(32), "a b"]) {
      const e = refused(() => validateName("spec.name", bad));
      expect(e.code).toBe("InvalidArgument");
      expect(e.field).toBe("spec.name");
      expect(e.fix).toMatch(/lowercase/);
    }
  });

  it("parses CIDRs and refuses junk with the expected form in the fix", () => {
    expect(parseIpv4Cidr("ip", "10.77.0.10/24")).toEqual({ ip: "10.77.0.10", prefix: 24 });
    for (const bad of ["10.77.0.10", "10.77.0.300/24", "10.77.0.1/33", "x/24"]) {
      expect(refused(() => parseIpv4Cidr("spec.network.ip_cidr", bad)).fix).toContain("A.B.C.D/N");
    }
  });

  it("checks MACs and digests", () => {
    expect(validateMac("mac", "02:00:0A:4D:00:0A")).toBe("02:00:0a:4d:00:0a");
    expect(refused(() => validateMac("mac", "01:00:00:00:00:01")).message).toContain("multicast");
    expect(macFromIp("10.77.0.10")).toBe("02:00:0a:4d:00:0a");
    expect(validateDigest("d", "sha256:" + "a".repeat(64))).toBeTruthy();
    expect(refused(() => validateDigest("d", "sha256:../../x")).code).toBe("InvalidArgument");
  });

  it("safeJoin refuses paths that escape the root", () => {
    expect(safeJoin("/var/lib/ferry", "containers", "web")).toBe("/var/lib/ferry/containers/web");
    expect(refused(() => safeJoin("/var/lib/ferry", "..", "etc")).code).toBe("InvalidArgument");
    expect(refused(() => safeJoin("/var/lib/ferry", "/etc/passwd")).code).toBe("InvalidArgument");
  });

  it("parses sizes", () => {
    expect(parseSize("memory", "256m")).toBe(256 * 1024 * 1024);
    expect(parseSize("memory", "1G")).toBe(1024 ** 3);
    expect(parseSize("memory", "512Mi")).toBe(512 * 1024 * 1024);
    expect(parseSize("memory", "4096")).toBe(4096);
    expect(refused(() => parseSize("memory", "lots")).field).toBe("memory");
  });
});
