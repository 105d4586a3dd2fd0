// gatewayd browser client: agents over the JSON WebSocket protocol (protocols/PROTOCOL.md).
// Dependency-free ES module, served by the daemon at /client/gatewayd.js; types in gatewayd.d.ts.
//
//   import { AgentClient, ChatClient } from "/client/gatewayd.js";
//   const agent = await new AgentClient("ws://gw:8765", "thermostat", "living-room").connect();
//   agent.onState((state) => render(state));
//   await agent.call("set_target", 22);
//   for await (const row of agent.stream("history", 3)) console.log(row);
//
// A dropped connection is reopened with exponential backoff; the gateway sends the current
// state on every connect, so `state` is restored. A chat client resumes the answer that was
// streaming and gets each chunk once, in order (chunks it has are skipped by their seq).
//
// A group of gateways (cluster mode): pass every member's URL, `new AgentClient(["ws://gw1:8765",
// "ws://gw2:8765"], ...)`. Any member serves any agent (it relays the client to the agent's
// owner); a member that cannot be reached is skipped for the next one, and the 1012/1013
// closes a member sends while the agent moves are retried (also during the first connect).

/** Base class of every error this module throws. */
export class ClientError extends Error {
  constructor(message) { super(message); this.name = this.constructor.name; }
}
/** The connection closed before the answer came. */
export class ConnectionLostError extends ClientError {}
/** `gw.error`, or a close the gateway means for good (unknown class, refused). */
export class ProtocolError extends ClientError {}
/** The gateway refused this client's setState. */
export class StateRejectedError extends ClientError {}
/** A `gw.chat.error`. */
export class ChatError extends ClientError {}
/** An RPC failed on the gateway; `remoteType` is the exception class there. */
export class RpcError extends ClientError {
  constructor(method, message, remoteType = "", detail = "") {
    super(`${method}: ${message}`);
    this.method = method; this.remoteType = remoteType; this.detail = detail || message;
  }
}
export class MethodNotFoundError extends RpcError {}
export class BadArgumentsError extends RpcError {}
export class CallTimeoutError extends RpcError {}
export class ReadOnlyError extends RpcError {}
export class RemoteError extends RpcError {}

/** The typed error for the gateway's text of a failed RPC ("message failed: Type: detail"). */
export function rpcError(method, message) {
  const m = /^(?:\w+ failed: )?([A-Za-z_][\w.]*): ([\s\S]*)$/.exec(message);
  const remoteType = m ? m[1] : "";
  const detail = m ? m[2] : message;
  let Cls = RemoteError;
  if (remoteType === "RpcError") {
    if (detail.startsWith("bad arguments")) Cls = BadArgumentsError;
    else if (/has no method|no callable method|not @callable/.test(detail)) Cls = MethodNotFoundError;
  } else if (remoteType === "TurnTimeoutError") Cls = CallTimeoutError;
  else if (remoteType === "ReadonlyConnectionError") Cls = ReadOnlyError;
  return new Cls(method, message, remoteType, detail);
}

/** `ws://host:port` + `/agents/{class}/{id}`, both percent-encoded. */
export function agentUrl(url, agentClass, agentId, query) {
  const base = url.replace(/\/+$/, "");
  let path = `${base}/agents/${encodeURIComponent(agentClass)}/${encodeURIComponent(agentId)}`;
  const params = new URLSearchParams(query || {}).toString();
  return params ? `${path}?${params}` : path;
}

const PERMANENT = new Set([1008, 1009]);
// Going away, service restart (the agent moved), try again later (too slow, or moving).
const RETRY = new Set([1001, 1012, 1013]);
const END = Symbol("end");

/** A queue that an async iterator drains. */
class Channel {
  constructor() { this.items = []; this.waiters = []; }
  push(item) {
    const waiter = this.waiters.shift();
    if (waiter) waiter(item); else this.items.push(item);
  }
  next() {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve) => this.waiters.push(resolve));
  }
}

/** One call in flight: `for await` its chunks, `await call.result` for the final value. */
export class RpcCall {
  constructor(method) {
    this.method = method;
    this.chunks = new Channel();
    this.result = new Promise((resolve, reject) => { this._resolve = resolve; this._reject = reject; });
    this.result.catch(() => {}); // raised to whoever awaits it; never "unhandled"
    this.done = false;
  }
  _chunk(chunk) { this.chunks.push({ chunk }); }
  _finish(result) { if (!this.done) { this.done = true; this._resolve(result); } this.chunks.push(END); }
  _fail(err) { if (!this.done) { this.done = true; this._reject(err); } this.chunks.push(END); }
  then(onOk, onErr) { return this.result.then(onOk, onErr); }
  async *[Symbol.asyncIterator]() {
    for (;;) {
      const item = await this.chunks.next();
      if (item === END) { await this.result; return; }
      yield item.chunk;
    }
  }
}

