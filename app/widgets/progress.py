"""A ProgressBar whose bar stays exact when its width changes."""

from __future__ import annotations

from textual import events
from textual.widgets import ProgressBar


class StepProgress(ProgressBar):
    """Textual's Bar rounds the percentage to half-cells of its width at the moment it is set, so
    a step that arrives before the first layout, or before a terminal resize, keeps the rounding
    of the old width (a visibly wrong bar, and a flaky snapshot). Re-applying it on every resize
    rounds it for the width it is drawn at."""

    def on_resize(self, event: events.Resize) -> None:
        self.call_after_refresh(self._requantize)

    def _requantize(self) -> None:
        self.query_one("#bar").percentage = self.percentage  # the Bar that ProgressBar composes
