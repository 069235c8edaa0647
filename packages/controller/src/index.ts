export * from "./controller.js";
export * from "./hosts.js";
