"""Render benchmark results: markdown tables, the README "Results" section, the ratio chart.

    python -m benchmarks.report [benchmarks/results/latest.json] [--out benchmarks/results/README_results.md] [--chart benchmarks/results/ratios.png]
        [--converged-from benchmarks/results/<a --tasks converged run>.json]

Ratios are always JAX / PyTorch of the quantity in the column: for throughput (images/s)
above 1 means jaxres is faster; for seconds and memory below 1 means jaxres needs less.
Each ratio is the median (and min-max) of pair-by-pair ratios of alternating runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import common

TASK_TITLES = {"train": "train", "eval": "eval", "gradcam": "Grad-CAM"}
TRAINING_TASKS = ("accuracy", "converged")  # rows of whole training runs, one per framework and seed


# --------------------------------------------------------------------------- formatting


def fmt_number(value, digits: int = 3) -> str:
    if not common.is_number(value):
        return "–"
    value = float(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.2f}"


def fmt_summary(summary: dict | None, digits: int = 3) -> str:
    """'median (min–max)' of a `common.summarize` dict; just the value when n == 1."""
    if not summary:
        return "–"
    if summary.get("n", 1) == 1 or summary["min"] == summary["max"]:
        return fmt_number(summary["median"], digits)
    return f"{fmt_number(summary['median'], digits)} ({fmt_number(summary['min'], digits)}–{fmt_number(summary['max'], digits)})"


def fmt_ratio(summary: dict | None) -> str:
    if not summary:
        return "–"
    if summary.get("n", 1) == 1:
        return f"{summary['median']:.2f}"
    return f"**{summary['median']:.2f}** ({summary['min']:.2f}–{summary['max']:.2f})"


def fmt_percent(value) -> str:
    return f"{100 * value:.2f}%" if common.is_number(value) else "–"


def fmt_or_dash(value, spec: str) -> str:
    """`value` formatted with the format spec `spec` (e.g. ".2e"), or '–' when it is None."""
    return "–" if value is None else format(value, spec)


def table_row(*cells: str) -> str:
    """One markdown table row; an empty cell stays a single space (`| a | | |`)."""
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def table_header(*titles: str) -> list[str]:
    """A markdown table's heading row and the separator row under it."""
    return [table_row(*titles), "|" + "---|" * len(titles)]


def not_measured_text(row: dict) -> str:
    """Why a row has no measurements: the reason it was skipped, or its error (cut to 80 characters)."""
    return row.get("skipped") or "failed: " + row["error"][:80]


def describe_variant(label: str, worker: dict) -> str:
    """How the PyTorch side of a comparison ran, in words."""
    parts = []
    if label == "torch-loader":
        parts.append(f"DataLoader, per-sample CPU aug, {worker.get('loader_workers', '?')} workers")
    elif label == "torch-compile":
        parts.append("torch.compile, tensors on device")
    elif label == "torch-device":
        parts.append("tensors on device")
    else:
        parts.append("eager")
    if worker.get("channels_last"):
        parts.append("channels_last")
    if worker.get("amp"):
        parts.append("AMP" + (" + GradScaler" if worker.get("grad_scaler") else ""))
    return ", ".join(parts)


def setting_text(row: dict) -> str:
    s = row.get("setting", {})
    task = row["task"]
    if task == "train":
        return f"width {s['width']:g}, batch {s['batch']}, {s['precision']}, {s['steps']} steps/run"
    if task == "eval":
        return f"width {s['width']:g}, {s['precision']}, {s['eval_images']} images, batch {s['eval_batch']}"
    if task == "gradcam":
        return f"width {s['width']:g}, {s['gradcam_images']} images, batch {s['gradcam_batch']}, {s.get('layer', 'layer3')}"
    if task in TRAINING_TASKS:
        subset = s.get("train_subset")
        images = "all train images" if not subset else f"{subset} train images"
        target = f", target {100 * s['target']:.0f}%" if s.get("target") else ""
        return f"width {s['width']:g}, {images}, {s['epochs']} epochs, batch {s['batch']}, {s['precision']}{target}"
    return ""


