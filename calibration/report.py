"""The calibration report: a head heatmap, ROC curves and a markdown summary linking them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlmguard.errors import VlmguardError

from .run import CalibrationResult
from .thresholds import auc, roc_points

HEATMAP, ROC, SUMMARY = "oh_heatmap.png", "roc.png", "summary.md"


def _pyplot() -> object:
    """matplotlib's pyplot on the non-interactive backend, or a clear error."""
    try:
        import matplotlib
    except ImportError as err:
        raise VlmguardError("--report needs matplotlib: pip install 'vlmguard[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_heatmap(result: CalibrationResult, path: Path) -> Path:
    """(unsafe - safe) mean angle over layers x heads, the chosen head boxed."""
    plt = _pyplot()
    gap = result.head.gap
    size = (max(5.0, 1.5 + 0.45 * gap.shape[1]), max(3.0, 1.2 + 0.3 * gap.shape[0]))
    fig, ax = plt.subplots(figsize=size)
    limit = float(np.abs(gap).max()) or 1.0
    image = ax.imshow(gap, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    ax.add_patch(
        plt.Rectangle(
            (result.head.head - 0.5, result.head.layer - 0.5), 1, 1, fill=False, lw=2, ec="k"
        )
    )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("Oh Defense: mean unsafe - mean safe angle (deg)", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _curves(result: CalibrationResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scores and labels per curve: Oh's chosen head and each detector score, per part."""
    oh = result.oh_scores
    curves = {}
    for part, rows in (("calibration", ~result.held_out), ("held-out", result.held_out)):
        if rows.any():
            curves[f"oh L{result.head.layer}H{result.head.head} ({part})"] = (oh[rows], rows)
            for kind, scores in result.detector.items():
                has = rows & np.isfinite(scores)
                if has.any():
                    curves[f"detector {kind} ({part})"] = (scores[has], has)
    return curves


def draw_roc(result: CalibrationResult, path: Path) -> dict[str, float]:
    """ROC curves of every guard score; returns each curve's AUC."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    areas = {}
    for name, (scores, rows) in _curves(result).items():
        fpr, tpr = roc_points(scores, result.unsafe[rows])
        areas[name] = auc(fpr, tpr)
        ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{name}: AUC {areas[name]:.3f}")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_xlabel("false-positive rate (safe flagged)")
    ax.set_ylabel("true-positive rate (unsafe flagged)")
    ax.set_title("Guard ROC curves")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return areas


def _fmt(value: object) -> str:
    """A table cell: floats to 3 decimals, None as a dash."""
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _rates_row(name: str, record: dict | None) -> str:
    """One guard's held-out TPR/FPR as a markdown table row."""
    if not record:
        return f"| {name} | - | - |"
    return f"| {name} | {_fmt(record.get('tpr'))} | {_fmt(record.get('fpr'))} |"


def summary_markdown(result: CalibrationResult, areas: dict[str, float]) -> str:
    """The short markdown summary that links the figures."""
    cal = result.document["calibration"]
    oh, ptr, align, det = cal["oh"], cal["ptr"], cal["align"], cal["detector"]
    lines = [
        "# Calibration summary",
        "",
        f"Source `{cal['source']}`; data `{cal['data']['file']}` (sha256 "
        f"`{cal['data']['sha256'][:16]}...`): {cal['data']['samples']} samples, "
        f"{cal['data']['held_out_samples']} held out (seed {cal['data']['seed']}). "
        f"Target FPR {cal['target_fpr']}. Time {cal['timings_s']['total']:.1f} s.",
        "",
        "## Held-out TPR / FPR",
        "",
        "| guard | TPR | FPR |",
        "| --- | --- | --- |",
        _rates_row(f"oh (angle > {oh['threshold_degrees']:.3f} deg)", oh["held_out"]),
        _rates_row("ptr (greedy first token is a refusal)", ptr["held_out"]),
        _rates_row("align (greedy first token is a refusal)", align["held_out"]),
    ]
    for kind in ("global", "ot"):
        if isinstance(det.get(kind), dict) and "threshold" in det[kind]:
            lines.append(_rates_row(f"detector {kind} (>= {det[kind]['threshold']:.4f})",
                                    det[kind]["held_out"]))  # fmt: skip
    off = cal.get("observe_only", {})
    lines += ["", "## Guards left observe-only", ""]
    if off:
        lines.append(
            "A guard whose separation (unsafe minus safe) is not positive is not turned on; "
            "the rates above are what it would have done:"
        )
        lines += ["", *(f"- {guard}: {reason}" for guard, reason in off.items())]
    else:
        lines.append(f"None: every guard separates unsafe from safe ({cal['separation_part']}).")
    lines += [
        "",
        f"## Oh Defense: layer {oh['layer']}, head {oh['head']}",
        "",
        f"![head heatmap]({HEATMAP}) ![ROC curves]({ROC})",
        "",
        f"Heads kept: mean safe angle < {oh['safe_percentile_cut']:.3f} deg. Top 10:",
        "",
        "| rank | layer | head | unsafe - safe | safe mean | unsafe mean |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rank, row in enumerate(oh["top"], start=1):
        lines.append(
            f"| {rank} | {row['layer']} | {row['head']} | {row['gap']:.3f} | "
            f"{row['safe_mean']:.3f} | {row['unsafe_mean']:.3f} |"
        )
    lines += ["", f"AUC: {', '.join(f'{k} {v:.3f}' for k, v in areas.items())}."]
    lines += _ranking_section(
        f"SafePTR window [{ptr['window'][0]}, {ptr['window'][1]})",
        ptr["ranking"],
        lambda r: f"[{r['window'][0]}, {r['window'][1]})",
    )
    lines += _ranking_section(
        f"GuardAlign: gamma {align['gamma']} on layers [{align['layers'][0]}, "
        f"{align['layers'][1]}) ({align['range']})",
        align["ranking"],
        lambda r: f"{r['range']} [{r['layers'][0]}, {r['layers'][1]}) gamma {r['gamma']}",
    )
    return "\n".join(lines) + "\n"


def _ranking_section(title: str, ranking: list[dict], name: object) -> list[str]:
    """A proxy-search ranking as a markdown table (top 10)."""
    lines = [
        "",
        f"## {title}",
        "",
        "Refusal proxy on the calibration part (probability of a refusal opening's first token).",
        "",
        "| rank | candidate | unsafe refusal gain | safe first tokens changed |",
        "| --- | --- | --- | --- |",
    ]
    for row in ranking[:10]:
        fig = row["calibration"]
        lines.append(
            f"| {row['rank']} | {name(row)} | {_fmt(fig['unsafe_refusal_gain'])} | "
            f"{_fmt(fig['safe_first_token_changed'])} |"
        )
    return lines


def write_report(result: CalibrationResult, out: str | Path) -> Path:
    """Write the heatmap, the ROC curves and summary.md into a directory; returns summary.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    draw_heatmap(result, out / HEATMAP)
    areas = draw_roc(result, out / ROC)
    path = out / SUMMARY
    path.write_text(summary_markdown(result, areas))
    return path
