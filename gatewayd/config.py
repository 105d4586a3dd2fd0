"""The one place that reads settings: a TOML file -> a typed, validated `GatewayConfig`.

Validation is pydantic's; this module adds the operator-facing parts: every error names the
file, the key path (`listeners.binary.bind`), what was expected and what was found; unknown keys
are errors with the nearest known key suggested; durations ("30s") and sizes ("1GiB") are parsed;
relative paths are resolved against the config file's directory; secrets may come from files.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from gatewayd.units import parse_duration_s, parse_size_bytes


class ConfigError(Exception):
    """The configuration cannot be used; `str()` is the message to show an operator."""

    def __init__(self, file: Path | str, problems: Sequence[str]) -> None:
        self.file = str(file)
        self.problems = list(problems)
        lines = [f"{self.file}: {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


def _parse_bind(value: object) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected 'host:port' such as '127.0.0.1:8765', found {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected a port number 0-65535 after ':', found {value!r}")
    return (host or "0.0.0.0", int(port_text))


def _to_path(value: object) -> Path:
    # Strict mode accepts only Path instances; TOML gives strings, and nothing else is a path.
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file path string, found {value!r}")
    return Path(value)


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is not None and not value.is_absolute():
        value = Path(base_dir) / value
    return value.expanduser()


def _must_exist(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"file not found: {value}")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration_s), Field(ge=0)]
Size = Annotated[int, BeforeValidator(parse_size_bytes)]
Bind = Annotated[tuple[str, int], BeforeValidator(_parse_bind)]
ConfigPath = Annotated[Path, BeforeValidator(_to_path), AfterValidator(_resolve_path)]
ExistingFile = Annotated[
    Path, BeforeValidator(_to_path), AfterValidator(_resolve_path), AfterValidator(_must_exist)
]
LogLevel = Literal["debug", "info", "warning", "error"]


class Section(BaseModel):
    """Base of every config table: unknown keys are errors, values are immutable, and types are
    strict: `enabled = "yes"` or `cpu_threads = "1"` is an error, not a silent conversion.
    Durations, sizes, binds and paths still parse from their documented string forms."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GatewaySection(Section):
    state_dir: ConfigPath = Path("state")
    log_level: LogLevel = "info"
    drain_timeout: Duration = 10.0
    status_interval: Duration = 5.0


class HttpSection(Section):
    enabled: bool = True
    bind: Bind = ("127.0.0.1", 9184)


class ApiSection(Section):
    # Off unless configured: the API can change things (the example config switches it on).
    enabled: bool = False
    bind: Bind = ("127.0.0.1", 8780)
    # TOML file of bearer tokens (gatewayd/api/tokens.py); without one every request is refused.
    tokens_file: ConfigPath | None = None
    # Open requests (streams) get this long to finish when the daemon stops.
    shutdown_grace: Duration = 5.0


class DashboardSection(Section):
    # The operator's web page (README "Dashboard"), served by the HTTP API ([api]) at `path`
    # to tokens with the "dashboard" scope.
    enabled: bool = True
    path: str = Field(default="/dashboard", pattern=r"^/[A-Za-z0-9_\-/]*[A-Za-z0-9_\-]$")
    # How often the daemon samples its metrics for the charts, and how much it keeps.
    sample_interval: Duration = Field(default=1.0, gt=0)
    history: Duration = Field(default=600.0, gt=0)


McpToolGroup = Literal["agents", "devices", "schedules", "observability", "models"]


class McpSection(Section):
    # The MCP server (README "MCP"): on the API server at `path` when [api] is enabled.
    enabled: bool = True
    path: str = Field(default="/mcp", pattern=r"^/[\w./-]*$")
    # Built-in tool groups, each enabled by name (agents: list, state, call).
    tool_groups: list[McpToolGroup] = ["agents"]
    # Per agent class, @callable methods served as `<class>_<method>` tools besides those
    # marked @tool in the code.
    classes: dict[str, list[str]] = {}
    # Log lines kept in memory for the observability group's tools.
    log_lines: int = Field(default=1000, ge=0)
    # At most this many items per listing tool call (agents, devices, schedules ...).
    max_list_items: int = Field(default=200, ge=1)


class AgentClassSection(Section):
    # "package.module:ClassName"; `class` is a Python keyword, hence the alias.
    class_path: str = Field(alias="class", pattern=r"^[\w.]+:[\w.]+$")


