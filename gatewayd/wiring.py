"""Builds the running components from a `GatewayConfig` and starts/stops them in order.

Below the daemon: it never imports `gatewayd.daemon` (the daemon drives the components, not
the other way round; `StartupError` lives here for that reason).

Start: engine (models warmed) -> generators (LLMs loaded) -> agent runtime -> transports. Stop: transports stop accepting and
flush their acknowledgements -> the runtime drains and commits -> engine closes. This is the only
module that translates config sections into the components' own settings objects, and the config
model is the single source of defaults: the settings built from a config that sets nothing equal
each component's own defaults (tests/gatewayd/test_wiring.py), so a component used alone behaves
as the daemon does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from gatewayd.config import BinaryListener, GatewayConfig, MqttSection, WebSocketListener
from gatewayd.supervisor import Supervisor

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A component could not start; the message names it and says why."""


# Keys whose new value a SIGHUP applies without a restart.
LIVE_KEYS = ("gateway.log_level",)


class Transport(Protocol):
    async def start(self) -> None: ...
    async def stop(self, drain_timeout_s: float) -> None: ...


class Components:
    """Engine, agent runtime and transports of one daemon process."""

    def __init__(self, config: GatewayConfig, config_file: object = "<config>") -> None:
        self.config = config
        self.config_file = config_file
        self.engine: Any = None
        self.runtime: Any = None
        self.transports: dict[str, Any] = {}
        self.generators: dict[str, Any] = {}
        self.api: Any = None
        self.supervisor = Supervisor("transports")
        self.cluster: Any = None  # gatewayd.cluster.member.ClusterMember in cluster mode
        self.router: Any = None  # gatewayd.cluster.routing.Router in cluster mode
        self.routed_runtime: Any = None  # the runtime with calls routed to agents' owners
        self._rpc_server: Any = None
        self.codemode: Any = None  # the Code Mode executor, when a chat agent uses Code Mode

    async def start(self) -> None:
        """Engine (every bucket of every model warmed) -> agent runtime -> transports."""
        from gatewayd.agents import AgentRuntime

        classes = load_agent_classes(self.config, self.config_file)
        # (a class that is a ChatAgent has imported gatewayd.chat.agent)
        if self.config.chat.agents or "gatewayd.chat.agent" in sys.modules:
            from gatewayd.chat.config import configure_chat_classes

            # [chat.agents.CLASS]: configured chat agent classes; Code Mode ones share one
            # executor (its workers start on the first program)
            classes = configure_chat_classes(
                classes, self.config.chat, self.generators, self._code_executor
            )
        if self.config.models:
            from engine import EngineError

            self.engine = build_engine(self.config)
            try:
                await self.engine.start()
            except EngineError as err:  # a model file that will not load: name it, no traceback
                raise StartupError(str(err)) from None
        for name, section in self.config.generators.items():
            await self._start_generator(name, section)
        settings = agent_settings(self.config)
        if self.config.cluster.enabled:  # the agents' files are a cache of the group's log
            from gatewayd.cluster.member import ClusterMember

            ClusterMember.prepare_state_dir(cluster_state_dir(self.config))
            settings = dataclasses.replace(settings, state_dir=cluster_state_dir(self.config))
        self.runtime = AgentRuntime(
            settings, classes, engine=self.engine, generators=self.generators
        )
        await self.runtime.start()
        if self.config.cluster.enabled:
            if self.config.api.enabled:  # seconds of imports: before joining, not after
                _import_api_features()  # (they would stall the member's heartbeats)
            await self._start_cluster()
        for name, transport in build_transports(self.config, self.runtime).items():
            if hasattr(transport, "spawn_loop"):  # its background loops run supervised
                transport.spawn_loop = self.supervisor.spawn
            if self.router is not None and hasattr(transport, "router"):  # cluster: routed
                if name == "ws":
                    transport.router = self.router.ws_hook
                elif name == "tcp":
                    transport.router = self.router.tcp_hook
            try:
                await transport.start()
            except OSError as err:
                raise StartupError(f"{name}: cannot start listener: {err}") from None
            self.transports[name] = transport
        if self.config.api.enabled:
            await self._start_api()
        if self.router is not None:
            self.router.advertise(self._client_addresses())

    def _client_addresses(self) -> dict[str, str]:
        """Where clients and other members reach this member (its heartbeat carries them)."""
        from gatewayd.cluster.routing import advertised_host

        configured = self.config.cluster.advertise_host
        addresses = {}
        if "ws" in self.transports:
            host = advertised_host(self.config.listeners.websocket.bind[0], configured)
            addresses["ws"] = f"ws://{_url_host(host)}:{self.transports['ws'].bound_port}"
        if "tcp" in self.transports:  # TLS devices are relayed only to a TLS listener
            binary = self.config.listeners.binary
            host = advertised_host(binary.bind[0], configured)
            kind = "tcp" if binary.tls_cert_file is None else "tcp_tls"
            addresses[kind] = f"{_url_host(host)}:{self.transports['tcp'].bound_port}"
        if self.api is not None:
            host = advertised_host(self.config.api.bind[0], configured)
            addresses["api"] = f"http://{_url_host(host)}:{self.api.port}"
        return addresses

    def _code_executor(self) -> Any:
        if self.codemode is None:
            import importlib.util

            if importlib.util.find_spec("py_mini_racer") is None:
                raise StartupError(
                    "codemode: a chat agent uses Code Mode, which needs mini-racer "
                    "(scripts/setup cpu,codemode)"
                )
            from gatewayd.codemode import CodeExecutor

            self.codemode = CodeExecutor(
                codemode_limits(self.config), workers=self.config.codemode.workers
            )
        return self.codemode

    async def _start_generator(self, name: str, section: Any) -> None:
        """Prepare (fetch and convert once, with progress lines) and load one generator."""
        from gatewayd.generation.metrics import COLLECTOR
        from gatewayd.generation.prepare import PrepareError, start_generator

        def progress(message: str) -> None:
            log.info("generators: %s", message, extra={"fields": {"generator": name}})

        started = asyncio.get_running_loop().time()
        try:
            generator = await start_generator(
                name, section, self.config.gateway.state_dir, progress
            )
        except PrepareError as err:
            raise StartupError(str(err)) from None
        self.generators[name] = generator
        COLLECTOR.track(name, generator)
        log.info(
            "generators: %s loaded",
            name,
            extra={
                "fields": {
                    "model_dir": str(generator.model_dir),
                    "load_s": f"{asyncio.get_running_loop().time() - started:.2f}",
                }
            },
        )

    async def _start_api(self) -> None:
        from gatewayd.api import ApiServer, TokenFileError, Tokens, build_app

        section = self.config.api
        try:
            tokens = Tokens(section.tokens_file)
        except TokenFileError as err:
            raise StartupError(f"api: {err}") from None
        if not len(tokens):
            log.warning("api: no tokens configured (api.tokens_file): every request is refused")
        app, features = build_app(self, tokens)
        host, port = section.bind
        server = ApiServer(
            app, host, port, lifespans=[f.lifespan for f in features.values() if f.lifespan]
        )
        try:
            await server.start()
        except OSError as err:
            raise StartupError(f"api: cannot listen on {host}:{port}: {err.strerror}") from None
        self.api = server
        log.info(
            "api: serving %s",
            ", ".join(features) or "nothing",
            extra={"fields": {"port": server.port, "tokens": len(tokens)}},
        )

    async def _start_cluster(self) -> None:
        from gatewayd.cluster.member import ClusterMember
        from gatewayd.cluster.routing import relay_tls_context

        relay_ca = self.config.cluster.relay_ca_file
        try:  # before joining: a CA file that does not load stops the start here
            relay_tls = relay_tls_context(_str_or_none(relay_ca))
        except (OSError, ValueError) as err:  # (ssl.SSLError is an OSError)
            raise StartupError(f"cluster: relay_ca_file {relay_ca}: {err}") from None

        self.cluster = ClusterMember(
            cluster_settings(self.config), self.runtime, cluster_state_dir(self.config)
        )
        try:
            await self.cluster.start()
        except (OSError, TimeoutError) as err:
            raise StartupError(f"cluster: cannot join the group: {err}") from None
        from gatewayd.cluster.routing import Router
        from gatewayd.cluster.rpc import RoutedRuntime, RpcServer

        self.router = Router(self.cluster, relay_tls=relay_tls)
        self._rpc_server = RpcServer(self.router, self.runtime)
        await self._rpc_server.start()
        self.routed_runtime = RoutedRuntime(self.runtime, self.router)

    async def stop(self, drain_timeout_s: float) -> None:
        """Transports stop accepting and flush acks, then the runtime drains, then the engine.

        `drain_timeout_s` is one deadline for all of it: each stage gets what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s

        def left() -> float:
            return max(0.0, deadline - loop.time())

        if self.router is not None:  # relayed TCP devices: their listener no longer has them
            self.router.close_relays()
        stopping = [t.stop(left()) for t in self.transports.values()]
        if self.api is not None:
            stopping.append(self.api.stop(min(left(), self.config.api.shutdown_grace)))
        await asyncio.gather(*stopping, return_exceptions=True)
        if self._rpc_server is not None:
            await self._rpc_server.stop()
        if self.cluster is not None:  # partitions handed over before the runtime drains
            await self.cluster.stop(left())
        if self.runtime is not None:
            drained = await self.runtime.drain(left())
            if not drained:
                log.warning(
                    "drain timed out after %.1fs; uncommitted turns were abandoned", drain_timeout_s
                )
            await self.runtime.close()
        if self.codemode is not None:  # after the runtime: no program runs any more
            await self.codemode.close()
        if self.engine is not None:
            await self.engine.close(timeout_s=left())
        await self._close_generators(left())
        await self.supervisor.stop()

    async def _close_generators(self, timeout_s: float) -> None:
        from gatewayd.generation.metrics import COLLECTOR

        for name, generator in self.generators.items():
            COLLECTOR.untrack(name)
            closing = asyncio.ensure_future(asyncio.to_thread(generator.close))
            if not (await asyncio.wait({closing}, timeout=max(timeout_s, 0.1)))[0]:
                log.warning("generators: %s did not finish its requests in time", name)

    def check_reloadable(self, new: GatewayConfig) -> None:
        """Raise ConfigError when `new` cannot be applied (e.g. its agent classes do not import)."""
        check_references(new, self.config_file)

    def apply_live(self, new: GatewayConfig) -> None:
        """Apply the settings that may change without a restart (see LIVE_KEYS)."""

    def health(self) -> tuple[bool, str]:
        ok, reason = self.supervisor.healthy()
        if not ok:
            return ok, reason
        if self.runtime is not None and not self.runtime.healthy():
            return (
                False,
                "agent runtime unhealthy (a background loop is down or a commit is stuck; see the log)",
            )
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        mqtt = self.transports.get("mqtt")
        if mqtt is not None and not mqtt.connected:
            return False, f"mqtt: not connected to the broker ({mqtt.state})"
        return True, "ready"

    def summary(self) -> dict[str, object]:
        summary: dict[str, object] = {}
        if self.runtime is not None:
            stats = self.runtime.stats()
            summary["agents"] = stats.get("active_agents", 0)
            summary["turns"] = stats.get("turns_total", 0)
        for name, transport in self.transports.items():
            stats = transport.stats
            summary[f"{name}_links"] = stats.links_open
        if "mqtt" in self.transports:
            summary["mqtt"] = self.transports["mqtt"].state
        if self.engine is not None:
            summary["models"] = len(self.engine.model_names())
        if self.generators:
            summary["generators"] = len(self.generators)
        return summary


def agent_settings(config: GatewayConfig) -> Any:
    from gatewayd.agents import AgentSettings

    agents, listeners = config.agents, config.listeners
    return AgentSettings(
        state_dir=config.gateway.state_dir,
        durability=agents.durability,
        hibernate_after_s=agents.hibernate_after,
        max_active_agents=agents.max_active,
        turn_timeout_s=agents.turn_timeout,
        max_db_bytes=agents.max_db_size,
        max_message_bytes=agents.max_message_size,
        max_mailbox_events=agents.max_mailbox_events,
        max_pending_calls=agents.max_pending_calls,
        max_undelivered_outputs=agents.max_undelivered_outputs,
        protocol_messages_default={
            "ws": listeners.websocket.protocol_messages,
            "tcp": listeners.binary.protocol_messages,
            "mqtt": config.mqtt.protocol_messages,
        },
    )


def cluster_state_dir(config: GatewayConfig) -> Path:
    """Cluster mode's agent files: a cache of the partitions this member owns."""
    return config.gateway.state_dir / "cluster"


