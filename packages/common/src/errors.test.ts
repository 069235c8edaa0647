import { Metadata, status } from "@grpc/grpc-js";
import { describe, expect, it } from "vitest";
import { FerryError, RETRYABLE_CODES, asFerryError, fromServiceError, toServiceError, type ErrorCode } from "./errors.js";

const expected: [ErrorCode, status][] = [
  ["NotFound", status.NOT_FOUND],
  ["AlreadyExists", status.ALREADY_EXISTS],
  ["InvalidArgument", status.INVALID_ARGUMENT],
  ["FailedPrecondition", status.FAILED_PRECONDITION],
  ["ResourceExhausted", status.RESOURCE_EXHAUSTED],
  ["Aborted", status.ABORTED],
  ["Unavailable", status.UNAVAILABLE],
  ["DataLoss", status.DATA_LOSS],
  ["DeadlineExceeded", status.DEADLINE_EXCEEDED],
  ["Cancelled", status.CANCELLED],
  ["PermissionDenied", status.PERMISSION_DENIED],
  ["Unauthenticated", status.UNAUTHENTICATED],
  ["Internal", status.INTERNAL],
];

describe("error mapping", () => {
  it.each(expected)("%s maps to gRPC status %i and back", (code, grpcStatus) => {
    const se = toServiceError(new FerryError(code, "boom"));
    expect(se.code).toBe(grpcStatus);
    const back = fromServiceError({ ...se, message: se.details });
    expect(back.code).toBe(code);
  });

  it("every code maps to a distinct status", () => {
    expect(new Set(expected.map(([, s]) => s)).size).toBe(expected.length);
  });

  it("keeps the field, the fix and structured data across the wire", () => {
    const e = new FerryError("ResourceExhausted", "destination edge-b lacks memory: needs 512 MiB, 100 MiB free", {
      field: "destination",
      fix: "pick another host",
      data: { need: 512, free: 100 },
    });
    const se = toServiceError(e);
    expect(se.details).toContain("needs 512 MiB");
    expect(se.details).toContain("fix: pick another host");
    const back = fromServiceError(se);
    expect(back.field).toBe("destination");
    expect(back.data).toEqual({ need: 512, free: 100 });
    expect(back.message).toBe(se.details);
  });

  it("invalid() names the field in the message", () => {
    const e = FerryError.invalid("spec.name", "bad", "use lowercase");
    expect(toServiceError(e).details).toBe("spec.name: bad (fix: use lowercase)");
  });

  it("turns an unknown throw into Internal with its message, never a stack", () => {
    const se = toServiceError(new TypeError("x is undefined"));
    expect(se.code).toBe(status.INTERNAL);
    expect(se.details).toBe("x is undefined");
    expect(asFerryError("plain string").code).toBe("Internal");
  });

  it("reads a status from a server that is not Ferry (no details trailer)", () => {
    const back = fromServiceError({ code: status.UNAVAILABLE, details: "connection refused", metadata: new Metadata() });
    expect(back.code).toBe("Unavailable");
    expect(back.retryable).toBe(true);
  });

  it("only Unavailable, Aborted and DeadlineExceeded are retryable", () => {
    expect([...RETRYABLE_CODES].sort()).toEqual(["Aborted", "DeadlineExceeded", "Unavailable"]);
    expect(new FerryError("InvalidArgument", "x").retryable).toBe(false);
    expect(new FerryError("DataLoss", "x").retryable).toBe(false);
  });
});
