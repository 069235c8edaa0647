import { fileURLToPath } from "node:url";

/** The directory holding Ferry's .proto files (for @grpc/proto-loader and server reflection). */
export const PROTO_ROOT = fileURLToPath(new URL("../../../proto", import.meta.url));