def cluster_settings(config: GatewayConfig) -> Any:
    from gatewayd.cluster import ClusterSettings

    c = config.cluster
    if c.agent_class and c.agent_class not in config.agents.classes:
        raise ValueError(f"agent_class: no agent class named {c.agent_class!r}")
    return ClusterSettings(
        agent_class=c.agent_class,
        group=c.group,
        member=c.member,
        servers=tuple(c.servers),
        credentials_file=_str_or_none(c.credentials_file),
        ca_file=_str_or_none(c.ca_file),
        cert_file=_str_or_none(c.cert_file),
        key_file=_str_or_none(c.key_file),
        ingest_subject=c.ingest_subject,
        reply_subject=c.reply_subject,
        partitions=c.partitions,
        replicas=c.replicas,
        lease_s=c.lease,
        heartbeat_s=c.heartbeat,
        snapshot_every=c.snapshot_every,
        fetch_batch=c.fetch_batch,
        durable_replies=c.durable_replies,
    )


def model_specs(config: GatewayConfig) -> list[Any]:
    """One `engine.ModelSpec` per `[models.NAME]`; the config supplies every default."""
    from engine import ModelSpec

    return [
        ModelSpec(
            name=name,
            path=model.path,
            providers=tuple(model.providers),
            buckets=tuple(model.buckets),
            max_queue_delay_s=model.max_queue_delay,
            queue_limit=model.queue_limit,
            priority_levels=model.priority_levels,
            request_timeout_s=model.request_timeout,
            intra_op_threads=model.cpu_threads,
            trt_fp16=model.trt_fp16,
            cache_dir=config.gateway.state_dir / "tensorrt" / name,
            cuda_graphs=model.cuda_graphs,
            inline_max_run_s=model.inline_max_run,
            inline_lone_requests=model.inline_lone_requests,
        )
        for name, model in config.models.items()
    ]


