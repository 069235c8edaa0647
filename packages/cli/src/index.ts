export { run, type ControllerClient } from "./cli.js";
export * from "./table.js";
