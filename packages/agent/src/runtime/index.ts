/** Container runtime of the agent: runc + CRIU driven directly. */
export { ContainerRuntime, validateCheckpointId } from "./container-runtime.js";
export type {
  CheckpointOptions,
  CheckpointResult,
  CheckpointStats,
  ContainerPlacement,
  ContainerRuntimeConfig,
  RestoreOptions,
  RestoreResult,
  UsageSample,
} from "./container-runtime.js";
export { Criu, DEFAULT_CRIU_FEATURES, freePort } from "./criu.js";
export type { CriuApi, PageServerHandle } from "./criu.js";
export { parseCriuStats, encodeCriuStats, IMG_SERVICE_MAGIC, STATS_MAGIC } from "./criu-stats.js";
export type { DumpStats, RestoreStats, StatsEntry } from "./criu-stats.js";
export { Runc, readPidFile } from "./runc.js";
export type { RuncApi, RuncOptions, RuncState, LaunchOptions } from "./runc.js";
export { buildOciConfig } from "./oci.js";
export { establishedConnections, openTcpTables, parseProcNetTcp, TCP_STATE, type TcpTables } from "./proc-net.js";
export { KeyedMutex } from "./keyed-mutex.js";
export { FAVOR_HIERARCHY, favorCgroupDynmods, type FavorDynmods, type FavorDynmodsState } from "./favor-dynmods.js";
