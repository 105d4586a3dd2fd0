// Types of gatewayd.js, the browser client of gatewayd's JSON WebSocket protocol.

export class ClientError extends Error {}
export class ConnectionLostError extends ClientError {}
export class ProtocolError extends ClientError {}
export class StateRejectedError extends ClientError {}
export class ChatError extends ClientError {}
export class RpcError extends ClientError {
  readonly method: string;
  /** The exception's class on the gateway, e.g. "ValueError" ("" when unknown). */
  readonly remoteType: string;
  readonly detail: string;
}
export class MethodNotFoundError extends RpcError {}
export class BadArgumentsError extends RpcError {}
export class CallTimeoutError extends RpcError {}
export class ReadOnlyError extends RpcError {}
export class RemoteError extends RpcError {}

export function rpcError(method: string, message: string): RpcError;
export function agentUrl(
  url: string, agentClass: string, agentId: string, query?: Record<string, string>,
): string;

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface ClientOptions {
  /** Sent as the `token` URL parameter (browsers cannot set WebSocket headers). */
  token?: string;
  query?: Record<string, string>;
  /** Reopen a dropped connection (default true). */
  reconnect?: boolean;
  backoffMinMs?: number;
  backoffMaxMs?: number;
  connectTimeoutMs?: number;
  /** A WebSocket implementation for hosts without a global one. */
  WebSocket?: typeof WebSocket;
}

/** One call in flight: iterate it for its chunks; `result` resolves to the return value. */
export class RpcCall<Result = Json, Chunk = Json> implements AsyncIterable<Chunk>, PromiseLike<Result> {
  readonly method: string;
  readonly result: Promise<Result>;
  readonly done: boolean;
  then<A = Result, B = never>(
    onOk?: ((value: Result) => A | PromiseLike<A>) | null,
    onErr?: ((reason: unknown) => B | PromiseLike<B>) | null,
  ): PromiseLike<A | B>;
  [Symbol.asyncIterator](): AsyncIterator<Chunk>;
}

export type ClientEvent = "state" | "error" | "message" | "connection";

export class AgentClient<State = Json> {
  /** `url`: a gateway's base URL, or every member's of a group (tried in turn). */
  constructor(url: string | string[], agentClass: string, agentId: string, options?: ClientOptions);
  /** The agent's URL on the gateway this client connects to now. */
  readonly url: string;
  readonly urls: string[];
  readonly agentClass: string;
  readonly agentId: string;
  /** The state as last received (or as this client last set it). */
  readonly state: State | undefined;
  readonly identity: { agent?: string; id?: string; connection?: string };
  readonly connected: boolean;
  /** Connections established so far (1 + reconnects). */
  readonly connects: number;
  /** Resolves once identity and state arrived. */
  connect(): Promise<this>;
  close(): void;
  on(event: "state", listener: (state: State) => void): () => void;
  on(event: "error", listener: (err: ClientError) => void): () => void;
  on(event: "message", listener: (data: string | Blob | ArrayBuffer) => void): () => void;
  on(event: "connection", listener: (connected: boolean) => void): () => void;
  onState(listener: (state: State) => void): () => void;
  changes(): AsyncGenerator<State>;
  waitForState(predicate: (state: State) => boolean, timeoutMs?: number): Promise<State>;
  /** Optimistic; reverted with an "error" event if the gateway refuses it. */
  setState(state: State): void;
  call<Result = Json>(method: string, ...args: Json[]): Promise<Result>;
  stream<Chunk = Json, Result = Json>(method: string, ...args: Json[]): RpcCall<Result, Chunk>;
  sendMessage(data: string | ArrayBuffer | Blob): void;
}

export type ChatPart = { type: string; [key: string]: Json };
export interface ChatMessage {
  id: string;
  role: "user" | "assistant" | "system";
  parts: ChatPart[];
  metadata?: Json;
}
export type ChatChunk = { type: string; [key: string]: Json };

export class ChatResponse implements AsyncIterable<ChatChunk> {
  readonly request: string;
  readonly stream: string | null;
  readonly chunks: ChatChunk[];
  readonly text: string;
  readonly reasoning: string;
  /** Tool calls by id, merged from their tool-* chunks; `state` is the last chunk's type. */
  readonly toolCalls: Record<string, { state: string; [key: string]: Json }>;
  /** complete | cancelled | error | interrupted | "ended while disconnected" | null */
  readonly status: string | null;
  readonly error: string | null;
  readonly lastSeq: number;
  /** Tool calls the answer paused on (from gw.chat.done). */
  readonly waiting: { toolCallId: string; toolName: string; kind: "approval" | "client" }[];
  /** The message this answer writes (a continuation's start chunk names it). */
  readonly messageId: string | null;
  readonly finished: boolean;
  /** Resolves to the final status. */
  readonly done: Promise<string>;
  onChunk(listener: (chunk: ChatChunk) => void): () => void;
  [Symbol.asyncIterator](): AsyncIterator<ChatChunk>;
}

export class ChatClient<State = Json> extends AgentClient<State> {
  readonly messages: ChatMessage[];
  readonly streaming: ChatResponse | null;
  on(event: "response", listener: (response: ChatResponse) => void): () => void;
  on(event: "messages", listener: (messages: ChatMessage[]) => void): () => void;
  on(event: ClientEvent, listener: (value: any) => void): () => void;
  /** body.clientTools: [{name, description?, parameters?}] tools this client runs. */
  send(message: string | ChatMessage, body?: Record<string, Json>): ChatResponse;
  resume(): Promise<ChatResponse | null>;
  cancel(): void;
  clear(): void;
  sync(messages: ChatMessage[]): void;
  getMessages(): Promise<ChatMessage[]>;
  /** Approve or deny a call in state approval-requested; the continuation's response. */
  approve(toolCallId: string, approved?: boolean, reason?: string): ChatResponse;
  deny(toolCallId: string, reason?: string): ChatResponse;
  /** Answer a client tool call (output, or errorText for a failure). */
  toolResult(toolCallId: string, output?: Json, errorText?: string): ChatResponse;
  sendFrame(type: string, fields?: Record<string, Json>): void;
}
