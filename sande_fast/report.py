"""Reports: report.json, report.md, report.png and the one-screen summary table."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .io import write_json

__all__ = ["write_reports", "summary_table", "fmt", "UTILITY"]

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
    if report.get("rounds") and report["method"] in ("sande", "sande-p"):
        lines.append(f"rounds: {len(report['rounds'])}  "
                     + "  ".join(f"r{r['round']}: probe {fmt(r['probe_asr_before'], 2)} -> "
                                 f"asr {fmt(r['asr'], 2)}, clean {fmt(r['clean_accuracy'], 2)}"
                                 + (f", probe {fmt(r['probe_asr_after'], 2)}"
                                    if r.get("probe_asr_after") is not None else "")
                                 + (" (undone)" if r.get("rolled_back") else "")
                                 for r in report["rounds"]))
    return "\n".join(lines)


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
    if report.get("rounds"):
        out += ["", "## Rounds", "",
                "| round | probe asr before | asr | clean accuracy | agreement | NLL delta "
                "| probe asr after | kept |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["rounds"]:
            kept = "no (utility cost too high, undone)" if r.get("rolled_back") else "yes"
            out.append(f"| {r['round']} | {fmt(r.get('probe_asr_before'))} | {fmt(r.get('asr'))} "
                       f"| {fmt(r.get('clean_accuracy'))} | {fmt(r.get('agreement'))} "
                       f"| {fmt(r.get('answer_nll_delta'))} | {fmt(r.get('probe_asr_after'))} "
                       f"| {kept} |")
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


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    names = ["asr", "clean_accuracy"]
    b = [report["before"].get(n) or 0.0 for n in names]
    a = [report["after"].get(n) or 0.0 for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], b, width=0.4, label="before")
    ax.bar([x + 0.2 for x in xs], a, width=0.4, label="after")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{report['method']}: before / after")
    ax.legend()
    ax = axes[1]
    rounds: Sequence[dict[str, Any]] = report.get("rounds") or []
    if rounds:
        rs = [r["round"] for r in rounds]
        if any(r.get("probe_asr_before") is not None for r in rounds):
            ax.plot(rs, [r.get("probe_asr_before") or 0.0 for r in rounds], "o-",
                    label="probe asr (before round)")
        if any(r.get("probe_asr_after") is not None for r in rounds):
            ax.plot(rs, [r.get("probe_asr_after") or 0.0 for r in rounds], "v-",
                    label="probe asr (after round)")
        ax.plot(rs, [r.get("asr") or 0.0 for r in rounds], "s-", label="trigger asr (after)")
        ax.plot(rs, [r.get("clean_accuracy") or 0.0 for r in rounds], "^-",
                label="clean accuracy (after)")
        resim = report["after"].get("resimulated_asr")
        if resim is not None:
            ax.axhline(resim, ls="--", c="grey", label="re-simulated parrot asr")
        ax.set_xticks(rs)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("round")
    ax.set_title("per round")
    ax.legend(fontsize=8)
    ax = axes[2]
    for name, curve in (report.get("curves") or {}).items():
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("stage losses")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(report: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """Writes ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``."""
    out = Path(out_dir)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    _plot(report, out / "report.png")
