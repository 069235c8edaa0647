export * from "./ovs.js";
export * from "./netns.js";