class AgentsSection(Section):
    durability: Literal["normal", "full"] = "normal"
    hibernate_after: Duration = 10.0
    max_active: int = Field(default=10_000, ge=1)
    turn_timeout: Duration = 30.0
    max_db_size: Size = 1024**3
    max_message_size: Size = 1024**2
    max_mailbox_events: int = Field(default=1000, ge=1)
    max_pending_calls: int = Field(default=10_000, ge=1)
    # Outputs for devices (MQTT replies, TCP pushes) one agent may owe before its sending
    # turns fail (they are durable rows of its outbox; see DURABILITY.md).
    max_undelivered_outputs: int = Field(default=10_000, ge=1)
    python_path: list[ConfigPath] = []
    classes: dict[str, AgentClassSection] = {}


class WebSocketListener(Section):
    enabled: bool = True
    bind: Bind = ("127.0.0.1", 8765)
    max_frame_size: Size = 1024**2
    max_connections: int = Field(default=10_000, ge=1)
    protocol_messages: bool = True


class BinaryListener(Section):
    enabled: bool = False
    bind: Bind = ("127.0.0.1", 7878)
    agent_class: str = ""
    secrets_file: ExistingFile | None = None
    tls_cert_file: ExistingFile | None = None
    tls_key_file: ExistingFile | None = None
    max_frame_size: Size = 64 * 1024
    max_unacked: int = Field(default=64, ge=1)
    max_connections: int = Field(default=10_000, ge=1)
    hello_timeout: Duration = 10.0
    ping_interval: Duration = 30.0
    ping_timeout: Duration = 10.0
    protocol_messages: bool = False

    @model_validator(mode="after")
    def _needs_route_and_secrets(self) -> BinaryListener:
        if self.enabled and not self.agent_class:
            raise ValueError("agent_class is required when the binary listener is enabled")
        if self.enabled and self.secrets_file is None:
            raise ValueError("secrets_file is required when the binary listener is enabled")
        return self


class ListenersSection(Section):
    websocket: WebSocketListener = WebSocketListener()
    binary: BinaryListener = BinaryListener()


class MqttRouteSection(Section):
    topic: str = Field(pattern=r"\{id\}")
    agent_class: str
    reply_topic: str = ""
    # Admission of device ids (checked when an id has no open link); see README "MQTT".
    allowed_ids_file: ExistingFile | None = None
    allowed_id_pattern: str | None = None
    max_new_agents_per_minute: int = Field(default=600, ge=0)
    # When max_outbound_queue replies wait: "backpressure" (stop reading device messages,
    # drop nothing) or "drop_oldest" (drop this route's oldest queued reply; counted, logged).
    on_overflow: Literal["backpressure", "drop_oldest"] = "backpressure"


class MqttSection(Section):
    enabled: bool = False
    broker_urls: list[str] = ["mqtt://127.0.0.1:1883"]
    client_id: str = "gatewayd"
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    # The MQTT client library: "native" (protocols.mqttwire) or "aiomqtt" (paho); README "MQTT".
    client: Literal["native", "aiomqtt"] = "native"
    session_expiry: Duration = 86400.0
    keepalive: Duration = 30.0
    # QoS 2 is refused: paho keeps its receive state in memory only (not crash-safe).
    qos: Literal[0, 1] = 1
    username: str | None = None
    password: str | None = None
    password_file: ExistingFile | None = None
    ca_file: ExistingFile | None = None
    cert_file: ExistingFile | None = None
    key_file: ExistingFile | None = None
    tls_insecure: bool = False
    status_topic: str = "gatewayd/{client_id}/status"
    max_inflight_publishes: int = Field(default=100, ge=1)
    max_pending_messages: int = Field(default=1000, ge=1)
    max_inflight_per_device: int = Field(default=32, ge=1)
    max_outbound_queue: int = Field(default=10_000, ge=1)
    accept_retained: bool = False
    reconnect_min: Duration = 0.5
    reconnect_max: Duration = 30.0
    max_payload_size: Size = 256 * 1024
    protocol_messages: bool = False
    link_idle_timeout: Duration = 600.0
    max_attempts: int = Field(default=5, ge=0)
    routes: list[MqttRouteSection] = []

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttSection:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either password or password_file, not both")
        return self

    def resolved_password(self) -> str | None:
        """The password, read from `password_file` when one is given (first line, stripped).

        Raises ValueError naming the file when it is not UTF-8 or its first line is empty, and
        OSError when it cannot be read: `check_references` turns both into a config error."""
        if self.password_file is None:
            return self.password
        try:
            lines = self.password_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"password_file {self.password_file}: not UTF-8 text") from None
        password = lines[0].strip() if lines else ""
        if not password:
            raise ValueError(
                f"password_file {self.password_file}: the first line is empty; "
                "write the MQTT password on the first line of that file"
            )
        return password