/** One agent, kept in sync. Options: token (sent as the `token` URL parameter: browsers
 * cannot set WebSocket headers), query, reconnect (true), backoffMinMs (100), backoffMaxMs
 * (5000), connectTimeoutMs (10000), WebSocket (an implementation, for non-browser hosts). */
export class AgentClient {
  constructor(url, agentClass, agentId, options = {}) {
    const query = { ...(options.query || {}) };
    if (options.token) query.token = options.token;
    const bases = Array.isArray(url) ? url : [url];
    if (!bases.length) throw new ClientError("give at least one gateway URL");
    this.urls = bases.map((base) => agentUrl(base, agentClass, agentId, query));
    this._urlIndex = 0;
    this._unreachable = 0; // URLs in a row that could not be reached
    this.agentClass = agentClass;
    this.agentId = agentId;
    this.options = { reconnect: true, backoffMinMs: 100, backoffMaxMs: 5000, connectTimeoutMs: 10000, ...options };
    this.state = undefined;
    this.identity = {};
    this.connected = false;
    this.connects = 0;
    this._listeners = { state: new Set(), error: new Set(), message: new Set(), connection: new Set() };
    this._calls = new Map();
    this._ids = 0;
    this._ws = null;
    this._closing = false;
    this._closedForGood = null;
    this._attempt = 0;
    this._previous = [];
    this._timer = null;
  }

  /** The agent's URL on the gateway this client connects to now. */
  get url() { return this.urls[this._urlIndex]; }

  /** Open the connection; resolves once identity and state arrived. */
  connect() {
    this._closing = false;
    return new Promise((resolve, reject) => {
      const timeout = setTimeout(() => {
        if (this._first) { this._first = null; this.close(); reject(new ConnectionLostError(`no answer from ${this.url}`)); }
      }, this.options.connectTimeoutMs);
      const settle = (fn) => (v) => { clearTimeout(timeout); fn(v); };
      this._first = { resolve: settle(() => resolve(this)), reject: settle(reject) };
      this._open();
    });
  }

  /** Close and stop reconnecting; calls in flight fail. */
  close() {
    this._closing = true;
    clearTimeout(this._timer);
    if (this._ws) this._ws.close(1000);
    this._failCalls(new ConnectionLostError("the client was closed"));
  }

  /** Listen: "state" (state), "error" (ClientError), "message" (user data),
   * "connection" (true/false). Returns a function that removes the listener. */
  on(event, listener) {
    this._listeners[event].add(listener);
    return () => this._listeners[event].delete(listener);
  }
  onState(listener) { return this.on("state", listener); }

  /** Every state from now on, as an async iterator. */
  async *changes() {
    const channel = new Channel();
    const off = this.onState((s) => channel.push({ s }));
    try { for (;;) yield (await channel.next()).s; } finally { off(); }
  }

