export * from "./controller.js";
export * from "./hosts.js";
export * from "./sdn/index.js";
