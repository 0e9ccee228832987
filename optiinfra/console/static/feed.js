// The change feed (GET /events), read with fetch: EventSource cannot send the
// API key in a header, and the key must not travel in a URL (access logs).
// The stream is Server-Sent Events all the same, parsed here; reconnects
// resume with Last-Event-ID.
import { headers } from "./api.js";

export class Feed {
  constructor({ onEvent, onState, onReset }) {
    this.onEvent = onEvent;
    this.onState = onState;
    this.onReset = onReset;
    this.lastId = null;
    this.retryMs = 2000;
    this.controller = null;
    this.stopped = false;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async connect() {
    if (this.stopped) return;
    this.controller = new AbortController();
    const extra = { Accept: "text/event-stream" };
    if (this.lastId !== null) extra["Last-Event-ID"] = String(this.lastId);
    try {
      const response = await fetch("/events", {
        headers: headers(extra),
        signal: this.controller.signal,
        cache: "no-store",
        credentials: "omit",
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      this.onState("live");
      await this.read(response.body.getReader());
    } catch (error) {
      if (this.stopped) return;
    }
    this.onState("reconnecting");
    setTimeout(() => this.connect(), this.retryMs);
  }

  async read(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        this.dispatch(block);
      }
    }
  }

  dispatch(block) {
    let id = null;
    let name = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "id") id = value;
      else if (field === "event") name = value;
      else if (field === "data") data.push(value);
      else if (field === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
    }
    if (id !== null) this.lastId = id;
    if (!data.length) return;
    const payload = JSON.parse(data.join("\n"));
    if (name === "reset") this.onReset(payload);
    else if (name !== "overflow") this.onEvent(name, payload);
  }
}