def comparisons(row: dict):
    """(label, torch worker, ratio summary) for each PyTorch variant the row compares with."""
    for key, ratio in row.get("ratios", {}).items():
        label = key.split("/", 1)[1]
        yield label, row["workers"].get(label, {}), ratio


# --------------------------------------------------------------------------- tables


def machine_line(results: dict) -> str:
    m, packages, git = results["machine"], results.get("packages", {}), results.get("git", {})
    gpus = ", ".join(g["name"] for g in m.get("gpus", [])) or "no GPU"
    versions = ", ".join(f"{name} {packages[name]}" for name in ("jax", "jaxlib", "flax", "optax", "torch") if name in packages)
    commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    load = m.get("load_average_at_start")
    load_end = m.get("load_average_at_end")
    load_text = ""
    if load:
        load_text = f"; 1-min load average {load[0]:.2f} at start" + (f", {load_end[0]:.2f} at end" if load_end else "")
    threads = results.get("threads", {}).get("per_worker")
    return (
        f"{m.get('cpu_model')} ({m.get('cpu_cores')} cores, {m.get('cores_available')} available, "
        f"{m.get('memory_gib')} GiB), {gpus}; {threads} thread(s) per framework; {versions}; "
        f"Python {m.get('python')}; commit {commit}; {results.get('created')}{load_text}"
    )


CONTENTION_WARNING = 0.25  # cores used by other processes during a row's measurements


def other_load(row: dict) -> float | None:
    """Median CPU cores used by other processes while the row's workers were measured (max over workers)."""
    values = [w["other_cpu_cores"]["median"] for w in row.get("workers", {}).values() if isinstance(w.get("other_cpu_cores"), dict)]
    return max(values) if values else None


def throughput_table(results: dict) -> list[str]:
    lines = table_header("measure", "setting", "jaxres img/s", "PyTorch img/s", "PyTorch side", "JAX/PyTorch", "others' CPU (cores)")
    for row in results["rows"]:
        if row["task"] not in TASK_TITLES:
            continue
        title = TASK_TITLES[row["task"]]
        if "skipped" in row or "error" in row:
            lines.append(table_row(title, setting_text(row), "–", "–", not_measured_text(row), "–", "–"))
            continue
        jax_worker = row["workers"]["jax"]
        load = other_load(row)
        for label, worker, ratio in comparisons(row):
            lines.append(table_row(
                title, setting_text(row), fmt_summary(jax_worker["throughput"]), fmt_summary(worker["throughput"]),
                describe_variant(label, worker), fmt_ratio(ratio), fmt_or_dash(load, ".2f"),
            ))
    return lines


def contention_notes(results: dict) -> list[str]:
    busy = [(row["name"], other_load(row)) for row in results["rows"] if other_load(row) is not None]
    busy = [(name, load) for name, load in busy if load > CONTENTION_WARNING]
    if not busy:
        return []
    cores = results["machine"].get("cores_available")
    return [
        "Warning: other processes kept the CPU busy during "
        + ", ".join(f"{name} ({load:.2f} of {cores} cores)" for name, load in busy)
        + ". Alternating runs share such load between the frameworks, but the frameworks do not "
        "suffer from it equally (PyTorch's OpenMP threads wait on each other when one is descheduled), "
        "so these ratios describe a busy machine, not an idle one."
    ]


def accuracy_table(results: dict) -> list[str]:
    rows = [r for r in results["rows"] if r["task"] == "accuracy"]
    if not rows:
        return []
    lines = table_header(
        "setting", "jaxres test acc", "PyTorch test acc", "jaxres wall s", "PyTorch wall s", "wall JAX/PyTorch",
        "to target: jaxres / PyTorch s",
    )
    for row in rows:
        if "skipped" in row or "error" in row:
            lines.append(table_row(setting_text(row) if "setting" in row else row["name"], not_measured_text(row), "", "", "", "", ""))
            continue
        j, t = row["workers"]["jax"], row["workers"]["torch"]
        target = "–"
        if row["setting"].get("target"):
            fmt = lambda values: ", ".join(f"{v:.1f}" if v is not None else "not reached" for v in values)  # noqa: E731
            target = f"{fmt(j['seconds_to_target'])} / {fmt(t['seconds_to_target'])}"
        acc = lambda w: accuracy_text(w["final_accuracy"])  # noqa: E731
        lines.append(table_row(
            setting_text(row), acc(j), acc(t), fmt_summary(j["wall_seconds"]), fmt_summary(t["wall_seconds"]),
            fmt_ratio(row["ratios"].get("wall_seconds jax/torch")), target,
        ))
    return lines


