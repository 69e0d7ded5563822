"""The picture of one run: ``report.png`` and ``report.md``, drawn from ``results.json`` alone.

Pure: a results dict in, files out (no Flower objects, no model). It draws a finished run, one
still in progress (no ``final`` yet, fewer rounds than planned) and a resumed one (``events``)
alike, so ``feddistill report OUT`` can redraw a run at any time; ``feddistill simulate`` writes
both files at the end. Schema of ``results.json``: docs/report.md and the README.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from feddistill.server.output_model import validation_curve
from feddistill.server.results import human_bytes

RESULTS = "results.json"
PNG = "report.png"
MD = "report.md"


def fmt_accuracy(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def fmt_bytes(x: float | None) -> str:
    return "—" if x is None else human_bytes(x)


def load_results(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The parsed ``results.json`` of a run folder (or of the file itself) and its folder.

    Raises:
        FileNotFoundError: nothing there, or a folder without ``results.json``; names the path.
        ValueError: not JSON, or JSON that is not a feddistill run record; names the path.
    """
    given = Path(path).expanduser()
    file = given / RESULTS if given.is_dir() else given
    if not given.exists():
        raise FileNotFoundError(f"{given} does not exist: give a run's output folder (--out)")
    if not file.is_file():
        raise FileNotFoundError(
            f"no {RESULTS} in {given}: give a run's output folder (feddistill simulate --out)"
        )
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise ValueError(f"{file} is not a feddistill results.json: it has no 'rounds' list")
    return data, file.parent


def evaluation_bytes(entry: dict[str, Any]) -> int:
    """Bytes of a round's messages outside its training exchange: federated evaluation (both
    ways) and the secure-aggregation steps before and after the masked upload."""
    return (
        entry.get("eval_bytes_down", 0)
        + entry.get("eval_bytes_up", 0)
        + sum((entry.get("secure_bytes") or {}).values())
    )


def round_bytes_per_client(entry: dict[str, Any]) -> float:
    """A training client's share of everything one round's messages carried: its training
    upload and download (means over the round's clients), plus :func:`evaluation_bytes` spread
    over the round's training clients.

    The evaluation belongs in the figure: it exists for the training's sake (the output rule
    and the local-work rule read it), and with the chained downlink an evaluation message
    carries the model versions a node lacks, which its next training message then need not.
    Counting training alone made the chain look 2.5 times cheaper than it is (docs/benchmarks.md).
    """
    clients = max(len(entry.get("bytes_down_per_client") or {}), 1)
    return (
        entry["mean_bytes_up_per_client"]
        + entry["mean_bytes_down_per_client"]
        + evaluation_bytes(entry) / clients
    )


def accuracy_curve(results: dict[str, Any]) -> list[dict[str, Any]]:
    """``{round, accuracy, bytes_per_client}`` per round, round 0 (the initial model, 0 bytes)
    first when it was evaluated; bytes are cumulative :func:`round_bytes_per_client`."""
    rounds = results["rounds"]
    cumulative = np.cumsum([round_bytes_per_client(r) for r in rounds]).tolist()
    curve = [
        {"round": r["round"], "accuracy": r["accuracy"], "bytes_per_client": c}
        for r, c in zip(rounds, cumulative, strict=True)
    ]
    initial = (results.get("initial") or {}).get("accuracy")
    if initial is not None:
        curve.insert(0, {"round": 0, "accuracy": initial, "bytes_per_client": 0.0})
    return curve


def _byte_unit(largest: float) -> tuple[float, str]:
    """Divisor and name of the unit :func:`human_bytes` would print ``largest`` in, so a bytes
    axis gets round ticks (5, 10, 15 KB) instead of decimal ones shown in KiB (9.8 KB)."""
    divisor = 1.0
    for unit in ("B", "KB", "MB"):
        if largest < 1024 * divisor:
            return divisor, unit
        divisor *= 1024
    return divisor, "GB"


