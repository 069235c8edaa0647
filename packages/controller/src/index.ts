export * from "./controller.js";
export * from "./hosts.js";
export * from "./containers.js";
export * from "./migrations.js";
export * from "./monitor.js";
export * from "./policies.js";
export * from "./sdn/index.js";
