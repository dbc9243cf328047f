"""Train and eval loss over steps, drawn with plotext, redrawn by the caller on a timer."""

from __future__ import annotations

from textual_plotext import PlotextPlot

from app.run_state import DownsampledSeries


class LossPlot(PlotextPlot):
    def __init__(self, title: str = "Loss", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.title = title

    def draw(self, curves: dict[str, DownsampledSeries], xlabel: str = "step") -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.title)
        plt.xlabel(xlabel)
        for label, series in curves.items():
            xs, ys = series.points()
            if xs:
                plt.plot(xs, ys, label=label, marker="braille")
        self.refresh()
