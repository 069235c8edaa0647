export * from "./errors.js";
export * from "./exec.js";
export * from "./log.js";
export * from "./tls.js";
export * from "./validate.js";
export * from "./grpc.js";
export * from "./flags.js";
