"""The daemon's lifecycle, readable top to bottom: startup -> serve -> drain -> stop.

`Daemon.run()` is all the CLI calls. systemd hears about each step over the notify protocol:
READY=1 only once every component is really up, STATUS= with live counters, WATCHDOG=1 while
healthy (the pings run on the event loop, so a stuck loop stops them), RELOADING=1/READY=1 around
a SIGHUP reload, STOPPING=1 on SIGTERM/SIGINT before the graceful drain.

Signals: the first SIGTERM/SIGINT stops start-up (e.g. a long model warm-up) or starts the
graceful drain, bounded by one deadline (`gateway.drain_timeout`); a second one exits at once
with status 128+signal. A reload that fails for any reason keeps the running configuration.
The daemon's own loops run under a `Supervisor`: one that crashes is logged and restarted, and
the daemon reports unhealthy (`/healthz`, watchdog) until it runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, NoReturn

from gatewayd import gctuning, wiring
from gatewayd.config import ConfigError, GatewayConfig, load_config
from gatewayd.http import HealthSnapshot, HttpEndpoint
from gatewayd.logs import set_level
from gatewayd.sd_notify import Notifier, watchdog_interval_s
from gatewayd.supervisor import Supervisor
from gatewayd.wiring import StartupError

log = logging.getLogger(__name__)

# How stale the loop's last health snapshot may be before /healthz calls the loop stuck.
LOOP_STALL_LIMIT_S = 5.0
HEARTBEAT_INTERVAL_S = 0.5
# Closing databases and files after the drain deadline may take this much longer; past it the
# shutdown is abandoned (logged) so systemd's stop timeout is never what ends the process.
CLOSE_MARGIN_S = 5.0


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
        self._started_at = time.monotonic()
        self.supervisor = Supervisor("daemon")

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        self._install_signal_handlers()
        startup = asyncio.create_task(self.startup(), name="startup")
        stop = asyncio.create_task(self._stop_requested.wait(), name="stop-requested")
        await asyncio.wait({startup, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not startup.done():
            # A signal during start-up (a model warm-up can take minutes): do not finish it.
            log.warning("stop requested during start-up: abandoning start-up and stopping")
            startup.cancel()
            await asyncio.wait({startup}, timeout=self.config.gateway.drain_timeout)
        stop.cancel()
        if not startup.done() or startup.cancelled():
            await self.shutdown()
            _exit_now_if_engine_threads_stuck(0)
            return 0
        err = startup.exception()
        if isinstance(err, StartupError | ConfigError):
            log.error("start-up failed: %s", err)
            self.notifier.notify(STATUS=f"start-up failed: {err}"[:200], ERRNO=1)
            await self.shutdown()
            return 1
        if err is not None:
            await self.shutdown()
            raise err
        await self.serve()
        await self.shutdown()
        _exit_now_if_engine_threads_stuck(0)
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
        self._publish_health()
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
            self.http = HttpEndpoint(host, port, stall_limit_s=LOOP_STALL_LIMIT_S)
        except OSError as err:
            raise StartupError(f"http: cannot listen on {host}:{port}: {err.strerror}") from None
        self.http.start()
        log.info(
            "http: serving /metrics, /healthz, /readyz", extra={"fields": {"port": self.http.port}}
        )

    # -- serve ---------------------------------------------------------------------------------

    async def serve(self) -> None:
        supervisor = self.supervisor
        # Health and watchdog keep running through the drain (shutdown() stops them last);
        # status, reload and gc end when the drain begins.
        supervisor.spawn("heartbeat", self._heartbeat_loop)
        interval = watchdog_interval_s()
        if interval is not None:
            log.info("systemd watchdog on", extra={"fields": {"ping_every_s": f"{interval:g}"}})
            supervisor.spawn("watchdog", lambda: self._watchdog_loop(interval))
        serving_only = [
            supervisor.spawn("status", self._status_loop),
            supervisor.spawn("reload", self._reload_loop),
            supervisor.spawn("gc", self._full_gc_loop),
        ]
        await self._stop_requested.wait()
        for task in serving_only:
            task.cancel()
        await asyncio.gather(*serving_only, return_exceptions=True)

    async def _heartbeat_loop(self) -> None:
        while True:
            self._publish_health()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _full_gc_loop(self) -> None:
        while True:
            await asyncio.sleep(gctuning.FULL_COLLECTION_INTERVAL_S)
            gctuning.collect_full()

    async def _watchdog_loop(self, interval_s: float) -> None:
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
        """Re-read the config and apply what can change live. A reload that fails for any
        reason keeps the running configuration, says why, and reports READY=1 again."""
        self.notifier.reloading()
        log.info("reloading configuration", extra={"fields": {"file": self.config_path}})
        try:
            # Reading files and importing agent modules: off the event loop.
            new = await asyncio.to_thread(self._load_checked, self.config_path)
        except ConfigError as err:
            log.error("reload rejected, keeping the running configuration: %s", err)
        except Exception as err:
            # A SyntaxError in an agent module, an unreadable file, a bug: never let it end
            # the reload loop (later SIGHUPs would be ignored) or leave systemd in "reloading".
            log.error(
                "reload failed, keeping the running configuration: %s: %s "
                "(fix the cause, then send SIGHUP again)",
                type(err).__name__,
                err,
                # A broken agent module or file names itself; anything else may be a bug.
                exc_info=None if isinstance(err, SyntaxError | OSError | UnicodeError) else err,
            )
        else:
            self._apply(new)
        finally:
            self.notifier.ready(self._status_line())

    def _load_checked(self, path: Path) -> GatewayConfig:
        new = load_config(path)
        if self.components is not None:
            self.components.check_reloadable(new)
        return new

    def _apply(self, new: GatewayConfig) -> None:
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

    # -- stop ----------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting work, drain in-flight work within the grace period, close.

        One deadline for the whole drain (`gateway.drain_timeout`): the components share it
        (transports, then agents, then the engine each get what is left), and closing gets
        `CLOSE_MARGIN_S` more before the shutdown is abandoned and logged."""
        self._stopping = True
        self._ready = False
        self._publish_health()
        self.notifier.stopping("draining")
        grace_s = self.config.gateway.drain_timeout
        log.info("stopping: draining in-flight work", extra={"fields": {"grace_s": f"{grace_s:g}"}})
        if self.components is not None:
            try:
                async with asyncio.timeout(grace_s + CLOSE_MARGIN_S):
                    await self.components.stop(grace_s)
            except TimeoutError:
                log.error(
                    "stopping: components did not close within the %gs grace period + %gs; "
                    "exiting anyway (SQLite is crash-safe: unacknowledged work is redelivered)",
                    grace_s,
                    CLOSE_MARGIN_S,
                )
        await self.supervisor.stop()
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
            self._force_exit(signum)
        log.info(
            "received %s: stopping gracefully (send it again to exit at once)",
            signal.Signals(signum).name,
        )
        self._stop_requested.set()
        # From now on a stop signal exits at once, even if the event loop is wedged (a loop
        # handler would then never run): Python's own handlers run on the main thread.
        loop = asyncio.get_running_loop()
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(stop_signal)
            signal.signal(stop_signal, lambda received, _frame: self._force_exit(received))

    def _force_exit(self, signum: int) -> NoReturn:
        code = 128 + signum
        log.critical(
            "received %s again while stopping: exiting now with status %d without finishing "
            "the drain; turns not yet committed are lost and devices resend what was not "
            "acknowledged",
            signal.Signals(signum).name,
            code,
        )
        self.notifier.notify(STATUS="forced exit")
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stderr.flush()
        os._exit(code)

    # -- health and status ---------------------------------------------------------------------

    def _publish_health(self) -> None:
        """Compute health on the loop (which owns every component) and hand the HTTP thread
        an immutable snapshot of it."""
        if self.http is None:
            return
        try:
            live, live_reason = self._live_check()
            ready, ready_reason = self._ready_check()
        except Exception as err:
            log.exception("health check failed")
            live, ready = False, False
            live_reason = ready_reason = f"health check failed: {type(err).__name__}: {err}"
        self.http.publish(HealthSnapshot(live, live_reason, ready, ready_reason, time.monotonic()))

    def _live_check(self) -> tuple[bool, str]:
        """Alive = every supervised loop is running and every component says it is healthy.
        (A stuck event loop is caught by what runs on it: no snapshots, no watchdog pings.)"""
        ok, reason = self.supervisor.healthy()
        if not ok:
            return ok, reason
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


def _exit_now_if_engine_threads_stuck(code: int) -> None:
    """An inference worker the engine had to abandon (a warm-up or run that cannot be
    interrupted, e.g. a TensorRT engine build) may still be inside native code; letting the
    interpreter finalise under it can crash the process at exit. Exit at once instead."""
    deadline = time.monotonic() + 1.0  # a worker that was stopped ends within microseconds
    stuck = []
    for thread in threading.enumerate():
        if thread.name.startswith("engine-"):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
    if not stuck:
        return
    log.warning(
        "exiting without waiting for inference threads still busy in native code: %s",
        ", ".join(stuck),
    )
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stderr.flush()
    os._exit(code)
