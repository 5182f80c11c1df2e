"""The report's plots, drawn with matplotlib (``Figure`` objects, no pyplot global state or GUI backend).

- latency per runtime, thread count and batch size, teacher against student (p50 bars, whisker to p90);
- accuracy against latency with the Pareto front (no other model is both faster and more accurate);
- the stage ledger: MACs and validation accuracy after each stage;
- the training curves of each distillation stage (val top-1 and train loss per epoch, the kept epoch marked).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from edgekd.bench.results import BenchmarkResult
from edgekd.report.schema import Report
from edgekd.runtimes.registry import RUNTIMES

#: one colour per model label, stable across plots
COLORS = {"teacher": "#4C72B0", "student": "#DD8452", "student-int8": "#55A868", "teacher-int8": "#8172B3"}
#: one marker per runtime (declared by its registry entry)
MARKERS = {entry.name: entry.marker for entry in RUNTIMES.values()}


@dataclass
class Plot:
    """A rendered figure; ``follows``: the start of the title of the table it belongs under in report.html
    (the report reads top-down, so each plot sits beside its numbers; unmatched plots go after the summary)."""

    title: str
    png: bytes
    follows: str = ""

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _grid(n_rows: int, n_cols: int, width: float, height: float) -> tuple[Figure, list[list]]:
    fig = Figure(figsize=(width * n_cols, height * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, [list(row) for row in axes]


def latency_plot(bench: BenchmarkResult) -> Plot | None:
    timed = [t for t in bench.timings if t.latency is not None]
    if not timed:
        return None
    threads = sorted({t.threads for t in timed})
    batches = sorted({t.batch_size for t in timed})
    runtimes = list(dict.fromkeys(t.runtime for t in timed))
    labels = [lab for lab in bench.labels() if any(t.label == lab for t in timed)]
    fig, axes = _grid(len(threads), len(batches), max(4.0, 1.6 * len(runtimes) + 1), 3.4)
    width = 0.8 / max(1, len(labels))
    for i, th in enumerate(threads):
        for j, bs in enumerate(batches):
            ax = axes[i][j]
            values = []
            for k, label in enumerate(labels):
                xs, p50, up = [], [], []
                for r, runtime in enumerate(runtimes):
                    e = next((t for t in timed if (t.runtime, t.threads, t.batch_size, t.label) ==
                              (runtime, th, bs, label)), None)
                    x = r + (k - (len(labels) - 1) / 2) * width
                    if e is None or e.latency is None:
                        ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=7, color="#888888",
                                rotation=90, transform=ax.get_xaxis_transform())
                        continue
                    xs.append(x)
                    p50.append(e.latency.p50_ms)
                    up.append(max(0.0, e.latency.p90_ms - e.latency.p50_ms))
                    if label != "teacher" and e.speedup_vs_teacher:
                        ax.annotate(f"{e.speedup_vs_teacher:.1f}x", (xs[-1], e.latency.p90_ms), ha="center",
                                    va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
                values += p50
                if xs:
                    ax.bar(xs, p50, width, yerr=[[0.0] * len(up), up], capsize=2, label=label,
                           color=COLORS.get(label, None), error_kw={"elinewidth": 0.8})
            if values and max(values) / max(min(values), 1e-9) > 30:
                ax.set_yscale("log")
            ax.set_xticks(range(len(runtimes)), runtimes, fontsize=8)
            ax.set_ylabel("p50 latency, ms (whisker: p90)", fontsize=8)
            ax.set_title(f"{th} thread{'s' * (th != 1)}, batch {bs}", fontsize=9)
            ax.tick_params(axis="y", labelsize=8)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Measured latency per runtime: teacher vs student (labels: speed-up over the teacher)",
                 fontsize=10)
    return Plot("Latency per runtime, thread count and batch size", _png(fig), follows="Teacher vs student")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (latency, accuracy) not dominated by a faster-or-equal, more-or-equally accurate other point;
    sorted by latency."""
    front: list[tuple[float, float]] = []
    best = float("-inf")
    for lat, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc))
            best = acc
    return front


