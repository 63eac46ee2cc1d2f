"""Figures of layer selection and of the analyses in :mod:`actedit.eval.analysis`, written as PNG files.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): no display is needed, and the global pyplot
backend of the calling program is left alone. Every function takes the analysis result and a
path, creates the parent folder, writes the PNG and returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

PathLike = Union[str, Path]

_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def _figure(width: float, height: float):
    # lazy: matplotlib takes about a second to import and only plotting needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # lazy: as above

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_norms(
    comparison,
    path: PathLike,
    layers: Optional[Sequence[int]] = None,
    title: Optional[str] = None,
    show_outliers: bool = False,
    log_scale: bool = False,
) -> Path:
    """Box plots of the activation norms per layer, base and each edit side by side (HPR Fig. 3/4).

    Args:
        comparison: an :class:`~actedit.eval.analysis.NormComparison`.
        path: PNG file to write.
        layers: subset of layers to draw (default: all measured layers).
        title: figure title (default names the component and the token count).
        show_outliers: draw points beyond the whiskers (1.5 IQR); off by default as in the paper.
        log_scale: logarithmic y axis (when an edit multiplies the norms, or the BOS token's
            massive activations are drawn).
    """
    profiles = comparison.profiles
    layers = list(layers) if layers is not None else comparison.layers
    missing = [layer for layer in layers if layer not in comparison.layers]
    if missing:
        raise ValueError(f"layers {missing} were not measured; measured: {comparison.layers}.")
    n = len(profiles)
    width = 0.8 / n
    fig = _figure(max(6.0, 0.45 * len(layers) * max(n, 2) + 1.5), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    for j, (label, profile) in enumerate(profiles.items()):
        positions = [i + (j - (n - 1) / 2) * width for i in range(len(layers))]
        color = _COLORS[j % len(_COLORS)]
        box = ax.boxplot(
            [profile.norms[layer] for layer in layers],
            positions=positions,
            widths=width * 0.9,
            patch_artist=True,
            showfliers=show_outliers,
            manage_ticks=False,
            medianprops={"color": "black", "linewidth": 1},
        )
        for patch in box["boxes"]:
            patch.set_facecolor(color)
            patch.set_alpha(0.75)
        handles.append((box["boxes"][0], label))
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([str(layer) for layer in layers], fontsize=8 if len(layers) > 20 else 10)
    ax.set_xlabel("layer")
    ax.set_ylabel("activation L2 norm")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title or f"{comparison.base.component} norms over {comparison.base.n_tokens} tokens")
    ax.legend([h for h, _ in handles], [lbl for _, lbl in handles], loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_flips(tables: Mapping[str, Any], path: PathLike, title: Optional[str] = None) -> Path:
    """Stacked horizontal bars of the four flip outcomes per edit (HPR Table 3 as a figure).

    ``tables`` maps an edit name to its :class:`~actedit.eval.analysis.FlipTable`.
    """
    if not tables:
        raise ValueError("plot_flips() needs at least one flip table.")
    parts = [
        ("remains_true", "remains True", "#55A868"),
        ("false_to_true", "False → True", "#8FD18F"),
        ("true_to_false", "True → False", "#E08080"),
        ("remains_false", "remains False", "#C44E52"),
    ]
    names = list(tables)
    fig = _figure(7.5, 1.6 + 0.55 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    left = [0.0] * len(names)
    for attr, label, color in parts:
        values = [getattr(tables[name], attr) for name in names]
        ax.barh(names, values, left=left, color=color, label=label)
        for i, v in enumerate(values):
            if v >= 6:
                ax.text(left[i] + v / 2, i, f"{v:.1f}", ha="center", va="center", fontsize=8)
        left = [a + b for a, b in zip(left, values, strict=True)]
    for i, name in enumerate(names):
        ax.text(101, i, f"acc {tables[name].accuracy:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 115)
    ax.invert_yaxis()
    ax.set_xlabel("% of questions")
    ax.set_title(title or "prediction flips against the base model")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, fontsize=8, frameon=False)
    return _save(fig, path)


def plot_layer_count(curve, path: PathLike, title: Optional[str] = None, ylabel: str = "score") -> Path:
    """Grouped bars of each metric for k = 1..K edited layers, base scores as lines (HPR Fig. 6).

    ``curve`` is an :class:`~actedit.eval.analysis.LayerCountCurve`.
    """
    metrics = curve.metrics
    n = len(metrics)
    width = 0.8 / n
    fig = _figure(max(5.0, 0.5 * len(curve.ks) * n + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for j, metric in enumerate(metrics):
        color = _COLORS[j % len(_COLORS)]
        positions = [i + (j - (n - 1) / 2) * width for i in range(len(curve.ks))]
        ax.bar(positions, curve.scores[metric], width=width * 0.95, color=color, label=metric)
        if metric in curve.baseline:
            ax.axhline(curve.baseline[metric], color=color, linestyle="--", linewidth=1.2, label=f"{metric} base")
    ax.set_xticks(range(len(curve.ks)))
    ax.set_xticklabels([str(k) for k in curve.ks])
    ax.set_xlabel("number of edited layers k (top-k by rank)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "score vs number of edited layers")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_per_layer(
    values: Mapping[int, float],
    ylabel: str,
    path: PathLike,
    *,
    title: Optional[str] = None,
    highlight: Optional[Sequence[int]] = None,
    baseline: Optional[float] = None,
    kind: str = "bar",
) -> Path:
    """One value per layer (probe accuracy, drift, ...), as bars (default) or a line.

    Args:
        values: layer → value.
        ylabel: y-axis label.
        path: PNG file to write.
        title: figure title.
        highlight: layers drawn in a second colour (e.g. the selected top-k).
        baseline: a horizontal reference line (e.g. chance accuracy 0.5).
        kind: ``"bar"`` or ``"line"``.
    """
    if not values:
        raise ValueError("plot_per_layer() needs at least one value.")
    if kind not in ("bar", "line"):
        raise ValueError(f"kind must be 'bar' or 'line', got {kind!r}.")
    layers = sorted(int(k) for k in values)
    ys = [float(values[layer]) for layer in layers]
    marked = {int(x) for x in (highlight or ())}
    fig = _figure(max(5.0, 0.25 * len(layers) + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    if kind == "bar":
        colors = [_COLORS[1] if layer in marked else _COLORS[0] for layer in layers]
        ax.bar(layers, ys, color=colors)
    else:
        ax.plot(layers, ys, marker="o", color=_COLORS[0])
        if marked:
            ax.scatter(
                [x for x in layers if x in marked],
                [values[x] for x in layers if x in marked],
                color=_COLORS[1],
                zorder=3,
                label="selected",
            )
            ax.legend(fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_drift(comparison, path: PathLike, title: Optional[str] = None) -> Path:
    """Mean relative norm drift |‖h'‖ − ‖h‖| / ‖h‖ per layer, one line per edit (in %)."""
    drift = comparison.drift()
    if not drift:
        raise ValueError("the comparison holds no edits.")
    fig = _figure(max(5.0, 0.25 * len(comparison.layers) + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for j, (name, per_layer) in enumerate(drift.items()):
        layers = sorted(per_layer)
        ax.plot(
            layers,
            [100 * per_layer[layer] for layer in layers],
            marker="o",
            color=_COLORS[(j + 1) % len(_COLORS)],
            label=name,
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("mean relative norm drift (%)")
    ax.set_title(title or "norm drift against the base model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_scores(
    methods: Mapping[str, Mapping[str, float]],
    path: PathLike,
    title: Optional[str] = None,
    metrics: Sequence[str] = ("mc1", "mc2"),
    task: str = "TruthfulQA",
) -> Path:
    """Grouped bars of a task's metrics (%) per model with ± stderr whiskers (the study's headline).

    ``methods`` maps a name (``base``, each edit) to a dict with each metric and its
    ``<metric>_stderr`` (fractions).
    """
    if not methods:
        raise ValueError("plot_scores() needs at least one model's scores.")
    names = list(methods)
    fig = _figure(max(5.0, 1.1 * len(names) + 2.0), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.76 / len(metrics)
    for k, metric in enumerate(metrics):
        offset, color = (k - (len(metrics) - 1) / 2) * width, _COLORS[k % len(_COLORS)]
        values = [100 * methods[n][metric] for n in names]
        errors = [100 * methods[n][f"{metric}_stderr"] for n in names]
        xs = [i + offset for i in range(len(names))]
        ax.bar(xs, values, width=width, yerr=errors, capsize=3, color=color, label=metric.upper())
        for x, v in zip(xs, values, strict=True):
            ax.text(x, v + 1.0, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel(f"{task} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or f"{task} {' / '.join(m.upper() for m in metrics)} per model (± stderr)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_layer_accuracy(
    accuracy: Mapping[int, float],
    path: PathLike,
    *,
    selected: Sequence[int] = (),
    title: Optional[str] = None,
    chance: float = 0.5,
) -> Path:
    """Bar plot of eval probe accuracy per layer as PNG: the selected layers highlighted, chance
    level dashed (:func:`plot_per_layer`)."""
    if not accuracy:
        raise ValueError("no layer accuracies to plot.")
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"the plot is written as PNG; give a path ending in .png, got {Path(path).name!r}.")
    return plot_per_layer(
        accuracy,
        "eval probe accuracy",
        path,
        title=title or "Probe accuracy per layer",
        highlight=selected,
        baseline=chance,
    )


def plot_layer_selection(metadata: Mapping, artifact: PathLike) -> Optional[Path]:
    """The per-layer score plot of an edit that selected its layers (its metadata holds
    ``layer_selection``), written beside its artifact as ``<artifact>_<metric>.png``
    (``probe_accuracy``, or ``eval_loss`` for a method without a probe); None for an edit
    without a selection or whose layers were fixed."""
    selection = metadata.get("layer_selection")
    if not selection:
        return None
    metric = selection.get("metric", "probe_accuracy")
    scores = {int(layer): float(v) for layer, v in (selection.get("scores") or selection.get("accuracy") or {}).items()}
    if not scores or metric == "fixed":
        return None
    artifact = Path(artifact)
    path = artifact.parent / f"{artifact.name}_{metric}.png"
    selected = [int(x) for x in selection["selected"]]
    if metric == "probe_accuracy":
        return plot_layer_accuracy(scores, path, selected=selected)
    return plot_per_layer(scores, "eval loss (lower is better)", path, title="Eval loss per layer", highlight=selected)


def plot_sweep_tradeoff(
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    path: PathLike,
    *,
    metric: str,
    splits: Sequence[str],
    chosen: Mapping[str, Optional[str]],
    base: Optional[Mapping[str, float]] = None,
    max_kl: Optional[float] = None,
) -> Path:
    """A sweep's trade-off, one panel per split (the choice split first): each point's ``metric``
    (%) against its KL to the base model on neutral text (log scale), one colour per row (its
    points along the strength axis joined by a line), each row's chosen point ringed, the base
    model's score and the KL budget dashed.

    ``rows``: row → its points (``id``, ``axis``, ``kl``, ``scores[split][metric]``); ``chosen``:
    row → the chosen point's id (None where no point met the rule)."""
    fig = _figure(5.2 * len(splits), 4.2)
    for s, split in enumerate(splits):
        ax = fig.add_subplot(1, len(splits), s + 1)
        for k, (row, points) in enumerate(rows.items()):
            color = _COLORS[k % len(_COLORS)]

            def kl(p: Mapping[str, Any]) -> float:
                return max(float(p["kl"]), 1e-6)  # a log axis: an exact zero drawn at 1e-6

            ax.scatter(
                [kl(p) for p in points],
                [100 * p["scores"][split][metric] for p in points],
                s=16,
                color=color,
                label=row,
                zorder=3,
            )
            curve = sorted((p for p in points if p["axis"] in ("strength", "default")), key=kl)
            if len(curve) > 1:
                ax.plot([kl(p) for p in curve], [100 * p["scores"][split][metric] for p in curve], color=color, lw=1)
            for p in points:
                if p["id"] == chosen.get(row):
                    ax.scatter(
                        [kl(p)], [100 * p["scores"][split][metric]], s=150, facecolors="none", edgecolors=color, lw=1.5
                    )
        if base and split in base:
            ax.axhline(100 * base[split], color="#555555", ls="--", lw=1, label="base model")
        if max_kl is not None:
            ax.axvline(max_kl, color="#C44E52", ls=":", lw=1, label="KL budget")
        ax.set_xscale("log")
        ax.set_xlabel("KL(base ‖ edited) on neutral text (nats/token)")
        ax.set_ylabel(f"{metric.upper()} on {split} (%)")
        ax.set_title(f"{split}{' (chosen on)' if s == 0 else ''}: chosen points ringed")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sweep_axis(
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    path: PathLike,
    *,
    axis: str,
    metric: str,
    splits: Sequence[str],
    base: Optional[Mapping[str, float]] = None,
) -> Path:
    """``metric`` (%) against one swept axis (``strength``, ``layers``, ``examples`` or a setting),
    one colour per row (a row with no point on the axis is skipped but keeps its colour), one line
    style per split (the choice split solid, the report split
    dashed); the base model's scores as thin horizontal lines. ``rows``: row → its points of that
    axis (``x``: the value drawn, ``scores[split][metric]``)."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    styles = ("-", "--", ":")
    for k, (row, points) in enumerate(rows.items()):
        if not points:  # a row without this axis (it keeps its colour index)
            continue
        color = _COLORS[k % len(_COLORS)]
        ordered = sorted(points, key=lambda p: p["x"])
        for s, split in enumerate(splits):
            xs = [p["x"] for p in ordered if split in p["scores"]]
            ys = [100 * p["scores"][split][metric] for p in ordered if split in p["scores"]]
            ax.plot(xs, ys, styles[s % len(styles)], marker="o", ms=3, color=color, label=f"{row} ({split})")
    for s, split in enumerate(splits):
        if base and split in base:
            ax.axhline(100 * base[split], color="#555555", ls=styles[s % len(styles)], lw=0.8)
    if axis in ("examples", "strength"):
        ax.set_xscale("log")
    if axis == "examples":
        ticks = sorted({float(p["x"]) for points in rows.values() for p in points})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel({"examples": "training examples per split", "layers": "layer"}.get(axis, axis))
    ax.set_ylabel(f"{metric.upper()} (%)")
    ax.set_title(f"{metric.upper()} against {axis} (grey: base model)")
    ax.legend(fontsize=7)
    return _save(fig, path)


__all__ = [
    "plot_drift",
    "plot_flips",
    "plot_layer_accuracy",
    "plot_layer_count",
    "plot_layer_selection",
    "plot_norms",
    "plot_per_layer",
    "plot_scores",
    "plot_sweep_axis",
    "plot_sweep_tradeoff",
]