def _ratio(dense: float, sent: list[float]) -> float | None:
    """Dense float32 bytes over the bytes sent, per client, over all rounds together."""
    return dense * len(sent) / sum(sent) if sent and sum(sent) > 0 else None


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The key figures, from ``final`` where the run finished and from ``rounds`` otherwise."""
    rounds = results["rounds"]
    final = results.get("final") or {}
    config = results.get("config") or {}
    accs = [(r["accuracy"], r["round"]) for r in rounds if r.get("accuracy") is not None]
    best = max(accs, key=lambda a: a[0]) if accs else (None, None)
    up = [r["mean_bytes_up_per_client"] for r in rounds]
    down = [r["mean_bytes_down_per_client"] for r in rounds]
    dense = rounds[-1].get("dense_float32_bytes_per_client") if rounds else None
    seconds = final.get("seconds_total", rounds[-1].get("elapsed") if rounds else None)
    return {
        "complete": bool(final),
        "rounds_done": len(rounds),
        "rounds_planned": config.get("rounds"),
        "resumed_after": [
            e["from_round"] for e in results.get("events") or [] if e.get("event") == "resume"
        ],
        "initial_accuracy": (results.get("initial") or {}).get("accuracy"),
        "final_accuracy": final.get("accuracy"),
        "averaged_rounds": final.get("averaged_rounds"),
        "last_round_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "best_accuracy": best[0],
        "best_round": best[1],
        "local_only_accuracy": final.get("local_only_accuracy"),
        "bytes_up_total": sum(r["bytes_up"] for r in rounds),
        "bytes_down_total": sum(r["bytes_down"] for r in rounds),
        "bytes_up_per_client_round": sum(up) / len(up) if up else None,
        "bytes_down_per_client_round": sum(down) / len(down) if down else None,
        "evaluation_bytes_total": sum(evaluation_bytes(r) for r in rounds),
        "bytes_per_client_round": (
            sum(round_bytes_per_client(r) for r in rounds) / len(rounds) if rounds else None
        ),
        "dense_bytes_per_client": dense,
        "compression_ratio_up": _ratio(dense, up) if dense else None,
        "compression_ratio_down": _ratio(dense, down) if dense else None,
        "failures": sum(r.get("failures", 0) for r in rounds),
        "seconds": seconds,
        "per_class_accuracy": final.get("per_class_accuracy"),
        "per_class_count": final.get("per_class_count"),
    }


def _setting(results: dict[str, Any]) -> dict[str, str]:
    """What ran, as text; ``?`` for what a hand-made or older results.json leaves out."""
    config = results.get("config") or {}
    per_round = config.get("server.clients-per-round")
    return {
        "teacher": (results.get("model") or {}).get("teacher", config.get("model.teacher", "?")),
        "clients": str(config.get("data.num-clients", "?")),
        "partitioning": str(config.get("data.partitioning", "?")),
        # 2.0 clients per round as 2, a fraction as 0.1
        "per_round": f"{per_round:g}" if isinstance(per_round, int | float) else "?",
        "uplink": str(config.get("compression.uplink", "?")),
        "downlink": str(config.get("compression.downlink", "?"))
        + (f" ({protocol})" if (protocol := config.get("compression.downlink-protocol")) else ""),
    }


def _status(s: dict[str, Any]) -> str:
    planned = s["rounds_planned"]
    done = f"{s['rounds_done']} of {planned} rounds" if planned else f"{s['rounds_done']} rounds"
    text = f"complete, {done}" if s["complete"] else f"in progress, {done} so far"
    if s["resumed_after"]:
        text += "; resumed after round " + ", ".join(str(r) for r in s["resumed_after"])
    return text


def _output_model(s: dict[str, Any]) -> str:
    if s["averaged_rounds"]:
        first, last = s["averaged_rounds"]
        return f"average of the globals of rounds {first}–{last}"
    return "the last round's global"


def format_markdown(results: dict[str, Any], png_name: str = PNG) -> str:
    """report.md: the key figures, per-class accuracy, and the picture."""
    s = summary(results)
    run = _setting(results)
    ratio = " / ".join(
        "—" if r is None else f"{r:.1f}x"
        for r in (s["compression_ratio_up"], s["compression_ratio_down"])
    )
    final = (
        f"{fmt_accuracy(s['final_accuracy'])} ({_output_model(s)})"
        if s["complete"]
        else "— (run in progress)"
    )
    best = (
        "—"
        if s["best_round"] is None
        else f"round {s['best_round']}: {fmt_accuracy(s['best_accuracy'])}"
    )
    seconds = "—" if s["seconds"] is None else f"{s['seconds']:.0f}"
    rows = [
        ("final accuracy (output model)", final),
        ("last round's global", fmt_accuracy(s["last_round_accuracy"])),
        ("best round", best),
        ("initial model", fmt_accuracy(s["initial_accuracy"])),
        ("local-only students (mean)", fmt_accuracy(s["local_only_accuracy"])),
        ("bytes up, total (all clients)", fmt_bytes(s["bytes_up_total"])),
        ("bytes down, total (all clients)", fmt_bytes(s["bytes_down_total"])),
        ("evaluation bytes, total (both ways)", fmt_bytes(s["evaluation_bytes_total"])),
        (
            "bytes per client per round, training up / down",
            f"{fmt_bytes(s['bytes_up_per_client_round'])} / "
            f"{fmt_bytes(s['bytes_down_per_client_round'])}",
        ),
        (
            "bytes per client per round, all messages",
            fmt_bytes(s["bytes_per_client_round"]),
        ),
        ("dense float32 update per client", fmt_bytes(s["dense_bytes_per_client"])),
        ("compression ratio, up / down", ratio),
        ("failed replies", str(s["failures"])),
        ("seconds (since start)", seconds),
    ]
    lines = [
        "# feddistill run report",
        "",
        f"Run {_status(s)}. Teacher `{run['teacher']}`, {run['clients']} clients "
        f"({run['partitioning']}), {run['per_round']} per round; uplink `{run['uplink']}`, "
        f"downlink `{run['downlink']}`. Accuracy is on the server's test set.",
        "",
        "| figure | value |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Per-class accuracy of the output model",
        "",
    ]
    per_class = s["per_class_accuracy"]
    if per_class:
        counts = s["per_class_count"] or {}
        lines += ["| class | accuracy | test rows |", "|---|---:|---:|"]
        lines += [
            f"| {name} | {fmt_accuracy(acc)} | {counts.get(name, '—')} |"
            for name, acc in per_class.items()
        ]
    else:
        lines.append(
            "Not available yet: the server computes it when it evaluates the output model at the "
            "end of the run."
            if not s["complete"]
            else "Not available: no test set, or a results.json from before per-class accuracy."
        )
    lines += ["", f"![accuracy, bytes and per-class accuracy of this run]({png_name})", ""]
    return "\n".join(lines)


def write_plot(results: dict[str, Any], path: Path) -> None:
    """report.png: four panels (accuracy per round, accuracy vs bytes, bytes per round,
    per-class accuracy). Uses matplotlib's Figure directly: Agg, no display, no pyplot state."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    s = summary(results)
    rounds = results["rounds"]
    curve = [p for p in accuracy_curve(results) if p["accuracy"] is not None]
    fig = Figure(figsize=(13, 10))
    (acc_ax, bytes_acc_ax), (bytes_ax, class_ax) = fig.subplots(2, 2)
    star = {"marker": "*", "ms": 14, "color": "C3", "ls": "none", "zorder": 5}

    # 1. accuracy per round (the round's global), the output model, federated eval, baselines
    acc_ax.plot(
        [p["round"] for p in curve],
        [p["accuracy"] for p in curve],
        marker="o",
        ms=3,
        label="global model of each round (test set)",
    )
    for source, label in (
        ("federated", "federated eval (clients' own splits)"),
        ("arrival", "training clients' splits, on arrival (the previous round's global)"),
    ):
        points = validation_curve(rounds, source)
        if points:
            acc_ax.plot(*zip(*points, strict=True), ls="--", marker=".", label=label)
    if s["final_accuracy"] is not None and rounds:
        first, last = s["averaged_rounds"] or (rounds[-1]["round"], rounds[-1]["round"])
        acc_ax.plot(
            [last],
            [s["final_accuracy"]],
            **star,
            label=f"output model: {_output_model(s)} ({fmt_accuracy(s['final_accuracy'])})",
        )
        if first != last:
            acc_ax.hlines(s["final_accuracy"], first, last, color="C3", lw=1.5)
    if s["local_only_accuracy"] is not None:
        acc_ax.axhline(
            s["local_only_accuracy"],
            ls=":",
            color="gray",
            label=f"local-only students ({fmt_accuracy(s['local_only_accuracy'])})",
        )
    if results.get("labels"):
        chance = 1 / len(results["labels"])
        acc_ax.axhline(chance, color="black", lw=0.6, alpha=0.4, label=f"chance ({chance:.0%})")
    for k in s["resumed_after"]:
        acc_ax.axvline(k, ls="-.", color="C2", lw=1, label=f"resumed after round {k}")
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_title("accuracy per round")
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    # 2. accuracy against cumulative bytes per client
    div, unit = _byte_unit(max((p["bytes_per_client"] for p in curve), default=0.0))
    bytes_acc_ax.plot(
        [p["bytes_per_client"] / div for p in curve],
        [p["accuracy"] for p in curve],
        marker="o",
        ms=3,
    )
    if s["final_accuracy"] is not None and curve:
        bytes_acc_ax.plot([curve[-1]["bytes_per_client"] / div], [s["final_accuracy"]], **star)
    bytes_acc_ax.set_xlabel(f"cumulative {unit} per client (up + down)")
    bytes_acc_ax.set_ylabel("accuracy")
    bytes_acc_ax.set_title("accuracy vs communication")
    for ax in (acc_ax, bytes_acc_ax):
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)

    # 3. bytes per round, mean per client, up and down
    xs = np.array([r["round"] for r in rounds])
    up = np.array([r["mean_bytes_up_per_client"] for r in rounds], dtype=float)
    down = np.array([r["mean_bytes_down_per_client"] for r in rounds], dtype=float)
    div, unit = _byte_unit(float(max(up.max(), down.max())) if rounds else 0.0)
    width = 0.4
    bytes_ax.bar(xs - width / 2, up / div, width, label="up")
    bytes_ax.bar(xs + width / 2, down / div, width, label="down")
    for r, top in zip(rounds, np.maximum(up, down) / div, strict=True):
        if r.get("failures"):
            bytes_ax.annotate(
                f"{r['failures']} failed",
                (r["round"], top),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color="C3",
            )
    ratio = [
        f"{name} {r:.0f}x"
        for name, r in (("up", s["compression_ratio_up"]), ("down", s["compression_ratio_down"]))
        if r is not None
    ]
    dense = s["dense_bytes_per_client"]
    bytes_ax.set_title(
        "bytes per round, mean per client"
        + (f"\n(dense float32 update {human_bytes(dense)}; " if dense else "\n(")
        + ("compression " + ", ".join(ratio) + ")" if ratio else "no traffic yet)"),
        fontsize=10,
    )
    bytes_ax.set_ylabel(unit)
    bytes_ax.margins(y=0.1)  # room for the "failed" notes above the bars
    bytes_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    bytes_ax.set_xlabel("round")
    bytes_ax.grid(alpha=0.3, axis="y")
    bytes_ax.legend(fontsize=8)

    # 4. per-class accuracy of the output model
    per_class = s["per_class_accuracy"]
    if per_class:
        names = list(per_class)
        counts = s["per_class_count"] or {}
        values = [per_class[n] or 0.0 for n in names]
        bars = class_ax.bar(range(len(names)), values, color="C0")
        class_ax.bar_label(
            bars,
            [f"{fmt_accuracy(per_class[n])}\nn={counts.get(n, '?')}" for n in names],
            fontsize=8,
        )
        class_ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 6 else 0)
        if s["final_accuracy"] is not None:
            class_ax.axhline(s["final_accuracy"], ls="--", color="C3", lw=1)
        class_ax.set_ylim(0, 1.15)
        class_ax.set_ylabel("accuracy")
        class_ax.grid(alpha=0.3, axis="y")
    else:
        class_ax.text(
            0.5,
            0.5,
            "per-class accuracy appears when the run has finished"
            if not s["complete"]
            else "no per-class accuracy in this results.json",
            ha="center",
            va="center",
            transform=class_ax.transAxes,
        )
        class_ax.set_xticks([])
        class_ax.set_yticks([])
    overall = (
        f"; dashed: overall {fmt_accuracy(s['final_accuracy'])}"
        if per_class and s["final_accuracy"] is not None
        else ""
    )
    class_ax.set_title(f"per-class accuracy of the output model{overall}")

    run = _setting(results)
    fig.suptitle(
        f"{run['teacher']}: {run['clients']} clients ({run['partitioning']}), {run['per_round']} "
        f"per round, up {run['uplink']}, down {run['downlink']}\n{_status(s)}; final accuracy "
        f"{fmt_accuracy(s['final_accuracy']) if s['complete'] else '— (in progress)'}",
        fontsize=11,
    )
    # Below the panels, as in the bench plot: inside, any spot hides a curve or a reference
    # line; the top panels share their colours, so one legend serves both.
    handles, labels = acc_ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8.5, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def write_report(results: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` into ``out_dir``; returns their paths. Each file is
    replaced atomically, so a reader never sees half of one (a run may redraw while you look)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / PNG, out / MD
    write_plot(results, png)
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(format_markdown(results, png.name))
    os.replace(tmp, md)
    return png, md
