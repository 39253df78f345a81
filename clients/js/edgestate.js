// edgestate browser client: the shared state over /ws, with polling as the fallback.
// An ES module with no dependencies; types in edgestate.d.ts.
//
//   import { EdgeStateClient } from "./edgestate.js";
//   const client = new EdgeStateClient("https://edge.example");
//   client.onState((state) => render(state));
//   client.start();
//
// Reconnects with full jitter (a random delay in [0, min(maxDelay, minDelay * 2^attempt)]),
// so that 100,000 browsers do not come back in the same second. Close 1013 ("try again
// later": the server is full) waits at least tryAgainLaterDelay on top; close 1001 (the
// server is restarting or shutting down) comes back within restartSpread, jittered. While
// the socket is down the client polls /api/state with If-None-Match, so the page stays
// current (and a CDN in front answers most of those polls).

export const CLOSE_GOING_AWAY = 1001;
export const CLOSE_POLICY_VIOLATION = 1008;
export const CLOSE_TRY_AGAIN_LATER = 1013;

const DEFAULTS = {
  wsPath: "/ws",
  statePath: "/api/state",
  minDelay: 500, // ms: the first reconnect waits up to this
  maxDelay: 30000, // ms: the cap of the exponential backoff
  tryAgainLaterDelay: 15000, // ms: added after close 1013 (server full)
  restartSpread: 5000, // ms: after close 1001, reconnect within this (jittered)
  pollInterval: 5000, // ms: /api/state polling while disconnected
  staleAfter: 60000, // ms: no message for this long -> reconnect (we ping every staleAfter / 3)
};

/** Full jitter: a uniform delay in [0, min(cap, base * 2^attempt)]. */
export function backoffDelay(attempt, base, cap, random = Math.random) {
  return Math.floor(random() * Math.min(cap, base * 2 ** Math.max(0, attempt)));
}

/** The delay before reconnect `attempt` (0-based) after a close with `code`. */
export function reconnectDelay(code, attempt, options, random = Math.random) {
  const o = { ...DEFAULTS, ...options };
  if (code === CLOSE_TRY_AGAIN_LATER) {
    return o.tryAgainLaterDelay + backoffDelay(attempt, o.minDelay, o.maxDelay, random);
  }
  if (code === CLOSE_GOING_AWAY) {
    return Math.floor(random() * o.restartSpread);
  }
  return backoffDelay(attempt, o.minDelay, o.maxDelay, random);
}