  /** The first state (the current one included) for which `predicate` is true. */
  waitForState(predicate, timeoutMs = 10000) {
    if (this.state !== undefined && predicate(this.state)) return Promise.resolve(this.state);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { off(); reject(new ClientError("timed out waiting for a state")); }, timeoutMs);
      const off = this.onState((s) => { if (predicate(s)) { clearTimeout(timer); off(); resolve(s); } });
    });
  }

  /** Replace the agent's state; reverted (and an "error" emitted) if the gateway refuses it. */
  setState(state) {
    this._previous = [...this._previous.slice(-99), this.state];
    this._send({ type: "gw.set_state", state });
    this._setState(state);
  }

  /** Call a `@callable` method: resolves to its result or rejects with a typed RpcError. */
  call(method, ...args) { return this.stream(method, ...args).result; }

  /** Call a streaming `@callable`: `for await (const chunk of call)`, then `await call.result`. */
  stream(method, ...args) {
    const call = new RpcCall(method);
    if (!this.connected) { call._fail(this._notConnected()); return call; }
    const id = String(++this._ids);
    this._calls.set(id, call);
    const frame = { type: "gw.rpc", id, method };
    if (args.length) frame.args = args;
    try { this._send(frame); } catch (err) { this._calls.delete(id); call._fail(err); }
    return call;
  }

  /** Send user data (delivered to the agent's on_message untouched). */
  sendMessage(data) {
    if (!this._ws || this._ws.readyState !== 1) throw this._notConnected();
    this._ws.send(data);
  }

  // -- internals ---------------------------------------------------------------------------

  _send(frame) {
    if (!this._ws || this._ws.readyState !== 1 || !this.connected) throw this._notConnected();
    this._ws.send(JSON.stringify(frame));
  }

  _notConnected() {
    return this._closedForGood || new ConnectionLostError(`not connected to ${this.url} (reconnecting)`);
  }

  _open() {
    const WS = this.options.WebSocket || globalThis.WebSocket;
    const ws = new WS(this.url);
    this._ws = ws;
    let identified = false;
    let opened = false;
    ws.onopen = () => { opened = true; this._unreachable = 0; };
    ws.onmessage = (event) => {
      const data = event.data;
      if (typeof data !== "string" || data[0] !== "{") { this._emit("message", data); return; }
      let frame;
      try { frame = JSON.parse(data); } catch { this._emit("message", data); return; }
      const kind = frame && frame.type;
      if (typeof kind !== "string" || !kind.startsWith("gw.")) { this._emit("message", data); return; }
      if (kind === "gw.identity") {
        const { type, ...identity } = frame; this.identity = identity; identified = true;
      } else if (kind === "gw.state") {
        this._previous = [];
        this._setState(frame.state);
        if (identified && !this.connected) {
          this.connected = true; this.connects += 1; this._attempt = 0;
          if (this._first) { const first = this._first; this._first = null; first.resolve(); }
          this._emit("connection", true);
          this._onConnected(this.connects > 1);
        }
      } else this._dispatch(kind, frame);
    };
    ws.onclose = (event) => {
      const wasConnected = this.connected;
      this.connected = false;
      this._ws = null;
      if (wasConnected) { this._emit("connection", false); this._onDisconnected(); }
      this._failCalls(new ConnectionLostError(`connection to ${this.url} closed`));
      const code = event.code;
      if (!opened) { // this gateway is unreachable: the next URL is tried
        this._unreachable += 1;
        this._urlIndex = (this._urlIndex + 1) % this.urls.length;
      }
      const untried = !opened && this._unreachable < this.urls.length;
      const retry = untried || (opened && RETRY.has(code));
      if ((this._first && !retry) || PERMANENT.has(code) || (code >= 4000 && code < 5000)) {
        const err = new ProtocolError(`${this.url}: the gateway closed the connection (${code}: ${event.reason || ""})`);
        this._closedForGood = err;
        if (this._first) { const first = this._first; this._first = null; first.reject(err); }
        return;
      }
      if (this._closing || (!this.options.reconnect && !this._first)) return;
      if (untried) { this._timer = setTimeout(() => this._open(), 0); return; }
      const delay = Math.min(this.options.backoffMaxMs, this.options.backoffMinMs * 2 ** this._attempt);
      this._attempt += 1;
      this._timer = setTimeout(() => this._open(), delay * (0.8 + Math.random() * 0.4));
    };
  }

  _dispatch(kind, frame) {
    if (kind === "gw.rpc_result") {
      const call = this._calls.get(String(frame.id));
      if (!call) return;
      if (!frame.ok) { this._calls.delete(String(frame.id)); call._fail(rpcError(call.method, String(frame.error))); }
      else if (frame.done !== false) { this._calls.delete(String(frame.id)); call._finish(frame.result); }
      else call._chunk(frame.chunk);
    } else if (kind === "gw.state_error") {
      if (this._previous.length) this._setState(this._previous.pop());
      this._emit("error", new StateRejectedError(String(frame.error)));
    } else if (!this._handleFrame(frame)) {
      if (kind === "gw.error") this._emit("error", new ProtocolError(String(frame.error)));
    }
  }

  _setState(state) { this.state = state; this._emit("state", state); }

  _emit(event, value) {
    for (const listener of [...this._listeners[event]]) {
      try { listener(value); } catch (err) { console.error("gatewayd client: a listener failed", err); }
    }
  }

  _failCalls(err) {
    const calls = [...this._calls.values()];
    this._calls.clear();
    for (const call of calls) call._fail(err);
  }

  // For ChatClient.
  _handleFrame(frame) { return false; }
  _onConnected(reconnected) {}
  _onDisconnected() {}
}