def converged_table(results: dict) -> list[str]:
    """The converged rows: per framework the median final test accuracy without and with TTA and
    the median wall time, the seeds, and the paired (same seed) jaxres - PyTorch differences."""
    rows = [r for r in results["rows"] if r["task"] == "converged"]
    if not rows:
        return []
    lines = table_header(
        "setting", "seeds", "jaxres test acc", "PyTorch test acc", "jaxres with TTA", "PyTorch with TTA",
        "jaxres − PyTorch, points (paired): no TTA; TTA", "jaxres wall s", "PyTorch wall s", "wall JAX/PyTorch",
    )
    def setting_and_seeds(row: dict) -> tuple[str, str]:
        s = row.get("setting")
        if not s:
            return row["name"], ""
        return setting_text(row) + (f", TTA {s['tta']}" if s.get("tta") else ""), ", ".join(str(seed) for seed in s["seeds"])

    for row in rows:
        if "skipped" in row or "error" in row:
            setting, seeds = setting_and_seeds(row)
            done = sum(len(runs) for runs in row.get("runs", {}).values())
            if row.get("error", "").startswith("incomplete"):  # a checkpoint of a run in progress
                text = row["error"]
            else:
                text = not_measured_text(row) + (f" ({done} runs recorded)" if done else "")
            lines.append(table_row(setting, seeds, text, "", "", "", "", "", "", ""))
            continue
        j, t = row["workers"]["jax"], row["workers"]["torch"]
        tta = lambda w: accuracy_text(w["final_tta_accuracy"]) if "final_tta_accuracy" in w else "–"  # noqa: E731
        differences = row.get("paired_difference", {})
        difference = "; ".join(difference_text(differences[k]) for k in ("final_accuracy", "final_tta_accuracy") if k in differences)
        lines.append(table_row(
            *setting_and_seeds(row), accuracy_text(j["final_accuracy"]), accuracy_text(t["final_accuracy"]), tta(j), tta(t), difference or "–",
            fmt_summary(j["wall_seconds"]), fmt_summary(t["wall_seconds"]), fmt_ratio(row["ratios"].get("wall_seconds jax/torch")),
        ))
    return lines


def difference_text(difference: dict) -> str:
    """A paired accuracy difference in points: the mean, its standard error, and each seed's."""
    text = f"{100 * difference['mean']:+.2f}"
    if difference.get("standard_error") is not None:
        text += f" (s.e. {100 * difference['standard_error']:.2f}"
        text += "; per seed " + ", ".join(f"{100 * v:+.2f}" for v in difference["values"]) + ")"
    return text


def accuracy_text(summary: dict) -> str:
    """A median accuracy, with its range when there were several runs."""
    text = fmt_percent(summary["median"])
    if summary.get("n", 1) > 1:
        text += f" ({fmt_percent(summary['min'])}–{fmt_percent(summary['max'])})"
    return text


def second_run_text(jax_worker: dict) -> str:
    """The second run's first call, compile time and overhead (first call minus a steady call)."""
    second = jax_worker.get("second_run")
    if not second or "first_call_seconds" not in second:
        return "–" if not second else f"failed: {second.get('error', '?')}"
    steady = jax_worker.get("seconds", {}).get("median")
    overhead = second["first_call_seconds"] - steady if common.is_number(steady) else None
    return f"{fmt_number(second['first_call_seconds'])}, {fmt_number(second.get('compile_seconds'))}, {fmt_number(overhead)}"


