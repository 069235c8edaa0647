export * from "./ovs.js";
export * from "./netns.js";
export * from "./lock.js";
export * from "./hold.js";