/** One streamed chat answer: `for await` its chunks; `text`, `status`, `toolCalls`. */
export class ChatResponse {
  constructor(request, stream) {
    this.request = request; this.stream = stream || null;
    this.chunks = []; this.text = ""; this.reasoning = ""; this.toolCalls = {};
    this.status = null; this.error = null; this.lastSeq = -1;
    /** Tool calls the answer paused on: [{toolCallId, toolName, kind: "approval"|"client"}]. */
    this.waiting = [];
    /** The message this answer writes (a continuation names the message it extends). */
    this.messageId = null;
    this._early = new Map(); this._final = null; this._channel = new Channel();
    this.done = new Promise((resolve, reject) => { this._resolve = resolve; this._reject = reject; });
    this.done.catch(() => {});
    this._listeners = new Set();
  }
  get finished() { return this.status !== null; }
  /** Called with each chunk as it is applied; returns a remover. */
  onChunk(listener) { this._listeners.add(listener); return () => this._listeners.delete(listener); }
  async *[Symbol.asyncIterator]() {
    let seen = 0;
    for (;;) {
      if (seen < this.chunks.length) { yield this.chunks[seen++]; continue; }
      if (this.finished) { await this.done; return; }
      await this._channel.next();
    }
  }
  _add(seq, chunk) {
    if (seq <= this.lastSeq) return;
    this._early.set(seq, chunk);
    while (this._early.has(this.lastSeq + 1)) {
      this.lastSeq += 1;
      const next = this._early.get(this.lastSeq);
      this._early.delete(this.lastSeq);
      this._apply(next);
    }
    this._finishIfComplete();
  }
  _apply(chunk) {
    this.chunks.push(chunk);
    const kind = chunk.type;
    if (kind === "start" && chunk.messageId) this.messageId = chunk.messageId;
    if (kind === "text-delta") this.text += String(chunk.delta ?? "");
    else if (kind === "reasoning-delta") this.reasoning += String(chunk.delta ?? "");
    else if (typeof kind === "string" && kind.startsWith("tool-")) {
      const id = chunk.toolCallId || chunk.id;
      if (typeof id === "string") {
        const { type, ...rest } = chunk;
        this.toolCalls[id] = { ...(this.toolCalls[id] || {}), ...rest, state: kind };
      }
    }
    for (const listener of [...this._listeners]) listener(chunk);
    this._channel.push(null);
  }
  _end(status, error) { this._final = [status, error]; this._finishIfComplete(); }
  _flush() {
    for (const seq of [...this._early.keys()].sort((a, b) => a - b)) {
      this.lastSeq = seq; const chunk = this._early.get(seq); this._early.delete(seq); this._apply(chunk);
    }
    this._finishIfComplete();
  }
  _finishIfComplete() { if (this._final && this._early.size === 0) this._finish(...this._final); }
  _finish(status, error = null) {
    if (this.status !== null) return;
    this.status = status; this.error = error; this._resolve(status); this._channel.push(null);
  }
  _fail(err) {
    if (this.status !== null) return;
    this.status = "error"; this.error = String(err.message || err); this._reject(err); this._channel.push(null);
  }
}

/** A chat agent: `messages` is the stored conversation; `send(text)` streams the answer. */
export class ChatClient extends AgentClient {
  constructor(url, agentClass, agentId, options = {}) {
    super(url, agentClass, agentId, options);
    this.messages = [];
    this._responses = new Map();
    this._byStream = new Map();
    this._messagesWaiters = [];
    this._resumeWaiters = [];
    this._cutOff = [];
    this._requests = 0;
    this._listeners.response = new Set();
    this._listeners.messages = new Set();
  }

  async connect() { await super.connect(); await this.getMessages(); return this; }

  /** The answer that is streaming, if this client knows of one. */
  get streaming() { for (const r of this._responses.values()) if (!r.finished) return r; return null; }

  /** Append a user message (text or a message object) and stream the answer. `body`
   * fields reach the agent as ctx.body. */
  send(message, body = {}) {
    // body.clientTools: [{name, description?, parameters?}] tools this client runs.
    if (typeof message === "string") {
      message = { id: randomId(), role: "user", parts: [{ type: "text", text: message }] };
    }
    const request = `js-${randomId().slice(0, 8)}-${++this._requests}`;
    const response = new ChatResponse(request);
    this._responses.set(request, response);
    this.messages = [...this.messages, message];
    this._emit("messages", this.messages);
    this._send({ ...body, type: "gw.chat.send", id: request, messages: this.messages });
    return response;
  }
  /** The answer that is streaming (`gw.chat.resume`), or null. */
  resume() {
    return new Promise((resolve, reject) => {
      this._resumeWaiters.push({ resolve, reject }); this._send({ type: "gw.chat.resume" });
    });
  }
  cancel() { this._send({ type: "gw.chat.cancel" }); }
  clear() { this._send({ type: "gw.chat.clear" }); this.messages = []; this._emit("messages", []); }
  sync(messages) { this.messages = [...messages]; this._send({ type: "gw.chat.sync", messages }); }
  getMessages() {
    return new Promise((resolve, reject) => {
      this._messagesWaiters.push({ resolve, reject }); this._send({ type: "gw.chat.get_messages" });
    });
  }
  /** Approve (or deny) a tool call waiting in state approval-requested. Returns the
   * response of the continuation the gateway streams once no call waits any more. */
  approve(toolCallId, approved = true, reason) {
    return this._answer({ type: "gw.chat.tool_approval", toolCallId, approved, ...(reason ? { reason } : {}) });
  }
  deny(toolCallId, reason) { return this.approve(toolCallId, false, reason); }
  /** Answer a client tool call (a tool-call chunk with client: true). */
  toolResult(toolCallId, output, errorText) {
    return this._answer({ type: "gw.chat.tool_result", toolCallId, ...(errorText !== undefined ? { errorText } : { output }) });
  }
  _answer(frame) {
    const request = `js-${randomId().slice(0, 8)}-${++this._requests}`;
    const response = new ChatResponse(request);
    this._responses.set(request, response);
    this._send({ ...frame, id: request });
    return response;
  }
  /** Any other `gw.chat.*` frame. */
  sendFrame(type, fields = {}) { this._send({ ...fields, type }); }

