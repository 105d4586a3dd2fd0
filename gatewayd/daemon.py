"""The daemon's lifecycle, readable top to bottom: startup -> serve -> drain -> stop.

`Daemon.run()` is all the CLI calls. systemd hears about each step over the notify protocol:
READY=1 only once every component is really up, STATUS= with live counters, WATCHDOG=1 while
healthy (the pings run on the event loop, so a stuck loop stops them), RELOADING=1/READY=1 around
a SIGHUP reload, STOPPING=1 on SIGTERM/SIGINT before the graceful drain.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from typing import IO

from gatewayd import gctuning, wiring
from gatewayd.config import ConfigError, GatewayConfig, load_config
from gatewayd.http import HttpEndpoint
from gatewayd.logs import set_level
from gatewayd.sd_notify import Notifier, watchdog_interval_s
from gatewayd.wiring import StartupError

log = logging.getLogger(__name__)

# How stale the event loop's heartbeat may be before /healthz and the watchdog call it stuck.
LOOP_STALL_LIMIT_S = 5.0
HEARTBEAT_INTERVAL_S = 0.5


class Daemon:
    def __init__(self, config_path: Path, config: GatewayConfig) -> None:
        self.config_path = config_path
        self.config = config
        self.notifier = Notifier.from_environment()
        self.components: wiring.Components | None = None
        self.http: HttpEndpoint | None = None
        self._lock_file: IO[str] | None = None
        self._stop_requested = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._ready = False
        self._stopping = False
        self._heartbeat = time.monotonic()
        self._started_at = time.monotonic()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        self._install_signal_handlers()
        try:
            await self.startup()
        except (StartupError, ConfigError) as err:
            log.error("start-up failed: %s", err)
            self.notifier.notify(STATUS=f"start-up failed: {err}"[:200], ERRNO=1)
            await self.shutdown()
            return 1
        await self.serve()
        await self.shutdown()
        return 0

    # -- startup -------------------------------------------------------------------------------

    async def startup(self) -> None:
        self.notifier.status("starting")
        self._open_state_dir()
        self.components = wiring.Components(self.config, self.config_path)
        await self.components.start()  # engine warm-up, agent runtime, transports, in that order
        self._start_http()
        gctuning.tune_for_serving()
        self._ready = True
        elapsed = time.monotonic() - self._started_at
        log.info("ready", extra={"fields": {"startup_s": f"{elapsed:.3f}", **self._summary()}})
        self.notifier.ready(self._status_line())

    def _open_state_dir(self) -> None:
        state_dir = self.config.gateway.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(state_dir / "gatewayd.lock", "w")  # noqa: SIM115 - held for life
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(
                f"state directory {state_dir} is in use by another gatewayd process"
            ) from None
        except OSError as err:
            raise StartupError(f"cannot use state directory {state_dir}: {err}") from None
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def _start_http(self) -> None:
        if not self.config.http.enabled:
            return
        host, port = self.config.http.bind
        try:
            self.http = HttpEndpoint(host, port, live=self._live_check, ready=self._ready_check)
        except OSError as err:
            raise StartupError(f"http: cannot listen on {host}:{port}: {err.strerror}") from None
        self.http.start()
        log.info(
            "http: serving /metrics, /healthz, /readyz", extra={"fields": {"port": self.http.port}}
        )

    # -- serve ---------------------------------------------------------------------------------

    async def serve(self) -> None:
        tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._status_loop(), name="status"),
            asyncio.create_task(self._reload_loop(), name="reload"),
            asyncio.create_task(self._full_gc_loop(), name="gc"),
        ]
        interval = watchdog_interval_s()
        if interval is not None:
            tasks.append(asyncio.create_task(self._watchdog_loop(interval), name="watchdog"))
        await self._stop_requested.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _heartbeat_loop(self) -> None:
        while True:
            self._heartbeat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _full_gc_loop(self) -> None:
        while True:
            await asyncio.sleep(gctuning.FULL_COLLECTION_INTERVAL_S)
            gctuning.collect_full()

    async def _watchdog_loop(self, interval_s: float) -> None:
        log.info("systemd watchdog on", extra={"fields": {"ping_every_s": f"{interval_s:g}"}})
        while True:
            ok, reason = self._live_check()
            if ok:
                self.notifier.watchdog()
            else:
                log.error("watchdog ping withheld: %s", reason)
            await asyncio.sleep(interval_s)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gateway.status_interval)
            self.notifier.status(self._status_line())

    async def _reload_loop(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            await self.reload()

    async def reload(self) -> None:
        """Re-read the config; apply what can change live, keep the old config if invalid."""
        self.notifier.reloading()
        log.info("reloading configuration", extra={"fields": {"file": self.config_path}})
        try:
            new = load_config(self.config_path)
            if self.components is not None:
                self.components.check_reloadable(new)
        except ConfigError as err:
            log.error("reload rejected, keeping the running configuration: %s", err)
        else:
            restart_keys = wiring.keys_needing_restart(self.config, new)
            set_level(new.gateway.log_level)
            if self.components is not None:
                self.components.apply_live(new)
            self.config = wiring.with_live_settings(self.config, new)
            if restart_keys:
                log.warning(
                    "reload applied; these changes take effect after a restart: %s",
                    ", ".join(restart_keys),
                )
            else:
                log.info("reload applied", extra={"fields": {"log_level": new.gateway.log_level}})
        self.notifier.ready(self._status_line())

    # -- stop ----------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting work, drain in-flight work within the grace period, close."""
        self._stopping = True
        self._ready = False
        self.notifier.stopping("draining")
        grace_s = self.config.gateway.drain_timeout
        log.info("stopping: draining in-flight work", extra={"fields": {"grace_s": f"{grace_s:g}"}})
        if self.components is not None:
            await self.components.stop(grace_s)
        if self.http is not None:
            self.http.stop()
        if self._lock_file is not None:
            self._lock_file.close()
        self.notifier.status("stopped")
        self.notifier.close()
        log.info("stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)

    def _on_stop_signal(self, signum: int) -> None:
        if self._stop_requested.is_set():
            return
        log.info("received %s", signal.Signals(signum).name)
        self._stop_requested.set()

    # -- health and status ---------------------------------------------------------------------

    def _live_check(self) -> tuple[bool, str]:
        """Alive = the event loop is turning and every component says it is healthy."""
        stall_s = time.monotonic() - self._heartbeat
        if stall_s > LOOP_STALL_LIMIT_S:
            return False, f"event loop stalled for {stall_s:.1f}s"
        if self.components is not None:
            return self.components.health()
        return True, "starting"

    def _ready_check(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "stopping"
        if not self._ready:
            return False, "starting"
        if self.components is not None:
            return self.components.readiness()
        return True, "ready"

    def _summary(self) -> dict[str, object]:
        return self.components.summary() if self.components is not None else {}

    def _status_line(self) -> str:
        parts = [f"{key}={value}" for key, value in self._summary().items()]
        return ("serving " + " ".join(parts)).strip()[:250]


async def run_daemon(config_path: Path) -> int:
    config = load_config(config_path)
    return await Daemon(config_path, config).run()