def warmup_table(results: dict) -> list[str]:
    lines = table_header(
        "row", "jaxres first call s", "jaxres compile s", "PyTorch side", "PyTorch first call s",
        "first-call overhead JAX / PyTorch s", "jaxres second run: first call s, compile s, overhead s",
    )
    count = 0
    for row in results["rows"]:
        if row["task"] not in TASK_TITLES or "workers" not in row:
            continue
        j = row["workers"]["jax"]
        for label, worker, _ in comparisons(row):
            count += 1
            overheads = f"{fmt_number(j.get('first_call_overhead_seconds'))} / {fmt_number(worker.get('first_call_overhead_seconds'))}"
            lines.append(table_row(
                row["name"], fmt_number(j.get("first_call_seconds")), fmt_number(j.get("compile_seconds")),
                describe_variant(label, worker), fmt_number(worker.get("first_call_seconds")), overheads, second_run_text(j),
            ))
    for row in results["rows"]:
        if row["task"] in TRAINING_TASKS and "workers" in row:
            lines.append(table_row(row["name"], "–", fmt_number(row["workers"]["jax"].get("compile_seconds")), "eager", "–", "–", "–"))
            count += 1
    return lines if count else []


def memory_table(results: dict) -> list[str]:
    gpu = results.get("device") == "gpu"
    unit = "device peak MiB" if gpu else "peak host RSS MiB"
    lines = table_header("row", f"jaxres {unit}", "PyTorch side", f"PyTorch {unit}", "JAX/PyTorch")
    count = 0
    for row in results["rows"]:
        if "workers" not in row:
            continue
        if row["task"] in TRAINING_TASKS:
            j, t = row["workers"]["jax"], row["workers"]["torch"]
            ratio = j["memory_mib"] / t["memory_mib"] if common.is_number(j.get("memory_mib")) and common.is_number(t.get("memory_mib")) and t["memory_mib"] else None
            lines.append(table_row(row["name"], fmt_number(j.get("memory_mib")), "device pipeline", fmt_number(t.get("memory_mib")), fmt_number(ratio)))
            count += 1
            continue
        j = row["workers"]["jax"]
        for label, worker, _ in comparisons(row):
            ratio = row.get("memory_ratios", {}).get(f"jax/{label}")
            extra = ""
            children = worker.get("memory", {}).get("children_rss_mib")
            if label == "torch-loader" and children and not gpu:
                extra = f" (+{children:,.0f} in loader workers)"
            lines.append(table_row(
                row["name"], fmt_number(j.get("memory_mib")), describe_variant(label, worker),
                fmt_number(worker.get("memory_mib")) + extra, fmt_number(ratio),
            ))
            count += 1
    return lines if count else []


def parity_table(results: dict) -> list[str]:
    if not results.get("parity"):
        return []
    lines = table_header(
        "width", "images", "max abs logit", "max abs difference", "relative", "argmax agreement", "Grad-CAM max abs diff", "passed"
    )
    for p in results["parity"]:
        lines.append(table_row(
            f"{p['width']:g}", str(p["images"]), f"{p['max_abs_logit']:.3g}", f"{p['max_abs_difference']:.2e}",
            f"{p['relative_difference']:.2e}", f"{p['argmax_agreement']:.3f}", fmt_or_dash(p.get("cam_max_abs_difference"), ".2e"),
            "yes" if p["passed"] else "NO",
        ))
    return lines


def ratio_lines(results: dict) -> list[str]:
    """Every ratio measured, one per line (for notes and the terminal)."""
    lines = []
    for row in results["rows"]:
        for key, ratio in row.get("ratios", {}).items():
            quantity = "throughput" if row["task"] in TASK_TITLES else key.split(" ", 1)[0]
            pair = key.split(" ")[-1]
            lines.append(
                f"- {row['name']}, {quantity} {pair}: {ratio['median']:.3f} (min {ratio['min']:.3f}, max {ratio['max']:.3f}, n={ratio['n']})"
            )
        for key, value in row.get("memory_ratios", {}).items():
            lines.append(f"- {row['name']}, peak memory {key}: {value:.3f}")
    return lines


