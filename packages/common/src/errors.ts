import { Metadata, status, type ServiceError } from "@grpc/grpc-js";

/**
 * The closed set of error codes Ferry uses everywhere. Each maps to exactly one gRPC status
 * code, in {@link toServiceError}; nothing else in the code base picks a status code.
 */
export type ErrorCode =
  | "NotFound"
  | "AlreadyExists"
  | "InvalidArgument"
  | "FailedPrecondition"
  | "ResourceExhausted"
  | "Aborted"
  | "Unavailable"
  | "DataLoss"
  | "DeadlineExceeded"
  | "Cancelled"
  | "PermissionDenied"
  | "Unauthenticated"
  | "Internal";

const toStatus: Record<ErrorCode, status> = {
  NotFound: status.NOT_FOUND,
  AlreadyExists: status.ALREADY_EXISTS,
  InvalidArgument: status.INVALID_ARGUMENT,
  FailedPrecondition: status.FAILED_PRECONDITION,
  ResourceExhausted: status.RESOURCE_EXHAUSTED,
  Aborted: status.ABORTED,
  Unavailable: status.UNAVAILABLE,
  DataLoss: status.DATA_LOSS,
  DeadlineExceeded: status.DEADLINE_EXCEEDED,
  Cancelled: status.CANCELLED,
  PermissionDenied: status.PERMISSION_DENIED,
  Unauthenticated: status.UNAUTHENTICATED,
  Internal: status.INTERNAL,
};

const fromStatus = new Map<number, ErrorCode>(Object.entries(toStatus).map(([code, s]) => [s, code as ErrorCode]));

/** Codes a caller may retry with the same operation key; everything else is final. */
export const RETRYABLE_CODES: ReadonlySet<ErrorCode> = new Set(["Unavailable", "Aborted", "DeadlineExceeded"]);

export interface ErrorDetails {
  /** The request field at fault, e.g. "spec.network.ip_cidr". */
  field?: string;
  /** What to do about it, e.g. "use a name of 1-31 lowercase letters, digits or '-'". */
  fix?: string;
  /** Extra structured data (resource needs, stderr...), carried in trailers as JSON. */
  data?: Record<string, unknown>;
  cause?: unknown;
}

/** The one error type of Ferry: a code from the closed set, a message for people, details for code. */
export class FerryError extends Error {
  readonly code: ErrorCode;
  readonly field: string | undefined;
  readonly fix: string | undefined;
  readonly data: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, details: ErrorDetails = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = "FerryError";
    this.code = code;
    this.field = details.field;
    this.fix = details.fix;
    this.data = details.data;
  }

  get retryable(): boolean {
    return RETRYABLE_CODES.has(this.code);
  }

  /** The message with the field and the fix, as a person should read it. */
  get fullMessage(): string {
    let m = this.message;
    if (this.field && !m.includes(this.field)) m = `${this.field}: ${m}`;
    if (this.fix) m += ` (fix: ${this.fix})`;
    return m;
  }

  static invalid(field: string, message: string, fix?: string): FerryError {
    return new FerryError("InvalidArgument", `${field}: ${message}`, { field, ...(fix ? { fix } : {}) });
  }

  static notFound(what: string, name: string, fix?: string): FerryError {
    return new FerryError("NotFound", `${what} "${name}" not found`, fix ? { fix } : {});
  }
}

export function isFerryError(e: unknown, code?: ErrorCode): e is FerryError {
  return e instanceof FerryError && (code === undefined || e.code === code);
}

const DETAILS_KEY = "ferry-error-bin";

/**
 * Any thrown value as a gRPC ServiceError. A FerryError keeps its code; anything else is
 * Internal, with its message (never a stack) so the caller sees what broke.
 */
export function toServiceError(e: unknown): Partial<ServiceError> & { code: status; details: string } {
  const fe = asFerryError(e);
  const metadata = new Metadata();
  const payload = { code: fe.code, field: fe.field, fix: fe.fix, data: fe.data };
  metadata.set(DETAILS_KEY, Buffer.from(JSON.stringify(payload)));
  return { code: toStatus[fe.code], details: fe.fullMessage, metadata };
}

/** The inverse of {@link toServiceError}, for clients: a gRPC error back into a FerryError. */
export function fromServiceError(e: unknown): FerryError {
  if (e instanceof FerryError) return e;
  const se = e as Partial<ServiceError>;
  if (typeof se?.code !== "number") return asFerryError(e);
  const raw = se.metadata?.get(DETAILS_KEY)[0];
  let parsed: { code?: ErrorCode; field?: string; fix?: string; data?: Record<string, unknown> } = {};
  if (raw instanceof Buffer) {
    try {
      parsed = JSON.parse(raw.toString("utf8")) as typeof parsed;
    } catch {
      parsed = {};
    }
  }
  const code = parsed.code ?? fromStatus.get(se.code) ?? "Internal";
  // `details` already holds the full message with field and fix; don't append them twice.
  const err = new FerryError(code, se.details || se.message || "unknown error", {
    ...(parsed.field ? { field: parsed.field } : {}),
    ...(parsed.data ? { data: parsed.data } : {}),
    cause: e,
  });
  return err;
}

/** Wrap anything thrown into a FerryError, keeping it when it already is one. */
export function asFerryError(e: unknown): FerryError {
  if (e instanceof FerryError) return e;
  if (e instanceof Error && e.name === "AbortError") return new FerryError("Cancelled", e.message, { cause: e });
  const message = e instanceof Error ? e.message : String(e);
  return new FerryError("Internal", message, { cause: e });
}

export { toStatus as statusOf };
