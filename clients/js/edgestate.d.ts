// Types of the edgestate client (edgestate.js) and of every /ws message.

/** GET /api/state, and the `state` of every stateUpdate. Times are Unix milliseconds. */
export interface State {
  /** USD price of the configured token; null until the price API answered. */
  tokenPrice: number | null;
  /** Jackpot in SOL; null until read from upstream. */
  jackpot: number | null;
  /** Participant count; null until counted. */
  participants: number | null;
  lastUpdate: number;
  /** Increases with every change of the state. */
  version?: number;
  /** Slot of the newest upstream value. */
  slot?: number | null;
  /** True when a field is older than state.max_staleness (served from the last good value). */
  stale?: boolean;
}

// -- messages the server sends on /ws --------------------------------------------------------

/** On connect, on every change, and in answer to getState. */
export interface StateUpdateMessage {
  type: "stateUpdate";
  state: State;
}
/** The answer to a client's ping. */
export interface PongMessage {
  type: "pong";
}
/** A frame the server could not use (bad JSON, unknown type, binary, too large); the connection stays open. */
export interface ErrorMessage {
  type: "error";
  error: string;
}
export type ServerMessage = StateUpdateMessage | PongMessage | ErrorMessage;

// -- messages a client may send ----------------------------------------------------------------

export interface GetStateMessage {
  type: "getState";
}
export interface PingMessage {
  type: "ping";
}
export type ClientMessage = GetStateMessage | PingMessage;

// -- close codes ---------------------------------------------------------------------------------

/** Server shutting down or restarting: reconnect soon (jittered within restartSpread). */
export const CLOSE_GOING_AWAY: 1001;
/** Repeated invalid messages. */
export const CLOSE_POLICY_VIOLATION: 1008;
/** Server full (ws.max_clients): back off for tryAgainLaterDelay and more. */
export const CLOSE_TRY_AGAIN_LATER: 1013;

// -- the client ----------------------------------------------------------------------------------

export interface ClientOptions {
  /** Default "/ws". */
  wsPath?: string;
  /** Default "/api/state". */
  statePath?: string;
  /** ms; the first reconnect waits a random delay up to this. Default 500. */
  minDelay?: number;
  /** ms; cap of the exponential backoff. Default 30000. */
  maxDelay?: number;
  /** ms added after close 1013 (server full). Default 15000. */
  tryAgainLaterDelay?: number;
  /** ms; after close 1001 reconnect within this, jittered. Default 5000. */
  restartSpread?: number;
  /** ms between GET /api/state polls while disconnected. Default 5000. */
  pollInterval?: number;
  /** ms without any message before the socket is taken for dead. Default 60000. */
  staleAfter?: number;
  /** For tests or other runtimes. */
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
}

/** "polling": the socket is down; /api/state is polled until the reconnect. */
export type Status = "idle" | "connecting" | "open" | "polling" | "closed";

export interface CloseInfo {
  code: number;
  reason: string;
  /** ms until the next connection attempt. */
  delay: number;
}

export class EdgeStateClient {
  constructor(baseUrl: string, options?: ClientOptions);
  readonly baseUrl: string;
  /** The newest state, or null before the first one. */
  readonly state: State | null;
  readonly status: Status;
  /** The last close and the reconnect delay chosen for it. */
  readonly lastClose: CloseInfo | null;
  /** Called with every new state (at once with the current one, if any); returns an unsubscribe function. */
  onState(cb: (state: State) => void): () => void;
  onStatus(cb: (status: Status, detail?: CloseInfo) => void): () => void;
  /** Connect and keep reconnecting until close(). */
  start(): this;
  close(): void;
  /** Ask for the state now (getState over the socket, else one poll). */
  refresh(): void | Promise<number>;
}

/** Full jitter: a uniform delay in [0, min(cap, base * 2^attempt)]. */
export function backoffDelay(attempt: number, base: number, cap: number, random?: () => number): number;
/** The delay before reconnect `attempt` (0-based) after a close with `code`. */
export function reconnectDelay(code: number, attempt: number, options?: ClientOptions, random?: () => number): number;
