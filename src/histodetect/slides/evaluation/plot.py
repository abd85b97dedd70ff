"""The FROC figure: sensitivity against false positives per slide, rates of the challenge marked."""

from __future__ import annotations

import io

import numpy as np

from histodetect.slides.evaluation.froc import Froc


def froc_png(curve: Froc, title: str = "", note: str = "") -> bytes:
    """PNG bytes of the FROC curve, with the sensitivity at each challenge rate marked.

    Drawn on a bare matplotlib ``Figure`` with the Agg canvas: no pyplot state, so it is
    safe off the main thread and needs no display.

    Args:
        curve: The FROC.
        title: Figure title (the FROC score is added).
        note: A line under the title (e.g. "SYNTHETIC").
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    right = max(max(curve.rates), float(curve.fps[-1])) * 1.05
    # The challenge joins the points linearly and holds the last sensitivity beyond them;
    # each segment is sampled densely so that on the log-like axis the drawn curve is still
    # the linear interpolation the sensitivities are read from.
    knots_x = np.r_[curve.fps, right]
    knots_y = np.r_[curve.sensitivity, curve.sensitivity[-1]]
    xs = [knots_x[0]]
    ys = [knots_y[0]]
    for i in range(1, len(knots_x)):
        t = np.linspace(0, 1, 33)[1:]
        xs.extend(knots_x[i - 1] + t * (knots_x[i] - knots_x[i - 1]))
        ys.extend(knots_y[i - 1] + t * (knots_y[i] - knots_y[i - 1]))
    ax.plot(xs, ys, "-", color="black", lw=1.5, label="FROC")
    ax.plot(curve.rates, curve.at_rates, "o", color="tab:red", label="at 1/4 ... 8 FP/slide")
    for r, s in zip(curve.rates, curve.at_rates, strict=True):
        ax.annotate(f"{s:.2f}", (r, s), textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xscale("symlog", linthresh=0.25)
    ax.set_xticks(curve.rates)
    ax.set_xticklabels([f"{r:g}" for r in curve.rates])
    ax.set_xlim(0, right)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("average false positives per slide")
    ax.set_ylabel("lesion sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    heading = f"{title + ': ' if title else ''}FROC score {curve.score:.3f}"
    heading += f"  ({curve.n_lesions} lesions, {curve.n_slides} slides)"
    fig.suptitle(heading + (f"\n{note}" if note else ""), fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
