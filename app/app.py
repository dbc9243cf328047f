"""The packtrain App: screen flow, the engine worker, and quitting safely while an engine trains.

One app-scoped worker (group "engine", exclusive) follows the engine on screen. It folds events
into a RunState and posts EngineUpdate, which `can_replace` an older pending one, so the UI
repaints per batch of events rather than per event however fast the engine logs.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.worker import Worker

from app import engine_client
from app.draft import default_config
from app.engine_client import EngineGone, EngineHandle
from app.run_state import RunState
from app.screens.cache import CacheJob, CacheScreen
from app.screens.checkpoints import CheckpointsScreen
from app.screens.config_form import ConfigFormScreen
from app.screens.dashboard import DashboardScreen
from app.screens.environment import EnvironmentScreen
from app.screens.modals import QuitScreen
from app.screens.naming import NamingScreen
from app.workers import ReportsWorkerFailures
from engine import catalog as disk_catalog
from engine.config import RunConfig
from engine.errors import os_error_line
from engine.paths import Layout


class EngineUpdate(Message):
    """New events were folded into `state`; only the newest pending update needs handling."""

    def __init__(self, state: RunState) -> None:
        super().__init__()
        self.state = state

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EngineUpdate) and message.state is self.state


class PacktrainApp(ReportsWorkerFailures, App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "packtrain"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", show=False, priority=True)]

    def __init__(
        self, layout: Layout | None = None, *, base_config: RunConfig | None = None,
        catalog: ModuleType | Any = None,
    ) -> None:
        super().__init__()
        self.layout = layout or Layout.resolve()
        self.base_config = base_config
        self.catalog = catalog or disk_catalog
        self.hardware: dict[str, Any] | None = None
        self.handle: EngineHandle | None = None
        self.run_state: RunState | None = None

    def on_mount(self) -> None:
        self.push_screen(EnvironmentScreen())

    # --- navigation ----------------------------------------------------------------------------
    def show_home(self) -> None:
        """Back to the checkpoint list, closing whatever is above it."""
        home = next((s for s in self.screen_stack if isinstance(s, CheckpointsScreen)), None)
        if home is None:
            self.switch_screen(CheckpointsScreen())
            return
        while self.screen is not home:
            self.pop_screen()

    def open_new_training(self) -> None:
        self.push_screen(NamingScreen(default_config(self.hardware, self.base_config)))

    def open_config_form(self, draft: RunConfig) -> None:
        self.push_screen(ConfigFormScreen(draft))

    def open_cache_for_new(self, cfg: RunConfig, config_file: Path) -> None:
        self.push_screen(CacheScreen(CacheJob.for_new(self.layout, cfg, config_file)))

    def open_resume(self, entry: Any) -> None:
        self.push_screen(CacheScreen(CacheJob.for_resume(self.layout, entry)))

    # --- engines -------------------------------------------------------------------------------
    def start_engine(self, model: str, *args: str) -> None:
        try:
            handle = engine_client.spawn_engine(self.layout, model, *args)
        except OSError as e:
            self.notify(f"could not start the engine: {os_error_line(e)}", severity="error", markup=False)
            return
        self._watch(handle)

    def attach(self, model: str) -> None:
        handle = engine_client.attach_handle(self.layout, model)
        if handle is None:
            self.notify(f"No engine is training {model} any more.", severity="warning")
            return
        self._watch(handle)

    def _watch(self, handle: EngineHandle) -> None:
        self.handle = handle
        self.run_state = RunState(model=handle.model)
        self.follow_engine(handle, self.run_state)
        self.show_home()
        self.push_screen(DashboardScreen(self.run_state))

    @work(exclusive=True, group="engine", exit_on_error=False)
    async def follow_engine(self, handle: EngineHandle, state: RunState) -> None:
        try:
            async for batch in engine_client.tail_events(self.layout, handle):
                state.apply(batch)
                self.post_message(EngineUpdate(state))
        except EngineGone as e:
            state.fail(str(e), e.lines)
            self.post_message(EngineUpdate(state))

    def worker_failed(self, worker: Worker[Any], message: str) -> None:
        """The dashboard following the engine says it failed (an unreadable log, say) instead of freezing."""
        if worker.group == "engine" and self.run_state is not None:
            self.run_state.fail(f"cannot follow the engine: {message}", [])
            self.post_message(EngineUpdate(self.run_state))
        else:
            super().worker_failed(worker, message)

    def on_engine_update(self, message: EngineUpdate) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, DashboardScreen) and screen.state is message.state:
                screen.update_view()

    def send_engine_command(self, command: str) -> None:
        if self.handle is not None:
            try:
                engine_client.send(self.layout, self.handle.model, command)
            except OSError as e:
                self.notify(f"Could not send {command!r} to the engine: {e.strerror or e}", severity="error")

    def detach(self) -> None:
        """Stop following; the engine keeps training and can be re-attached from the list."""
        self.workers.cancel_group(self, "engine")
        self.handle = None
        self.show_home()

    def _engine_running(self) -> bool:
        return (self.handle is not None and self.run_state is not None and self.run_state.active
                and self.handle.alive())

    async def action_quit(self) -> None:
        if not self._engine_running():
            self.exit()
            return
        assert self.handle is not None

        def chosen(choice: str | None) -> None:
            if choice == "stop":
                self.send_engine_command("stop")
            if choice in ("stop", "detach"):
                self.exit()

        self.push_screen(QuitScreen(self.handle.model), chosen)