def markdown(results: dict) -> str:
    """The full report as markdown (what `benchmarks.run` prints)."""
    plan = results.get("plan", {})
    out = [
        f"### jaxres vs PyTorch ({results['suite']} suite, {results['mode']} mode, {results['device']})",
        "",
        f"Machine: {machine_line(results)}.",
        "",
        f"Each cell: median (min–max) of {plan.get('repeats')} alternating runs after {plan.get('warmup')} warm-up call(s); "
        "ratios are JAX/PyTorch computed pair by pair (throughput > 1: jaxres faster; seconds and memory < 1: jaxres needs less).",
    ]
    if any(row["task"] in TASK_TITLES for row in results["rows"]):  # e.g. none in a `--tasks converged` run
        out += ["", "**Throughput** (images/s; compilation and warm-up excluded)", "", *throughput_table(results)]
    for title, table in (
        ("**Time to accuracy** (each framework once per seed, from the same initial weights, compilation included: each run starts with an empty compilation cache; wall time from the first step to the last evaluation; medians (min–max) and the median of the per-seed ratios when there are several seeds)", accuracy_table(results)),
        ("**The recipe at convergence** (each framework once per seed from the same initial weights, seed r: data order and augmentation r on both sides; final test accuracy of the last epoch without and with the test-time augmentation (flip: the mean of the logits of image and mirror); medians (min–max) per framework, the paired difference averaged over seeds; wall time as above, the TTA evaluation apart)", converged_table(results)),
        ("**Compile / warm-up** (never part of the throughput; overhead = first call minus a steady call)", warmup_table(results)),
        ("**Peak memory**", memory_table(results)),
        ("**Same computation check** (same weights through `jaxres.convert`, logits and Grad-CAM on the same test images, fp32)", parity_table(results)),
    ):
        if table:
            out += ["", title, "", *table]
    warnings = contention_notes(results)
    if warnings:
        out += ["", *warnings]
    skipped = [r for r in results["rows"] if "skipped" in r]
    if skipped:
        out += ["", "Skipped: " + "; ".join(f"{r['name']}: {r['skipped']}" for r in skipped)]
    if results.get("notes"):
        out += ["", *[f"Note: {note}" for note in results["notes"]]]
    for resumed in results.get("resumed", []):
        out += ["", f"Resumed at {resumed['at']} from `{resumed['from']}` (recorded with commit "
                f"{((resumed.get('previous_git') or {}).get('commit') or 'unknown')[:12]}): kept "
                + ("; ".join(resumed["kept"]) if resumed.get("kept") else "nothing") + "."]
    return "\n".join(out) + "\n"


def readme_section(results: dict, chart_path: str | None = "benchmarks/results/ratios.png", converged_from: dict | None = None) -> str:
    """The README's "Results" section, made from one results JSON; with `converged_from`
    (another results JSON, e.g. of `--tasks converged`, hours long) its converged rows too."""
    command = {
        "quick": "python -m benchmarks.run --quick",
        "full": "python -m benchmarks.run",
        "gpu": "bash benchmarks/gpu.sh",
        "smoke": "python -m benchmarks.run --smoke",
    }.get(results["mode"], "python -m benchmarks.run")
    out = [
        "## Results",
        "",
        f"Measured with `{command}` on {machine_line(results)}. "
        f"Raw numbers: `benchmarks/results/{results['name']}.json` (also `benchmarks/results/latest.json`); "
        "regenerate this section with `python -m benchmarks.report`.",
        "",
    ]
    if chart_path:
        out += [f"![JAX/PyTorch ratios]({chart_path})", ""]
    body = markdown(results).split("\n", 2)[2]  # drop the heading and the blank line after it
    out.append(body)
    if converged_from is not None:
        out += converged_section(converged_from)
    return "\n".join(out)


def converged_section(results: dict) -> list[str]:
    """The converged rows of `results` for the README, with the run's command, machine and file."""
    table = converged_table(results)
    if not table:
        return []
    resumed = f", resumed {len(results['resumed'])} time(s)" if results.get("resumed") else ""
    return [
        f"**The recipe at convergence** (measured with `python -m benchmarks.run --tasks converged` on {machine_line(results)}"
        f"{resumed}; raw numbers: `benchmarks/results/{results['name']}.json`; each framework once per seed from the same "
        "initial weights, seed r: data order and augmentation r on both sides; final test accuracy without and with the "
        "flip TTA (the mean of the logits of image and mirror); the paired difference averaged over seeds)",
        "",
        *table,
        "",
    ]