def build_engine(config: GatewayConfig) -> Any:
    from engine import Engine

    return Engine(model_specs(config))


def ws_settings(ws: WebSocketListener) -> Any:
    from protocols.ws import WsSettings

    host, port = ws.bind
    return WsSettings(
        bind=host,
        port=port,
        max_frame_bytes=ws.max_frame_size,
        max_connections=ws.max_connections,
    )


def build_transports(config: GatewayConfig, handler: Any) -> dict[str, Transport]:
    transports: dict[str, Transport] = {}
    ws = config.listeners.websocket
    if ws.enabled:
        from protocols.ws import WsListener

        transports["ws"] = WsListener(ws_settings(ws), handler)
    binary = config.listeners.binary
    if binary.enabled:
        transports["tcp"] = _tcp_listener(binary, handler)
    if config.mqtt.enabled:
        transports["mqtt"] = _mqtt_bridge(config, handler)
    return transports


def tcp_settings(binary: BinaryListener) -> Any:
    """The binary listener's settings, with the device secrets read from `secrets_file`."""
    from protocols.tcp import TcpSettings, load_secrets_file

    if binary.secrets_file is None:
        raise ValueError("secrets_file is required when the binary listener is enabled")
    host, port = binary.bind
    return TcpSettings(
        host=host,
        port=port,
        agent_class=binary.agent_class,
        secrets=load_secrets_file(binary.secrets_file),
        max_frame_bytes=binary.max_frame_size,
        max_unacked_window=binary.max_unacked,
        max_connections=binary.max_connections,
        hello_timeout_s=binary.hello_timeout,
        ping_interval_s=binary.ping_interval,
        ping_timeout_s=binary.ping_timeout,
    )


