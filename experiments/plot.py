"""Plots and markdown tables from experiments/results/table*.json (written by ablate.py).

    python experiments/plot.py      # writes results/*.png and prints the tables for the README
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def load(table: str) -> dict | None:
    path = RESULTS / f"table{table}.json"
    return json.loads(path.read_text()) if path.exists() else None


def markdown(report: dict) -> str:
    lines = ["| configuration | valid ppl | trainable params | adapter bytes | step s | compiled MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        lines.append(
            f"| {r['name']} | {r['valid_perplexity']:.2f} | {r['trainable_params']:,} | {r['adapter_bytes']:,} | "
            f"{r.get('median_step_s', 0):.2f} | {r.get('compiled_memory_mb', 0):.0f} |"
        )
    return "\n".join(lines)


def plot_rank(report: dict, path: Path):
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list] = {}
    for r in report["results"]:
        if r["method"] == "base":
            ax.axhline(r["valid_perplexity"], color="gray", ls="--", label="base (no training)")
            continue
        name, rank = r["name"].rsplit("_r", 1)
        groups.setdefault(name, []).append((int(rank), r["valid_perplexity"]))
    for name, points in groups.items():
        ax.plot(*zip(*sorted(points)), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("validation perplexity")
    ax.set_title("SmolLM2-135M on held-out Shakespeare")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_losses(reports: list[dict], path: Path):
    fig, ax = plt.subplots(figsize=(7, 4))
    for report in reports:
        for r in report["results"]:
            if "losses" in r:
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], lw=1, label=f"{r['name']} (table {report['table']})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    reports = {t: load(t) for t in ("5", "6", "methods")}
    for table, report in reports.items():
        if report:
            print(f"\n### Table {table}\n\n{markdown(report)}")
    if reports["6"]:
        plot_rank(reports["6"], RESULTS / "rank_vs_perplexity.png")
    present = [r for r in reports.values() if r]
    if present:
        plot_losses(present, RESULTS / "loss_curves.png")
    if reports["methods"] and "inference_latency_s" in reports["methods"]:
        print("\ninference latency (s):", reports["methods"]["inference_latency_s"])


if __name__ == "__main__":
    main()
