import { pino, type Logger } from "pino";

export type { Logger };

/**
 * The root logger of a Ferry process: JSON lines on stderr, level from FERRY_LOG_LEVEL
 * (default "info"). Components take child loggers that carry their ids
 * (`log.child({ migrationId, container, host })`); messages are constant, data goes in fields.
 */
export function createLogger(component: string, level = process.env.FERRY_LOG_LEVEL ?? "info"): Logger {
  return pino({ name: component, level, base: { component } }, pino.destination(2));
}

/** A logger that drops everything, for tests and libraries used quietly. */
export const silentLogger: Logger = pino({ level: "silent" });
