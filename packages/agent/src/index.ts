export * from "./agent.js";
export * from "./capabilities.js";
export * from "./ops.js";
export * from "./resources.js";
export * from "./net/index.js";
export * from "./runtime/index.js";
export * from "./store/index.js";
export * from "./failpoints.js";
