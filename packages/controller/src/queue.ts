/** Events for one server stream (WatchMigration, WatchMetrics): pushed by the controller, drained by the handler. */
export class EventQueue<T> {
  private items: T[] = [];
  private wake: (() => void) | undefined;
  private ended = false;

  /** At most `max` events wait; beyond that the oldest are dropped (a slow reader of metrics). */
  constructor(private readonly max = 10_000) {}

  push(v: T): void {
    if (this.ended) return;
    this.items.push(v);
    if (this.items.length > this.max) this.items.shift();
    this.wake?.();
  }

  end(): void {
    this.ended = true;
    this.wake?.();
  }

  async *drain(signal: AbortSignal): AsyncIterable<T> {
    const onAbort = (): void => this.end();
    signal.addEventListener("abort", onAbort, { once: true });
    try {
      for (;;) {
        while (this.items.length) yield this.items.shift()!;
        if (this.ended || signal.aborted) return;
        await new Promise<void>((r) => (this.wake = r));
        this.wake = undefined;
      }
    } finally {
      signal.removeEventListener("abort", onAbort);
    }
  }
}