def pareto_plot(bench: BenchmarkResult, split: str | None = None) -> Plot | None:
    """Top-1 against p50 latency per setting with the Pareto front; ``split`` names the samples the accuracy
    is on (the run's test split; None for a file benchmark, whose labels say nothing of a split)."""
    rows = []
    for t in bench.timings:
        model = bench.model(t.runtime, t.label)
        if t.latency is None or model is None or model.accuracy is None or model.accuracy.top1_pct is None:
            continue
        rows.append((t.threads, t.batch_size, t.runtime, t.label, t.latency.p50_ms, model.accuracy.top1_pct))
    if not rows:
        return None
    settings = sorted({(r[0], r[1]) for r in rows})
    cols = min(2, len(settings))
    n_rows = -(-len(settings) // cols)
    fig, axes = _grid(n_rows, cols, 5.0, 3.6)
    for idx, (th, bs) in enumerate(settings):
        ax = axes[idx // cols][idx % cols]
        here = [r for r in rows if (r[0], r[1]) == (th, bs)]
        for _, _, runtime, label, lat, acc in here:
            ax.scatter(lat, acc, marker=MARKERS.get(runtime, "o"), color=COLORS.get(label, "#777777"), s=40,
                       edgecolors="black", linewidths=0.4, zorder=3, alpha=0.9)
        front = pareto_front([(r[4], r[5]) for r in here])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="#C44E52", linewidth=1.2,
                zorder=2)
        lats = [r[4] for r in here]
        if max(lats) / max(min(lats), 1e-12) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(f"p50 latency, ms ({th} thread{'s' * (th != 1)}, batch {bs})", fontsize=8)
        ax.set_ylabel(f"{split + ' ' if split else ''}top-1, %", fontsize=8)
        ax.tick_params(labelsize=8)
    for idx in range(len(settings), n_rows * cols):
        axes[idx // cols][idx % cols].set_visible(False)
    # one legend for the figure: marker = runtime, colour = model, red line = Pareto front
    handles = [Line2D([], [], linestyle="", marker=MARKERS.get(rt, "o"), color="#999999", markeredgecolor="black",
                      label=rt) for rt in dict.fromkeys(r[2] for r in rows)]
    handles += [Line2D([], [], linestyle="", marker="s", color=COLORS.get(lab, "#777777"), label=lab)
                for lab in dict.fromkeys(r[3] for r in rows)]
    handles.append(Line2D([], [], color="#C44E52", label="Pareto front"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    fig.suptitle("Accuracy against measured latency (marker: runtime; colour: model)", fontsize=10)
    return Plot("Accuracy against latency, with the Pareto front", _png(fig), follows="Teacher vs student")


def ledger_plot(report: Report) -> Plot | None:
    rows = [r for r in report.ledger if r.macs is not None]
    if len(rows) < 2:
        return None
    fig = Figure(figsize=(max(4.5, 1.1 * len(rows) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    names = [r.stage for r in rows]
    ax.bar(range(len(rows)), [r.macs / 1e6 for r in rows], color="#4C72B0", alpha=0.8, label="MMACs / sample")
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylabel("MMACs / sample", fontsize=8)
    ax.tick_params(labelsize=8)
    split = "test" if any(r.test_accuracy is not None for r in rows) else "val"
    accs = [(i, getattr(r, f"{split}_accuracy")) for i, r in enumerate(rows)
            if getattr(r, f"{split}_accuracy") is not None]
    if accs:
        ax2 = ax.twinx()
        ax2.plot([a[0] for a in accs], [a[1] for a in accs], "o-", color="#DD8452", label=f"{split} top-1 %")
        ax2.set_ylabel(f"{split} top-1, %", fontsize=8)
        ax2.tick_params(labelsize=8)
    fig.suptitle("Stage ledger: compute and accuracy after each stage", fontsize=10)
    return Plot("Stage ledger", _png(fig), follows="Stage ledger")


def training_curves_plot(report: Report) -> Plot | None:
    """Val top-1 and train loss per epoch of every distillation stage with at least two epochs (one panel each)."""
    stages = [(key, data) for key, data in report.stage_entries("distill")
              if isinstance(data, dict) and len(data.get("history") or []) >= 2]
    if not stages:
        return None
    fig, axes = _grid(1, len(stages), 4.6, 3.2)
    for ax, (key, data) in zip(axes[0], stages, strict=True):
        hist = data["history"]
        epochs = [h.get("epoch") for h in hist]
        val = [h.get("val_accuracy") for h in hist]
        ax.plot(epochs, val, "o-", color="#DD8452", label="val top-1 %", markersize=3)
        kept = data.get("best_epoch")
        if kept in epochs and val[epochs.index(kept)] is not None:
            ax.plot([kept], [val[epochs.index(kept)]], "*", color="#C44E52", markersize=11, label=f"kept (epoch {kept})")
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("val top-1, %", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.set_title(key, fontsize=9)
        loss = [(e, h.get("train_loss")) for e, h in zip(epochs, hist, strict=True) if h.get("train_loss") is not None]
        if loss:
            ax2 = ax.twinx()
            ax2.plot([e for e, _ in loss], [v for _, v in loss], "s--", color="#4C72B0", markersize=3,
                     label="train loss")
            ax2.set_ylabel("train loss", fontsize=8)
            ax2.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Distillation: val top-1 and train loss per epoch", fontsize=10)
    return Plot("Distillation training curves", _png(fig), follows="Distillation epochs")


def all_plots(report: Report) -> list[Plot]:
    plots = []
    if report.benchmark is not None:
        plots += [latency_plot(report.benchmark),
                  pareto_plot(report.benchmark, (report.accuracy_splits or {}).get("benchmark.accuracy"))]
    plots += [ledger_plot(report), training_curves_plot(report)]
    return [p for p in plots if p is not None]
