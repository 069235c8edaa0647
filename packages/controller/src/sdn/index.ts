export * from "./types.js";
export * from "./ovs.js";
export * from "./onos.js";