# --------------------------------------------------------------------------- chart


def chart_entries(results: dict) -> list[tuple[str, float, float, float]]:
    """(label, median, min, max) of jaxres's speed relative to PyTorch for each comparison:
    throughput ratios as they are, time to accuracy as PyTorch wall / jaxres wall."""
    entries = []
    for row in results["rows"]:
        if row["task"] in TASK_TITLES:
            for label, worker, ratio in comparisons(row):
                name = f"{row['name']} vs {label.replace('torch-', '') if label != 'torch' else 'torch'}"
                entries.append((name, ratio["median"], ratio["min"], ratio["max"]))
        elif row["task"] in TRAINING_TASKS and "ratios" in row:
            ratio = row["ratios"]["wall_seconds jax/torch"]
            entries.append((f"{row['name']} (1 / wall ratio)", 1 / ratio["median"], 1 / ratio["max"], 1 / ratio["min"]))
    return entries


def plot_ratios(results: dict, path: Path) -> bool:
    """A horizontal bar chart of `chart_entries` (log scale, line at 1). False if nothing to plot."""
    entries = chart_entries(results)
    if not entries:
        return False
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = [e[0] for e in entries][::-1]
    medians = [e[1] for e in entries][::-1]
    lows = [e[2] for e in entries][::-1]
    highs = [e[3] for e in entries][::-1]
    positions = range(len(entries))
    figure, axis = plt.subplots(figsize=(10, 0.45 * len(entries) + 1.8))
    colours = ["tab:green" if m >= 1 else "tab:red" for m in medians]
    axis.barh(positions, [m - 1 for m in medians], left=1.0, color=colours, alpha=0.75, height=0.6)
    axis.errorbar(medians, positions, xerr=[[m - lo for m, lo in zip(medians, lows)], [hi - m for m, hi in zip(medians, highs)]],
                  fmt="none", ecolor="black", capsize=3, linewidth=1)
    axis.axvline(1.0, color="black", linewidth=1)
    axis.set_xscale("log")
    span = max(max(highs), 1 / min(lows), 1.25)
    axis.set_xlim(1 / (span * 1.6), span * 1.6)
    ticks = [2.0**k for k in range(-8, 9) if 1 / (span * 1.6) <= 2.0**k <= span * 1.6]
    axis.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_yticks(list(positions), labels, fontsize=8)
    axis.set_xlabel("jaxres speed / PyTorch speed (median, min–max of alternating pairs); > 1: jaxres faster")
    where = results["machine"].get("cpu_model") if results["device"] == "cpu" else ", ".join(g["name"] for g in results["machine"].get("gpus", []))
    axis.set_title(f"jaxres vs PyTorch: {results['suite']} suite, {results['mode']} mode, {where}", fontsize=9)
    for index, (value, low, high) in enumerate(zip(medians, lows, highs)):
        if value >= 1:
            axis.text(high * 1.03, index, f"{value:.2f}", va="center", ha="left", fontsize=8)
        else:
            axis.text(low / 1.03, index, f"{value:.2f}", va="center", ha="right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default=str(common.RESULTS_DIR / "latest.json"))
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "README_results.md"), help="where the README section goes")
    parser.add_argument("--chart", default=None, help="also redraw the ratio chart here (e.g. benchmarks/results/ratios.png)")
    parser.add_argument("--converged-from", metavar="RESULTS_JSON",
                        help="also the converged rows of this results file (a `--tasks converged` run's: hours, so run apart)")
    args = parser.parse_args(argv)
    paths = [Path(args.results)] + ([Path(args.converged_from)] if args.converged_from else [])
    for path in paths:
        if not path.is_file():
            print(f"error: no results at {path}; run `python -m benchmarks.run --quick` first", file=sys.stderr)
            return 2
    results = json.loads(paths[0].read_text())
    converged_from = json.loads(paths[1].read_text()) if args.converged_from else None
    section = readme_section(results, converged_from=converged_from)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(section)
    if args.chart:
        plot_ratios(results, Path(args.chart))
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