class ModelSection(Section):
    path: ExistingFile
    providers: list[Literal["tensorrt", "cuda", "cpu"]] = ["cpu"]
    buckets: list[Annotated[int, Field(ge=1)]] = [1, 2, 4, 8, 16, 32, 64]
    max_queue_delay: Duration = 0.002
    queue_limit: int = Field(default=1024, ge=1)
    priority_levels: int = Field(default=4, ge=1)
    request_timeout: Duration = 1.0
    cpu_threads: int = Field(default=1, ge=0)
    cuda_graphs: bool = True
    trt_fp16: bool = True
    inline_max_run: Duration = 0.0  # engine.ModelSpec.inline_max_run_s; 0 = off
    inline_lone_requests: bool = True  # engine.ModelSpec.inline_lone_requests


class GeneratorSection(Section):
    """A local language model served by `engine.generate` (README "Local LLM generation").

    Exactly one source: `model` (a built-in recipe, fetched and converted once), `gguf` (any
    Llama-architecture GGUF file, converted once) or `onnx_dir` (an already converted model
    directory). The other keys default to `engine.generate.Generator`'s own defaults."""

    model: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    gguf: ExistingFile | None = None
    onnx_dir: ConfigPath | None = None
    # Weights of a converted model: "fp32" (dequantised) or "q4" (4-bit MatMulNBits).
    weights: Literal["fp32", "q4"] = "fp32"
    # Where `model`/`gguf` are converted (default: the model cache for `model`,
    # STATE_DIR/generators/NAME for `gguf`).
    cache_dir: ConfigPath | None = None
    max_batch: int = Field(default=16, ge=1)
    prefill_tokens: int = Field(default=256, ge=1)
    kv_cache_tokens: int = Field(default=8192, ge=1)
    block_size: int = Field(default=16, ge=1)
    prefix_cache: bool = True
    cpu_threads: int = Field(default=0, ge=0)
    # max_tokens of a request that sets none.
    max_tokens: int = Field(default=1024, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> GeneratorSection:
        given = [k for k in ("model", "gguf", "onnx_dir") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                'give exactly one of model (a built-in recipe such as "smollm2"), gguf (a '
                f"GGUF file) or onnx_dir (a converted model directory); found {given or 'none'}"
            )
        return self


class ClusterSection(Section):
    """Cluster mode (gatewayd/cluster): a group of gateways on NATS JetStream."""

    enabled: bool = False
    group: str = Field(default="gatewayd", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    member: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,64}$")
    servers: list[str] = Field(default=["nats://127.0.0.1:4222"], min_length=1)
    credentials_file: ExistingFile | None = None
    ca_file: ExistingFile | None = None
    cert_file: ExistingFile | None = None
    key_file: ExistingFile | None = None
    agent_class: str = ""
    ingest_subject: str = Field(default="gw.in", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    reply_subject: str = Field(default="gw.out", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    partitions: int = Field(default=16, ge=1, le=1024)
    replicas: int = Field(default=3, ge=1, le=5)
    lease: Duration = 8.0
    heartbeat: Duration = 2.0
    snapshot_every: int = Field(default=1000, ge=1)
    fetch_batch: int = Field(default=256, ge=1, le=10_000)
    # The host name or address other members and clients reach this member's listeners at
    # (advertised for routing); "" = each listener's bind host, or this machine's name when
    # it binds every interface.
    advertise_host: str = ""
    # The CA (PEM) the members' [listeners.binary] TLS certificates chain to: a member relays
    # a TLS device to its agent's owner over TLS, verifying the owner's certificate with it
    # (unset: the system's CAs). A TLS device is never relayed in plaintext.
    relay_ca_file: ExistingFile | None = None
    durable_replies: bool = True

    @model_validator(mode="after")
    def _coherent(self) -> ClusterSection:
        if self.enabled and not self.agent_class:
            raise ValueError("agent_class is required when cluster mode is enabled")
        if not 0 < self.heartbeat * 2 <= self.lease:
            raise ValueError(
                f"heartbeat ({self.heartbeat}s) must be more than 0 and at most half the lease "
                f"({self.lease}s)"
            )
        return self


class ChatBackendSection(Section):
    """[chat.backends.NAME]: a model for chat agents (README "Chat agents")."""

    kind: Literal["openai", "local", "echo", "scripted"]
    # openai: any OpenAI-compatible server (vLLM, llama.cpp, a cloud API).
    base_url: str | None = None
    model: str | None = None
    api_key_file: ConfigPath | None = None
    timeout: Duration = 60.0
    tool_calls: Literal["native", "prompt"] = "native"
    # local: a [generators.NAME] of this gateway.
    generator: str | None = None
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    # scripted: always answers this text (a stand-in model for demos and tests).
    reply: str = ""

    @model_validator(mode="after")
    def _needs_its_keys(self) -> ChatBackendSection:
        if self.kind == "openai" and (not self.base_url or not self.model):
            raise ValueError('kind = "openai" needs base_url and model')
        if self.kind == "local" and not self.generator:
            raise ValueError('kind = "local" needs generator (the name of a [generators.NAME])')
        return self


class ChatAgentSection(Section):
    """[chat.agents.CLASS]: the chat settings of the agent class CLASS ([agents.classes.CLASS])."""

    backend: str
    system_prompt: str | None = None
    max_steps: int = Field(default=10, ge=1)
    max_persisted_messages: int | None = Field(default=None, ge=1)
    # Code Mode (README "Code Mode"): one `code` tool instead of the agent's tools; unset: the
    # class's own `code_mode`.
    code_mode: bool | None = None


class ChatSection(Section):
    backends: dict[str, ChatBackendSection] = {}
    agents: dict[str, ChatAgentSection] = {}

    @model_validator(mode="after")
    def _agents_name_known_backends(self) -> ChatSection:
        for name, agent in self.agents.items():
            if agent.backend not in self.backends:
                known = ", ".join(sorted(self.backends)) or "none"
                raise ValueError(
                    f"chat.agents.{name}.backend: no backend named {agent.backend!r} "
                    f"(known: {known}; declare it as [chat.backends.{agent.backend}])"
                )
        return self


class CodeModeSection(Section):
    """[codemode]: the daemon's one Code Mode executor (README "Code Mode"), used by chat
    agents in Code Mode; its worker processes start on the first program."""

    workers: int = Field(default=2, ge=1)
    wall_time: Duration = Field(default=30.0, gt=0)
    cpu_time: Duration = Field(default=10.0, gt=0)
    heap_size: Size = Field(default=64 * 1024**2, gt=0)
    max_tool_calls: int = Field(default=1000, ge=1)


class GatewayConfig(Section):
    gateway: GatewaySection = GatewaySection()
    http: HttpSection = HttpSection()
    api: ApiSection = ApiSection()
    dashboard: DashboardSection = DashboardSection()
    mcp: McpSection = McpSection()
    agents: AgentsSection = AgentsSection()
    listeners: ListenersSection = ListenersSection()
    mqtt: MqttSection = MqttSection()
    models: dict[str, ModelSection] = {}
    generators: dict[str, GeneratorSection] = {}
    chat: ChatSection = ChatSection()
    codemode: CodeModeSection = CodeModeSection()
    cluster: ClusterSection = ClusterSection()

    @model_validator(mode="after")
    def _routes_name_known_classes(self) -> GatewayConfig:
        known = set(self.agents.classes)
        wanted = [("listeners.binary.agent_class", self.listeners.binary.agent_class)]
        wanted += [(f"chat.agents.{name}", name) for name in self.chat.agents]
        wanted += [
            (f"mqtt.routes.{i}.agent_class", r.agent_class) for i, r in enumerate(self.mqtt.routes)
        ]
        wanted += [(f"mcp.classes.{name}", name) for name in self.mcp.classes]
        for key, name in wanted:
            if name and name not in known:
                raise ValueError(
                    f"{key}: no agent class named {name!r} (known: {', '.join(sorted(known)) or 'none'};"
                    f" declare it as [agents.classes.{name}])"
                )
        return self


def load_config(path: Path | str) -> GatewayConfig:
    """Read, parse and validate the TOML file at `path`; raises ConfigError for any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(path, [f"cannot read the config file: {err.strerror or err}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(path, [f"not UTF-8 text ({err.reason} at byte {err.start})"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, [f"invalid TOML: {err}"]) from None
    return parse_config(data, path)


def parse_config(data: Mapping[str, Any], path: Path | str = "<config>") -> GatewayConfig:
    """Validate already-parsed TOML data (paths resolve relative to `path`'s directory)."""
    base_dir = Path(os.path.abspath(path)).parent
    try:
        return GatewayConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as err:
        raise ConfigError(path, [_describe(e) for e in err.errors()]) from None


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(part) for part in loc) or "(top level)"
    found = error.get("input")
    if error["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
        return f"{key}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in ("value_error", "assertion_error"):
        return f"{key}: {message}" if loc else message
    return f"{key}: {message}; found {found!r}"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """Names of the keys allowed in the table at `loc` (for did-you-mean suggestions)."""
    model: Any = GatewayConfig
    skip_next = False  # the next part is a list index or a user-chosen dict key
    for part in loc:
        if skip_next or isinstance(part, int):
            skip_next = False
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _section_type(field.annotation)
        if model is None:
            return []
        skip_next = getattr(field.annotation, "__origin__", None) in (dict, list)
    return [f.alias or name for name, f in model.model_fields.items()]


def _section_type(annotation: Any) -> Any:
    """The Section class inside an annotation such as `Section`, `list[Section]`, `dict[str, Section]`."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None