  _handleFrame(frame) {
    const kind = frame.type;
    if (kind === "gw.chat.chunk") {
      if (typeof frame.seq === "number" && frame.chunk) this._responseFor(frame)._add(frame.seq, frame.chunk);
    } else if (kind === "gw.chat.done") {
      const response = this._responseFor(frame);
      response.waiting = Array.isArray(frame.waiting) ? frame.waiting : [];
      response._end(String(frame.status || "complete"), frame.error || null);
      this._refresh();
    } else if (kind === "gw.chat.resuming") {
      this._answerResume(this._responseFor(frame));
    } else if (kind === "gw.chat.replay_complete") {
      this._responseFor(frame)._flush();
    } else if (kind === "gw.chat.resume_none") {
      this._answerResume(null);
      // Answers that were streaming when the connection dropped ended meanwhile.
      for (const r of this._cutOff) if (!r.finished) { r._finish("ended while disconnected"); this._refresh(); }
      this._cutOff = [];
    } else if (kind === "gw.chat.messages") {
      if (Array.isArray(frame.messages)) this.messages = frame.messages;
      this._emit("messages", this.messages);
      const waiters = this._messagesWaiters; this._messagesWaiters = [];
      for (const w of waiters) w.resolve(this.messages);
    } else if (kind === "gw.chat.message_updated") {
      const m = frame.message;
      if (m && m.id) {
        const known = this.messages.some((x) => x.id === m.id);
        this.messages = known ? this.messages.map((x) => (x.id === m.id ? m : x)) : [...this.messages, m];
        this._emit("messages", this.messages);
      }
    } else if (kind === "gw.chat.cleared") {
      this.messages = []; this._emit("messages", []);
    } else if (kind === "gw.chat.error") {
      const err = new ChatError(String(frame.error));
      const response = frame.request != null ? this._responses.get(String(frame.request)) : null;
      if (response && !response.chunks.length) response._fail(err); else this._emit("error", err);
    } else if (typeof kind === "string" && kind.startsWith("gw.chat.")) {
      this._emit("message", JSON.stringify(frame)); // a newer frame: raw listeners may use it
    } else return false;
    return true;
  }

  _responseFor(frame) {
    const request = String(frame.request);
    let response = this._responses.get(request) || (frame.stream && this._byStream.get(frame.stream));
    if (!response) {
      response = new ChatResponse(request, frame.stream);
      this._responses.set(request, response);
      this._emit("response", response);
    }
    if (frame.stream) { response.stream = frame.stream; this._byStream.set(frame.stream, response); }
    return response;
  }
  _answerResume(response) {
    const waiters = this._resumeWaiters; this._resumeWaiters = [];
    for (const w of waiters) w.resolve(response);
  }
  _refresh() { this.getMessages().catch(() => {}); }
  _onConnected(reconnected) {
    this._cutOff = [...this._responses.values()].filter((r) => !r.finished);
    try { this._send({ type: "gw.chat.resume" }); } catch { /* closed again already */ }
    if (reconnected) this._refresh();
  }
  _onDisconnected() {
    const lost = new ConnectionLostError("the connection closed");
    for (const w of [...this._messagesWaiters, ...this._resumeWaiters]) w.reject(lost);
    this._messagesWaiters = []; this._resumeWaiters = [];
  }
}

function randomId() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID().replace(/-/g, "");
  return Math.random().toString(16).slice(2) + Date.now().toString(16);
}
