"""Line charts of the toy world's measurements (the split sweep, the model's spectrum): one plotting path,
matplotlib (the ``plot`` extra), written atomically."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..files import atomic_write


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    colour: str = "black"
    style: str = "-o"  # matplotlib format: "-o" line with dots, "o" dots only, "--" dashes
    width: float = 1.5


@dataclass
class Panel:
    title: str
    xlabel: str
    series: list[Series]
    ylabel: str = ""
    xticks: Sequence[int] = ()
    marks: list[float] = field(default_factory=list)  # x positions of thin grey vertical lines (e.g. a default split)


def line_panels(panels: list[Panel], path: Path, width: float = 4.0, height: float = 3.2) -> None:
    """Panels side by side, y in [0, 1], one legend per panel; a PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("charts need matplotlib: pip install 'prospect-spectrum[plot]'") from err
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for x in panel.marks:
            ax.axvline(x, color="0.75", linewidth=1)
        for s in panel.series:
            ax.plot(s.xs, s.ys, s.style, color=s.colour, linewidth=s.width, markersize=3, label=s.label)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel, ylim=(-0.03, 1.03))
        if panel.xticks:
            ax.set_xticks(list(panel.xticks))
        ax.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