function wsUrl(baseUrl, path) {
  const url = new URL(path, baseUrl);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

export class EdgeStateClient {
  /**
   * @param {string} baseUrl the edgestate (or CDN) origin, e.g. "https://edge.example"
   * @param {object} [options] see edgestate.d.ts (ClientOptions)
   */
  constructor(baseUrl, options = {}) {
    this.baseUrl = baseUrl;
    this.options = { ...DEFAULTS, ...options };
    this.state = null;
    this.status = "idle";
    this.lastClose = null; // {code, reason, delay} of the last close
    this._stateListeners = new Set();
    this._statusListeners = new Set();
    this._ws = null;
    this._attempt = 0;
    this._timers = new Set();
    this._etag = null;
    this._polling = false;
    this._stopped = true;
    this._lastMessageAt = 0;
    this._key = null;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._fetch = options.fetch || globalThis.fetch.bind(globalThis);
  }

  /** Call `cb(state)` on every new state; returns a function that stops it. */
  onState(cb) {
    this._stateListeners.add(cb);
    if (this.state !== null) cb(this.state);
    return () => this._stateListeners.delete(cb);
  }

  /** Call `cb(status, detail)` when the connection status changes; returns an unsubscribe function. */
  onStatus(cb) {
    this._statusListeners.add(cb);
    return () => this._statusListeners.delete(cb);
  }

  /** Connect (and keep reconnecting) until close(). */
  start() {
    if (!this._stopped) return this;
    this._stopped = false;
    this._connect();
    this._every(this.options.staleAfter / 3, () => this._checkStale());
    return this;
  }

  /** Stop: close the socket, cancel timers and polling. */
  close() {
    this._stopped = true;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._polling = false;
    if (this._ws) {
      const ws = this._ws;
      this._ws = null;
      ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
      try { ws.close(1000); } catch { /* already closed */ }
    }
    this._setStatus("closed");
  }

  /** Ask for the current state now (answered with a stateUpdate). */
  refresh() {
    if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify({ type: "getState" }));
    else return this._pollOnce();
  }

  // -- internals -------------------------------------------------------------------

  _setStatus(status, detail) {
    if (status === this.status) return;
    this.status = status;
    for (const cb of this._statusListeners) cb(status, detail);
  }

  _later(ms, fn) {
    const t = setTimeout(() => { this._timers.delete(t); fn(); }, ms);
    this._timers.add(t);
    return t;
  }

  _every(ms, fn) {
    const tick = () => { if (!this._stopped) { fn(); this._later(ms, tick); } };
    this._later(ms, tick);
  }

  _emit(state) {
    // Unchanged states are not re-sent by the server; polling may see one twice: skip it.
    const key = `${state.version ?? ""}|${state.lastUpdate}|${state.jackpot}|${state.participants}|${state.tokenPrice}`;
    if (key === this._key) return;
    this._key = key;
    this.state = state;
    for (const cb of this._stateListeners) cb(state);
  }

  _connect() {
    if (this._stopped) return;
    this._setStatus("connecting");
    let ws;
    try {
      ws = new this._WebSocket(wsUrl(this.baseUrl, this.options.wsPath));
    } catch (err) {
      this._scheduleReconnect(1006, String(err));
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      this._attempt = 0;
      this._polling = false;
      this._lastMessageAt = Date.now();
      this._setStatus("open");
    };
    ws.onmessage = (event) => {
      this._lastMessageAt = Date.now();
      let message;
      try { message = JSON.parse(event.data); } catch { return; }
      if (message && message.type === "stateUpdate" && message.state) this._emit(message.state);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._scheduleReconnect(event.code, event.reason);
    };
    ws.onerror = () => { /* a close event follows */ };
  }

  _scheduleReconnect(code, reason) {
    if (this._stopped) return;
    const delay = reconnectDelay(code, this._attempt, this.options);
    this._attempt += 1;
    this.lastClose = { code, reason: reason || "", delay };
    this._setStatus("polling", this.lastClose);
    this._startPolling();
    this._later(delay, () => this._connect());
  }

  _startPolling() {
    if (this._polling) return;
    this._polling = true;
    const loop = async () => {
      if (!this._polling || this._stopped) return;
      const wait = await this._pollOnce();
      if (this._polling && !this._stopped) this._later(wait, loop);
    };
    loop();
  }

  /** One GET /api/state with If-None-Match; resolves to the ms to wait before the next. */
  async _pollOnce() {
    const headers = {};
    if (this._etag) headers["If-None-Match"] = this._etag;
    try {
      const response = await this._fetch(new URL(this.options.statePath, this.baseUrl).toString(), { headers });
      if (response.status === 200) {
        this._etag = response.headers.get("ETag") || this._etag;
        this._emit(await response.json());
      } else if (response.status === 429 || response.status === 503) {
        const retry = Number(response.headers.get("Retry-After"));
        return Math.max(this.options.pollInterval, Number.isFinite(retry) ? retry * 1000 : 0);
      }
      // 304: unchanged
    } catch {
      // offline or the server is down: try again at the next interval
    }
    return this.options.pollInterval;
  }

  _checkStale() {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return;
    if (Date.now() - this._lastMessageAt > this.options.staleAfter) {
      // A half-open socket (browsers do not show us the server's pings): reconnect.
      ws.onclose = ws.onmessage = ws.onerror = null;
      try { ws.close(4000, "no message from the server"); } catch { /* ignore */ }
      this._ws = null;
      this._scheduleReconnect(1006, "stale");
    } else {
      ws.send(JSON.stringify({ type: "ping" })); // answered with a pong: proof of life
    }
  }
}
