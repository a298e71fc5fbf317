// The gateway, seen from the page: HTTP calls with the API key in a header, and one
// native WebSocket that reconnects by itself.
//
// A browser cannot put headers on a WebSocket, so with keys on the socket opens with a
// single-use ticket from POST auth/ticket: the key never appears in a URL.

const KEY = "chatgate.key";
const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 8000];

export class KeyNeeded extends Error {}

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export class Api {
  constructor() {
    this.key = sessionStorage.getItem(KEY) || "";
  }

  setKey(key) {
    this.key = key;
    sessionStorage.setItem(KEY, key);
  }

  async fetch(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (this.key) headers.Authorization = "Bearer " + this.key;
    const response = await fetch(path, { ...options, headers });
    if (response.status === 401) throw new KeyNeeded();
    return response;
  }

  async json(path, options) {
    const response = await this.fetch(path, options);
    if (!response.ok) throw new HttpError(response.status, `${path} answered ${response.status}`);
    return response.json();
  }
}

/**
 * The native socket. ``onEvent(event)`` gets every server event; ``onState(state)`` one of
 * "connecting", "connected", "reconnecting", "offline" or "key" (the gateway wants a key,
 * or another one: nothing is retried until ``start()`` is called again).
 */
export class Connection {
  constructor(api, { onEvent, onState }) {
    this.api = api;
    this.onEvent = onEvent;
    this.onState = onState;
    this.socket = null;
    this.attempt = 0;
    this.timer = 0;
    this.stopped = true;
    this.connecting = false;
    addEventListener("online", () => this.reconnectNow());
    addEventListener("offline", () => this.socket?.close());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.reconnectNow();
    });
  }

  get open() {
    return this.socket?.readyState === WebSocket.OPEN;
  }

  start() {
    const previous = this.socket;
    this.socket = null;
    previous?.close();
    this.stopped = false;
    this.attempt = 0;
    this.connect();
  }

  send(frame) {
    if (!this.open) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  reconnectNow() {
    if (this.stopped || this.socket || this.connecting) return;
    clearTimeout(this.timer);
    this.connect();
  }

  async connect() {
    this.timer = 0;
    this.connecting = true;
    try {
      await this.openSocket();
    } finally {
      this.connecting = false;
    }
  }

  async openSocket() {
    if (!navigator.onLine) return this.onState("offline");
    this.onState(this.attempt === 0 ? "connecting" : "reconnecting");
    const url = new URL("ws", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    try {
      if (this.api.key) {
        const { ticket } = await this.api.json("auth/ticket", { method: "POST" });
        url.searchParams.set("ticket", ticket);
      }
    } catch (error) {
      if (error instanceof KeyNeeded) return this.refused();
      return this.retry();
    }
    const socket = new WebSocket(url);
    this.socket = socket;
    let refused = false;
    socket.onopen = () => {
      this.attempt = 0;
      this.onState("connected");
    };
    socket.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      if (event.type === "error" && event.code === "unauthorized") refused = true;
      else this.onEvent(event);
    };
    socket.onclose = () => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (refused) this.refused();
      else this.retry();
    };
  }

  refused() {
    this.stopped = true;
    this.onState("key");
  }

  retry() {
    if (this.stopped) return;
    if (!navigator.onLine) {
      this.onState("offline");  // the "online" event reconnects
      return;
    }
    this.onState("reconnecting");
    const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    this.timer = setTimeout(() => this.connect(), base + Math.random() * base * 0.3);
  }
}