def _tcp_listener(binary: BinaryListener, handler: Any) -> Transport:
    import ssl

    from protocols.tcp import TcpListener

    settings = tcp_settings(binary)
    context = None
    if binary.tls_cert_file is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(binary.tls_cert_file, binary.tls_key_file)
    return TcpListener(settings, handler, ssl_context=context)


def _mqtt_bridge(config: GatewayConfig, handler: Any) -> Transport:
    from gatewayd.agents.storage import agent_db_path
    from protocols.dead_letters import DeadLetterStore
    from protocols.mqtt import MqttBridge

    state_dir = config.gateway.state_dir

    def known_agent(agent_class: str, agent_id: str) -> bool:
        return agent_db_path(state_dir, agent_class, agent_id).exists()

    return MqttBridge(
        mqtt_settings(config.mqtt),
        handler,
        dead_letters=DeadLetterStore(mqtt_dead_letters_path(config)),
        known_agent=known_agent,
    )


def mqtt_dead_letters_path(config: GatewayConfig) -> Path:
    """The MQTT dead-letter file (`gatewayd dead-letters` reads it)."""
    return config.gateway.state_dir / "mqtt-dead-letters.sqlite3"


def mqtt_settings(mqtt: MqttSection) -> Any:
    from protocols.mqtt_settings import MqttRoute, MqttSettings, load_id_list

    return MqttSettings(
        broker_urls=tuple(mqtt.broker_urls),
        client_id=mqtt.client_id,
        routes=tuple(
            MqttRoute(
                r.topic,
                r.agent_class,
                r.reply_topic,
                allowed_ids=(
                    None if r.allowed_ids_file is None else load_id_list(str(r.allowed_ids_file))
                ),
                allowed_id_pattern=r.allowed_id_pattern,
                max_new_agents_per_minute=r.max_new_agents_per_minute,
                on_overflow=r.on_overflow,
            )
            for r in mqtt.routes
        ),
        username=mqtt.username,
        password=mqtt.resolved_password(),
        ca_file=_str_or_none(mqtt.ca_file),
        cert_file=_str_or_none(mqtt.cert_file),
        key_file=_str_or_none(mqtt.key_file),
        tls_insecure=mqtt.tls_insecure,
        protocol=mqtt.protocol,
        client=mqtt.client,
        session_expiry_s=int(mqtt.session_expiry),
        keepalive_s=max(1, int(mqtt.keepalive)),
        qos=mqtt.qos,
        status_topic=mqtt.status_topic,
        reconnect_min_s=mqtt.reconnect_min,
        reconnect_max_s=mqtt.reconnect_max,
        max_inflight_publishes=mqtt.max_inflight_publishes,
        max_outbound_queue=mqtt.max_outbound_queue,
        max_pending_messages=mqtt.max_pending_messages,
        max_inflight_per_device=mqtt.max_inflight_per_device,
        max_payload_bytes=mqtt.max_payload_size,
        accept_retained=mqtt.accept_retained,
        link_idle_timeout_s=mqtt.link_idle_timeout,
        max_attempts=mqtt.max_attempts,
    )


