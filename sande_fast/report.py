"""Reports: report.json, report.md, report.png and the one-screen summary table."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .io import write_json

__all__ = ["write_reports", "summary_table", "fmt", "UTILITY", "worst_target"]

_LOG = logging.getLogger(__name__)

# The metrics of the before/after tables, in order (the utility ones: sande_fast.utility).
UTILITY = ("asr", "clean_accuracy", "agreement", "agreement_full", "answer_nll_delta", "kl")


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summary_table(report: dict[str, Any]) -> str:
    """A short before/after table (plain text) for the terminal."""
    b, a = report["before"], report["after"]
    lines = [f"method: {report['method']}   model: {report['model']}   "
             f"time: {report['timing']['total_s']:.1f}s   kernels: {report['environment']['kernels']}",
             f"{'metric':<18}{'before':>10}{'after':>10}",
             *(f"{name:<18}{fmt(b.get(name)):>10}{fmt(a.get(name)):>10}"
               for name in UTILITY if name in a or name in b)]
    if "resimulated_asr" in a:
        lines.append(f"{'resimulated_asr':<18}{'':>10}{fmt(a.get('resimulated_asr')):>10}")
    targets = report.get("targets") or []
    if targets:
        lines.append(f"{len(targets)} backdoors (asr before -> after, last probe):")
        for t in targets:
            lines.append(f"  {_short(t['target']):<30} {fmt(t.get('asr_before'))} -> "
                         f"{fmt(t.get('asr_after'))}"
                         + (f"   probe {fmt(t.get('resimulated_asr'))}"
                            if "resimulated_asr" in t else ""))
        worst = worst_target(report)
        if worst is not None:
            lines.append(f"worst target: {worst['target']!r}")
    note = calibration_note(report)
    if note:
        lines.append(note)
    if report.get("rounds") and report["method"] in ("sande", "sande-p"):
        lines.append(f"rounds: {len(report['rounds'])}  "
                     + "  ".join(f"r{r['round']}: probe {fmt(r['probe_asr_before'], 2)} -> "
                                 f"asr {fmt(r['asr'], 2)}, clean {fmt(r['clean_accuracy'], 2)}"
                                 + (f", probe {fmt(r['probe_asr_after'], 2)}"
                                    if r.get("probe_asr_after") is not None else "")
                                 + (" (undone)" if r.get("rolled_back") else "")
                                 for r in report["rounds"]))
    return "\n".join(lines)


def calibration_note(report: dict[str, Any]) -> str | None:
    """One line on the probe calibration, when the run had one."""
    cal = report.get("probe_calibration")
    if not cal:
        return None
    verdict = ("the round probes ran" if cal["informative"]
               else "a probe cannot tell erased from suppressed here, so the round probes were "
                    "skipped")
    return (f"probe calibration: a probe reached the decoy {cal['decoy']!r} on "
            f"{fmt(cal['asr'])} of the prompts: {verdict}")


def _short(text: str, limit: int = 30) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def worst_target(report: dict[str, Any]) -> dict[str, Any] | None:
    """The per-target entry of a several-backdoor report that fares worst: the highest asr
    after, then the highest last probe (None when neither was measured)."""
    def key(t: dict[str, Any]) -> tuple[float, float]:
        return (t.get("asr_after") if t.get("asr_after") is not None else -1.0,
                t.get("resimulated_asr") if t.get("resimulated_asr") is not None else -1.0)

    targets = report.get("targets") or []
    if not targets or key(max(targets, key=key)) == (-1.0, -1.0):
        return None
    return max(targets, key=key)


# The settings report.md lists (all of them are in report.json's "config").
_SETTINGS = ("optimizer", "overwrite_lr", "overwrite_steps", "clean_weight", "retain_weight",
             "seed", "parrot_tokens", "simulate_steps", "rounds", "max_rounds", "probe_threshold",
             "probe_steps", "probe_tries", "max_clean_drop", "guard_metric")
_SANDE_ONLY = {"parrot_tokens", "simulate_steps", "rounds", "max_rounds", "probe_threshold",
               "probe_steps", "probe_tries", "max_clean_drop", "guard_metric"}


def _markdown(report: dict[str, Any]) -> str:
    b, a = report["before"], report["after"]
    out = [f"# sande_fast report: {report['method']}", "",
           f"Model: `{report['model']}`  ", f"Target: `{report.get('target')}`  ",
           f"Total time: {report['timing']['total_s']:.1f} s on {report['environment']['device']} "
           f"({report['environment']['kernels']} kernels, {report['environment']['path']} path)", "",
           "| metric | before | after |", "| --- | --- | --- |",
           *(f"| {name} | {fmt(b.get(name))} | {fmt(a.get(name))} |"
             for name in UTILITY if name in a or name in b)]
    if "resimulated_asr" in a:
        out.append(f"| resimulated_asr | | {fmt(a.get('resimulated_asr'))} |")
    targets = report.get("targets") or []
    if targets:
        out += ["", "## Backdoors", "",
                "| target | trigger (asr) | asr before | asr after | probe after each round "
                "| rounds simulated |", "| --- | --- | --- | --- | --- | --- |"]
        for t in targets:
            probes = ", ".join(fmt(v) for v in t.get("probe_asr_after") or []) or "n/a"
            rounds = ", ".join(str(r) for r in t.get("rounds_simulated") or []) or "n/a"
            out.append(f"| `{t['target']}` | {fmt(t.get('trigger'))} | {fmt(t.get('asr_before'))} "
                       f"| {fmt(t.get('asr_after'))} | {probes} | {rounds} |")
        worst = worst_target(report)
        if worst is not None:
            out += ["", f"Worst target: `{worst['target']}`."]
    note = calibration_note(report)
    if note:
        out += ["", note[0].upper() + note[1:] + "."]
    if report.get("rounds"):
        out += ["", "## Rounds", "",
                "| round | probe asr before | asr | clean accuracy | agreement | NLL delta "
                "| probe asr after | kept | done at |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["rounds"]:
            kept = "no (utility cost too high, undone)" if r.get("rolled_back") else "yes"
            done = "n/a" if r.get("elapsed_s") is None else f"{r['elapsed_s']:.0f} s"
            out.append(f"| {r['round']} | {fmt(r.get('probe_asr_before'))} | {fmt(r.get('asr'))} "
                       f"| {fmt(r.get('clean_accuracy'))} | {fmt(r.get('agreement'))} "
                       f"| {fmt(r.get('answer_nll_delta'))} | {fmt(r.get('probe_asr_after'))} "
                       f"| {kept} | {done} |")
    out += _patch_markdown(report.get("patch"))
    cfg = report.get("config") or {}
    if cfg:
        out += ["", "## Settings", "", "| setting | value |", "| --- | --- |"]
        for k in _SETTINGS:
            if k in cfg and (k not in _SANDE_ONLY or report["method"] in ("sande", "sande-p")):
                v = cfg[k]
                out.append(f"| {k} | {format(v, 'g') if isinstance(v, float) else fmt(v)} |")
    out += ["", "## Time by stage (s)", "", "| stage | seconds |", "| --- | --- |"]
    for k, v in report["timing"]["stages"].items():
        out.append(f"| {k} | {v:.2f} |")
    return "\n".join(out) + "\n"


def _patch_markdown(patch: dict[str, Any] | None) -> list[str]:
    """The weight-change section (runs with ``--save-patch``): totals and the most changed
    tensors by relative change ‖Δ‖/‖W‖."""
    if not patch:
        return []
    g = lambda v: "n/a" if v is None else format(v, ".3g")  # noqa: E731
    out = ["", "## Weight change", "",
           f"Patch: `{patch['file']}` ({patch['bytes']} bytes, format {patch['format_version']}); "
           f"{patch['n_changed']} of {patch['n_tensors']} tensors changed "
           f"({patch['changed_elements']} of {patch['n_params']} weights moved).  ",
           f"Base sha256 `{patch['base_sha256']}`, result sha256 `{patch['result_sha256']}`.  ",
           f"‖Δ‖ {g(patch['norm_delta'])}, ‖W‖ {g(patch['norm_before'])}, relative "
           f"{g(patch['relative'])}, largest change {g(patch['max_abs'])}.", ""]
    if patch.get("top"):
        out += ["| tensor | relative change | ‖Δ‖ | largest change |", "| --- | --- | --- | --- |"]
        out += [f"| `{t['name']}` | {g(t['relative'])} | {g(t['norm_delta'])} "
                f"| {g(t['max_abs'])} |" for t in patch["top"]]
    return out


def _rate_error(rate: float, n: int | None) -> float:
    """Half-width of a 95 % normal-approximation interval of a rate measured on ``n`` rows."""
    if not n:
        return 0.0
    return 1.96 * math.sqrt(max(rate * (1 - rate), 0.25 / n) / n)


def _legend(ax: Any, size: int) -> None:
    """A legend when the panel drew something labelled (an osft run has no stage-1 curves)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n_eval = (report.get("data") or {}).get("n_eval_rows")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax = axes[0]
    names = [n for n in ("asr", "clean_accuracy", "agreement")
             if n in report["before"] or n in report["after"]]
    for shift, key, label in ((-0.2, "before", "before"), (0.2, "after", "after")):
        for x, name in enumerate(names):
            v = report[key].get(name)
            if v is None:  # not measured (asr with an unknown trigger): say so, draw nothing
                ax.text(x + shift, 0.02, "n/a", ha="center", va="bottom", fontsize=9)
                continue
            ax.bar(x + shift, v, width=0.4, color="C0" if key == "before" else "C1",
                   yerr=_rate_error(v, n_eval), capsize=3,
                   label=label if x == next(i for i, n in enumerate(names)
                                            if report[key].get(n) is not None) else None)
    ax.set_xticks(list(range(len(names))), names)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{report['method']}: before / after"
                 + (f" (n={n_eval}, 95% intervals)" if n_eval else ""))
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    rounds: Sequence[dict[str, Any]] = report.get("rounds") or []
    if rounds:
        rs = [r["round"] for r in rounds]
        for key, style, label in (("probe_asr_before", "o-", "probe asr (before round)"),
                                  ("probe_asr_after", "v-", "probe asr (after round)"),
                                  ("asr", "s-", "trigger asr (after)"),
                                  ("clean_accuracy", "^-", "clean accuracy (after)"),
                                  ("agreement", "d-", "agreement (after)")):
            pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        for t in report.get("targets") or []:  # several backdoors: each target's probe
            pts = [(r, v) for r, v in zip(rs, t.get("probe_asr_after") or []) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ":", marker="x", alpha=0.7,
                        label=f"probe after: {_short(t['target'], 18)}")
        control = (report.get("control") or {}).get("probe_asr_max")
        if control is not None:
            ax.axhline(control, ls=":", c="green", label="never-poisoned control's probe")
        resim = report["after"].get("resimulated_asr")
        if resim is not None:
            ax.axhline(resim, ls="--", c="grey", label="re-simulated parrot asr")
        ax.set_xticks(rs)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("round")
    ax.set_title("per round")
    _legend(ax, 8)
    curves = report.get("curves") or {}
    for ax, kinds, title, ylabel in (
            (axes[2], ("simulate", "probe"), "stage 1 and probes", "cross-entropy of the target"),
            (axes[3], ("eliminate",), "stage 2", "overwrite + clean + retention loss")):
        for name, curve in curves.items():
            if curve and name.split("_")[0] in kinds:
                ax.plot(range(1, len(curve) + 1), curve, label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if any(v > 0 for n, c in curves.items() if n.split("_")[0] in kinds for v in c):
            ax.set_yscale("log")
        ax.set_title(title)
        _legend(ax, 7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(report: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """Writes ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``; the figure
    only where matplotlib is installed (the ``plot`` extra): every number is in the other two."""
    out = Path(out_dir)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _LOG.warning("report.png skipped: matplotlib is not installed "
                     "(pip install 'sande_fast[plot]')")
        return
    _plot(report, out / "report.png")
