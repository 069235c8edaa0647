export * from "./blob-store.js";
export * from "./chunk-codec.js";
export * from "./service.js";