def _import_api_features() -> None:
    import contextlib
    import importlib

    from gatewayd.api.features import FEATURES

    for feature in FEATURES:
        with contextlib.suppress(ImportError):  # reported when the API starts
            importlib.import_module(feature.target.partition(":")[0])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _str_or_none(path: Any) -> str | None:
    return None if path is None else str(path)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(value, "model_dump"):
        value = value.model_dump(by_alias=True)
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def keys_needing_restart(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """Dotted keys that differ between `old` and `new` and cannot be applied live."""
    before, after = _flatten(old), _flatten(new)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return sorted(k for k in changed if k not in LIVE_KEYS)


def with_live_settings(running: GatewayConfig, new: GatewayConfig) -> GatewayConfig:
    """The running config with the live-changeable keys taken from `new`."""
    gateway = running.gateway.model_copy(update={"log_level": new.gateway.log_level})
    return running.model_copy(update={"gateway": gateway})


def load_agent_classes(config: GatewayConfig, config_file: object = "<config>") -> dict[str, type]:
    """Import every `[agents.classes.NAME] class = "module:Class"`; ConfigError names the key."""
    import importlib
    import sys

    from gatewayd.config import ConfigError

    for path in config.agents.python_path:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    classes: dict[str, type] = {}
    problems: list[str] = []
    for name, section in config.agents.classes.items():
        key = f"agents.classes.{name}.class"
        module_name, _, attr_path = section.class_path.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for attr in attr_path.split("."):
                target = getattr(target, attr)
        except ImportError as err:
            problems.append(f"{key}: cannot import module {module_name!r}: {err}")
            continue
        except AttributeError:
            problems.append(f"{key}: module {module_name!r} has no attribute {attr_path!r}")
            continue
        problem = _agent_class_problem(target)
        if problem:
            problems.append(f"{key}: {section.class_path} {problem}")
            continue
        classes[name] = target
    if problems:
        raise ConfigError(str(config_file), problems)
    return classes


def _agent_class_problem(target: Any) -> str | None:
    from gatewayd.agents import Agent

    if not isinstance(target, type) or not issubclass(target, Agent):
        return "is not a subclass of gatewayd.Agent"
    return None


def codemode_limits(config: GatewayConfig) -> Any:
    """The Code Mode executor's `Limits` from `[codemode]` (the rest: `Limits`' defaults)."""
    from gatewayd.codemode import Limits

    section = config.codemode
    return Limits(
        wall_time_s=section.wall_time,
        cpu_time_s=section.cpu_time,
        heap_bytes=section.heap_size,
        max_tool_calls=section.max_tool_calls,
    )


def _chat_classes(config: GatewayConfig, config_file: object) -> Any:
    from gatewayd.chat.config import configure_chat_classes

    return configure_chat_classes(load_agent_classes(config, config_file), config.chat, {})


def check_references(config: GatewayConfig, config_file: object = "<config>") -> None:
    """Checks beyond the schema, shared by `check-config`, start-up and reload: agent classes
    import, the secrets file parses, every component accepts its settings."""
    from gatewayd.config import ConfigError

    load_agent_classes(config, config_file)
    checks: list[tuple[str, Callable[[], Any]]] = [("agents", lambda: agent_settings(config))]
    if config.listeners.binary.enabled:
        checks.append(("listeners.binary", lambda: _tcp_listener(config.listeners.binary, None)))
    if config.mqtt.enabled:
        checks.append(("mqtt", lambda: mqtt_settings(config.mqtt)))
    if config.models:
        checks.append(("models", lambda: build_engine(config)))
    if config.chat.agents:
        checks.append(("chat", lambda: _chat_classes(config, config_file)))
    if config.api.enabled and config.mcp.enabled and config.mcp.classes:
        checks.append(("mcp", lambda: _check_mcp_classes(config, config_file)))
    if config.generators:
        checks.append(("generators", lambda: _check_generators(config)))
    if config.cluster.enabled:
        checks.append(("cluster", lambda: cluster_settings(config)))
    problems = []
    for key, build in checks:
        try:
            build()
        except (ValueError, OSError) as err:
            problems.append(f"{key}: {err}")
    if problems:
        raise ConfigError(str(config_file), problems)


def _check_mcp_classes(config: GatewayConfig, config_file: object) -> None:
    from gatewayd.mcp.catalog import check_configured_methods

    try:
        check_configured_methods(load_agent_classes(config, config_file), config.mcp.classes)
    except ValueError as err:  # reported as "mcp: classes.NAME: ..."
        raise ValueError(str(err).removeprefix("mcp.")) from None


def _check_generators(config: GatewayConfig) -> None:
    from gatewayd.generation.prepare import check_section

    problems = []
    for name, section in config.generators.items():
        try:
            check_section(name, section)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("; ".join(problems))
