"""bench.md (a markdown table) and bench.png (accuracy against bytes and rounds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from feddistill.bench.spec import CENTRALIZED, LOCAL_ONLY
from feddistill.report import fmt_accuracy, fmt_bytes
from feddistill.server.results import human_bytes


def format_table(bench: dict[str, Any]) -> str:
    """One row per scenario; accuracy is on the final test rows, the curve's best on eval."""
    rows = bench["setting"]["rows"]
    head = (
        f"Accuracy on {rows['test']} test rows; 'best (eval)' is the best per-round accuracy "
        f"on the {rows['eval']}-row eval subset. Bytes per client per round count every "
        "message: training up and down, and federated evaluation shared over the round's "
        "training clients; the totals are over all clients.\n\n"
        "| scenario | accuracy | best (eval) | rounds | bytes/client/round | up total | "
        "down total | eval total | seconds | notes |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for s in bench["scenarios"]:
        acc = fmt_accuracy(s["accuracy"])
        if s.get("accuracy_std") is not None:
            acc += f" ± {100 * s['accuracy_std']:.2f}"
        secs = "—" if s["seconds"] is None else f"{s['seconds']:.0f}"
        lines.append(
            f"| {s['name']} | {acc} | {fmt_accuracy(s.get('eval_accuracy_best'))} | "
            f"{s['rounds']} | {fmt_bytes(s['bytes_per_client_round'])} | "
            f"{fmt_bytes(s['bytes_up_total'])} | {fmt_bytes(s['bytes_down_total'])} | "
            f"{fmt_bytes(s.get('evaluation_bytes_total'))} | {secs} | {s['notes']} |"
        )
    return "\n".join(lines)


def write_plot(bench: dict[str, Any], path: Path) -> None:
    """Left: accuracy vs cumulative bytes per client (log x); right: accuracy vs round.

    Centralized scenarios and the local-only mean have no curve: horizontal reference lines.
    Curves are on the eval subset, reference lines on the final test rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6))
    styles = {CENTRALIZED[0]: "--", CENTRALIZED[1]: "-.", LOCAL_ONLY: ":"}
    averaged = False
    for s in bench["scenarios"]:
        curve = [p for p in s.get("curve", []) if p["accuracy"] is not None]
        if curve:
            xs = [p["bytes_per_client"] for p in curve if p["bytes_per_client"] > 0]
            ys = [p["accuracy"] for p in curve if p["bytes_per_client"] > 0]
            (line,) = left.plot(xs, ys, marker="o", ms=3, label=s["name"])
            right.plot(
                [p["round"] for p in curve],
                [p["accuracy"] for p in curve],
                marker="o",
                ms=3,
                label=s["name"],
            )
            # The output model (server.average-last) is not the last round's global: a star at
            # the end of the curve shows what the table's accuracy is of.
            final = s.get("eval_accuracy_final")
            if final is not None and xs and final != curve[-1]["accuracy"]:
                color = line.get_color()
                left.plot([xs[-1]], [final], marker="*", ms=12, color=color, ls="none")
                right.plot([curve[-1]["round"]], [final], marker="*", ms=12, color=color, ls="none")
                averaged = True
        elif s["name"] in styles and s["accuracy"] is not None:
            for ax in (left, right):
                ax.axhline(
                    s["accuracy"],
                    ls=styles[s["name"]],
                    color="gray",
                    lw=1.2,
                    label=f"{s['name']} ({100 * s['accuracy']:.1f}%)",
                )
        elif s.get("bytes_per_client_round"):
            left.axvline(
                s["bytes_per_client_round"],
                ls=":",
                color="red",
                lw=1,
                label=f"{s['name']}: 1 round = {human_bytes(s['bytes_per_client_round'])}",
            )
    left.set_xscale("log")
    left.set_xlabel("cumulative bytes per client (up + down)")
    left.set_ylabel("accuracy")
    left.set_title("accuracy vs communication")
    right.set_xlabel("round")
    right.set_title("accuracy vs round")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
    right.xaxis.get_major_locator().set_params(integer=True)
    # Below both panels: inside, any spot hides some scenario's curve.
    if averaged:
        left.plot(
            [],
            [],
            marker="*",
            ms=10,
            color="gray",
            ls="none",
            label="output model (average of the last rounds)",
        )
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4, frameon=False)
    rows = bench["setting"]["rows"]
    fig.suptitle(
        f"{bench['setting']['teacher']} — {rows['train']} train rows, "
        f"{bench['setting']['partitioning']['num_clients']} clients "
        f"({bench['setting']['partitioning']['scheme']}); curves on {rows['eval']} eval rows, "
        f"reference lines on {rows['test']} test rows",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
