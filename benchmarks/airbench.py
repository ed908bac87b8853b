"""jaxres's `--preset airbench94` against the published airbench94, same CPU, same data, in one run.

    python -m benchmarks.airbench --data ../shared/data/cifar10-jpeg.tar.gz --seeds 0 1 2 \\
        --reference "REF_PYTHON REF_DIR/airbench94_cpu.py --seed {seed} --data {npz} --json {json}" \\
        --reference-seeds 0 1 [--resume benchmarks/results/airbench94-cpu-....json]

The reference is KellerJordan/cifar10-airbench's `legacy/airbench94.py`, run as its own
process from a copy the user makes (it is never part of this repository): changed only as a
CPU needs (device, float32, data read from an .npz, timers, a seed flag, a JSON result with
`tta_val_acc`, `val_acc`, `total_time_seconds`; benchmarks/README.md lists the changes).
This script writes that .npz (`--npz`) from jaxres's own decoder, so both sides see the same
pixels: the training split permuted once with np.random.default_rng(0).permutation(N) (the
JPEG copy is sorted by class, and airbench builds its whitening layer from the first 5,000
training images; jaxres's preset takes the same 5,000, `jaxres.airbench.whitening_sample`),
the test split as stored.

Runs alternate between the two sides, seed by seed, one process at a time with the same
thread count. The results file is written before the first run and after each one; `--resume FILE`
runs FILE's planned seeds with its settings, skips the runs it holds and continues an interrupted
jaxres run from its checkpoint, so a comparison longer than a session goes on in the next. On a machine of few cores, the seeds can
also run side by side, one per core (`taskset -c K python -m benchmarks.airbench --seeds S
--threads 1`), and `--combine FILE ...` makes one comparison of the files. Reported per side: final accuracy
with and without TTA (level 2), the time airbench itself counts (whitening, the training
epochs and the final TTA evaluation; jaxres: its epochs' training and compilation seconds
and the final TTA evaluation), and the whole process's wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common

DEFAULT_DATA = "../shared/data/cifar10-jpeg.tar.gz"
SIDES = ("jaxres", "reference")
# what a results file records of how its runs were made, and its value in files older than the record
RECORDED_SETTINGS = {"threads": None, "data": None, "jaxres_flags": [], "malloc": "system"}
# --malloc: how glibc's malloc is set in each side's process (files older than the setting: "system")
MALLOCS = {
    "each-own": "jaxres keeps freed memory (the train command's default, jaxres/runtime.py); the reference has glibc's defaults, as published",
    "kept": "both keep freed memory (the reference through GLIBC_TUNABLES, the same settings)",
    "system": "both with glibc's defaults (jaxres through JAXRES_MALLOC=system)",
}
# the runs a results file plans, with this script's defaults; files older than the record (before
# 2026-12-05 evening) lack them, and resuming one of those without --seeds is refused, not guessed
RUN_PLAN = {"seeds": [0, 1, 2], "reference": None, "reference_seeds": [0, 1]}
SHUFFLE_SEED = 0  # the permutation of the training split (= jaxres.airbench.WHITENING_SAMPLE_SEED)


def write_reference_data(data: str, path: Path, cache_dir: str | None = None) -> dict:
    """The .npz the reference reads: train_images/train_labels shuffled, test as stored, perm."""
    from jaxres import airbench, data as data_lib

    assert SHUFFLE_SEED == airbench.WHITENING_SAMPLE_SEED
    dataset = data_lib.load_dataset(data, cache_dir=cache_dir, progress=False)
    perm = np.random.default_rng(SHUFFLE_SEED).permutation(len(dataset.train.labels))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")  # two processes may write it at once
    np.savez(
        temporary, train_images=dataset.train.images[perm], train_labels=dataset.train.labels[perm],
        test_images=dataset.test.images, test_labels=dataset.test.labels, perm=perm,
        class_names=np.array(dataset.class_names),
    )  # fmt: skip
    os.replace(temporary, path)
    return {"npz": str(path), "source": dataset.source, "train": int(len(perm)), "test": int(len(dataset.test.labels))}


def jaxres_command(args, seed: int, workdir: Path) -> list[str]:
    command = [sys.executable, "-m", "jaxres.train", "--no-progress", "--workdir", str(workdir)]
    if (workdir / "config.json").is_file() and any(workdir.glob("checkpoint*")):
        return command + ["--resume"]  # an interrupted run goes on from its last epoch
    return command + ["--preset", "airbench94", "--data", args.data, "--seed", str(seed), *args.jaxres_flag]


def run_jaxres(args, seed: int, out_dir: Path) -> dict:
    """One `--preset airbench94` run, its figures read from its metrics.jsonl."""
    workdir = out_dir / f"jaxres-seed{seed}"
    started = time.perf_counter()
    subprocess.run(jaxres_command(args, seed, workdir), check=True, env=common_environment(args), preexec_fn=pinned(args))
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1]
    return {
        "seed": seed,
        "accuracy": last["test_accuracy"],
        "tta_accuracy": last["final_tta_accuracy"],
        "timed_seconds": sum(r["seconds"] + r["compile_seconds"] for r in rows) + last["final_tta_seconds"],
        "compile_seconds": sum(r["compile_seconds"] for r in rows),
        "epoch_seconds": [r["seconds"] for r in rows],
        "test_accuracy_per_epoch": [r["test_accuracy"] for r in rows],
        "wall_seconds_this_process": wall,
        "workdir": str(workdir),
    }


def run_reference(args, seed: int, out_dir: Path, npz: Path) -> dict:
    """One run of the user's copy of the published script, read from the JSON it writes."""
    result_path = out_dir / f"reference-seed{seed}.json"
    command = shlex.split(args.reference.format(seed=seed, npz=npz, json=result_path))
    started = time.perf_counter()
    subprocess.run(command, check=True, env=common_environment(args), preexec_fn=pinned(args))
    wall = time.perf_counter() - started
    found = json.loads(result_path.read_text())
    return {
        "seed": seed,
        "accuracy": found["val_acc"],
        "tta_accuracy": found["tta_val_acc"],
        "timed_seconds": found["total_time_seconds"],
        "epoch_seconds": found.get("epoch_times"),
        "test_accuracy_per_epoch": found.get("val_accs"),
        "wall_seconds_this_process": wall,
        "command": command,
    }


def common_environment(args) -> dict:
    """Both sides on `--threads` threads (OpenMP/MKL's variables here, the cores in `pinned`),
    with glibc's malloc set as `--malloc` says (`MALLOCS`)."""
    from jaxres import runtime

    env = common.thread_environment(args.threads)
    if args.malloc == "kept":
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), runtime.GLIBC_TUNABLES_KEEPING_FREED_MEMORY)))
    elif args.malloc == "system":
        env[runtime.MALLOC_VARIABLE] = "system"
    return env


def pinned(args):
    """A preexec_fn that pins the child to the first `--threads` allowed cores (XLA:CPU sizes
    its pool from them), as the suite's workers pin themselves."""
    return lambda: common.pin_to_cores(args.threads)


def summary(runs: list[dict]) -> dict:
    if not runs:
        return {}
    pick = lambda key: [r[key] for r in runs]  # noqa: E731
    return {
        "seeds": pick("seed"),
        "tta_accuracy_mean": statistics.fmean(pick("tta_accuracy")),
        "tta_accuracy_median": statistics.median(pick("tta_accuracy")),
        "tta_accuracy_sd": statistics.stdev(pick("tta_accuracy")) if len(runs) > 1 else None,
        "accuracy_mean": statistics.fmean(pick("accuracy")),
        "timed_seconds_median": statistics.median(pick("timed_seconds")),
        "wall_seconds_median": statistics.median(pick("wall_seconds_this_process")),
    }


def compare(results: dict) -> dict:
    ours, theirs = summary(results["runs"]["jaxres"]), summary(results["runs"]["reference"])
    comparison = {"jaxres": ours, "reference": theirs}
    if not (ours and theirs):
        missing = " and ".join(side for side, found in (("jaxres", ours), ("reference", theirs)) if not found)
        comparison["not_compared"] = f"no {missing} runs (yet)"
    else:
        comparison["tta_accuracy_mean_difference_points"] = 100 * (ours["tta_accuracy_mean"] - theirs["tta_accuracy_mean"])
        sources = {r.get("source") for side in results["runs"].values() for r in side}
        if len(sources) > 1:  # a combined file: other sessions' CPUs, threads and loads are no ratio
            comparison["times_not_compared"] = (
                f"the runs come from {len(sources)} results files (other sessions or cores: the CPU, threads or load "
                "can differ); times are compared within one file"
            )  # fmt: skip
            return comparison
        comparison["timed_seconds_ratio_jaxres_over_reference"] = ours["timed_seconds_median"] / theirs["timed_seconds_median"]
        comparison["wall_seconds_ratio_jaxres_over_reference"] = ours["wall_seconds_median"] / theirs["wall_seconds_median"]
    return comparison


def split_side(argument: str) -> tuple[Path, tuple[str, ...]]:
    """'FILE' -> (FILE, both sides); 'FILE:jaxres' or 'FILE:reference' -> that side only."""
    name, _, side = argument.rpartition(":")
    if name and side in SIDES:
        return Path(name), (side,)
    return Path(argument), SIDES


def combine(paths: list, out_dir: Path, ignored_flags: tuple = ()) -> Path:
    """One results file from several of this script's: seeds measured in other sessions, or
    side by side on separate cores (`taskset -c K python -m benchmarks.airbench --seeds S
    --threads 1`, one per core). `FILE:jaxres` or `FILE:reference` takes one side's runs of a
    file (e.g. the reference's, beside jaxres runs of a later commit; the others are left out
    and the file's entry in `combined_from` says so). Each run keeps its file, thread count, CPU and commit. The
    accuracies are compared over all runs; the times only when all come from one file (one
    session, the sides alternating on the same threads): a CPU's model name does not say
    which vector extensions it has, nor a file what else shared the machine. A side's seed in
    two files is an error (which one counts?). A jaxres flag in `ignored_flags` is left out
    when the files' flags are compared: one that some files give and the others' commit does
    by default (e.g. `--conv-algorithm=winograd`, the airbench94 preset's own choice on a CPU
    since its `conv_algorithm` became `auto`); each jaxres run keeps its file's flags."""
    now = datetime.datetime.now(datetime.timezone.utc)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    sources, seen, settings = [], {}, {}
    for argument in paths:
        path, sides = split_side(str(argument))
        found = json.loads(path.read_text())
        if found.get("combined_from"):
            raise ValueError(f"{path} is itself a combined file: combine the files it names instead")
        if not any(found["runs"][side] for side in sides):
            raise ValueError(f"{path} holds no finished {' or '.join(sides)} run yet")
        # what the runs measured must be the same: the data, and jaxres's flags where the file gives jaxres runs
        for key in ("data", "jaxres_flags") if "jaxres" in sides else ("data",):
            value = found.get(key, RECORDED_SETTINGS[key])
            if key == "jaxres_flags":
                value = [flag for flag in value if flag not in ignored_flags]
            first = settings.setdefault(key, (value, path))
            if first[0] != value:
                raise ValueError(f"{path} has {key} {value!r}, {first[1]} has {first[0]!r}: not one measurement")
        cpu, commit = found["machine"]["cpu_model"], found["git"]["commit"]
        for side in sides:
            for run in found["runs"][side]:
                if (side, run["seed"]) in seen:
                    raise ValueError(f"{side} seed {run['seed']} is in both {seen[side, run['seed']]} and {path}")
                seen[side, run["seed"]] = path
                runs[side].append({**run, "source": str(path), "threads": found["threads"], "cpu_model": cpu, "commit": commit,
                                   "malloc": found.get("malloc", RECORDED_SETTINGS["malloc"]),
                                   **({"jaxres_flags": found.get("jaxres_flags", RECORDED_SETTINGS["jaxres_flags"])} if side == "jaxres" else {})})  # fmt: skip
        sources.append({"file": str(path), "threads": found["threads"], "machine": found["machine"], "git": found["git"],
                        "runs": {side: [r["seed"] for r in found["runs"][side]] for side in sides},
                        "left_out": {side: [r["seed"] for r in found["runs"][side]] for side in SIDES if side not in sides}})  # fmt: skip
    for side in runs:
        runs[side].sort(key=lambda r: r["seed"])
    path = new_results_path(Path(out_dir), f"airbench94-combined-{now.strftime('%Y%m%dT%H%M%SZ')}")
    results = {"name": path.stem, "created": now.isoformat(timespec="seconds"), "combined_from": sources,
               "data": settings["data"][0], "jaxres_flags": settings.get("jaxres_flags", ([],))[0],
               **({"ignored_flags": list(ignored_flags)} if ignored_flags else {}), "runs": runs}  # fmt: skip
    write(results, path)
    return path


def new_results_path(out_dir: Path, name: str) -> Path:
    """out_dir/name.json, created empty here, or name-2.json, ... where it exists: two
    comparisons started in the same second (one per core) get a file each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = out_dir / (f"{name}.json" if attempt == 1 else f"{name}-{attempt}.json")
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free results file name like {out_dir / name}.json")


SIDE_COLOURS = {"jaxres": "tab:blue", "reference": "tab:orange"}


def comparison_figure(results: dict):
    """Test accuracy after each epoch (each seed thin, the side's mean thick) and the final
    accuracy with TTA per seed (the side's mean a bar), one colour per side. Returns the
    figure and the mean curves it drew ({side: float[epochs]}, in percent)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    curves_axes, final_axes = figure.subplots(1, 2, width_ratios=(2, 1))
    means = {}
    for position, side in enumerate(SIDES):
        runs, colour = results["runs"][side], SIDE_COLOURS[side]
        curves = [100 * np.asarray(r["test_accuracy_per_epoch"]) for r in runs if r.get("test_accuracy_per_epoch")]
        if curves:
            length = min(len(c) for c in curves)
            epochs = np.arange(1, length + 1)
            for curve in curves:
                curves_axes.plot(epochs, curve[:length], color=colour, alpha=0.3, linewidth=0.8)
            means[side] = np.mean([c[:length] for c in curves], axis=0)
            curves_axes.plot(epochs, means[side], color=colour, linewidth=2, label=f"{side} (mean of {len(curves)})")
        finals = [100 * r["tta_accuracy"] for r in runs]
        if finals:
            final_axes.scatter(np.full(len(finals), position), finals, color=colour, zorder=3)
            for r, value in zip(runs, finals):
                final_axes.annotate(f"seed {r['seed']}", (position, value), xytext=(6, 0), textcoords="offset points", fontsize=7, va="center")
            final_axes.hlines(np.mean(finals), position - 0.25, position + 0.25, color=colour, linewidth=2)
    curves_axes.set(xlabel="epoch", ylabel="test accuracy (%, no TTA)", title="after each epoch")
    curves_axes.grid(alpha=0.3)
    if means:
        curves_axes.legend(loc="lower right")
    final_axes.set(xticks=[0, 1], xticklabels=SIDES, xlim=(-0.6, 1.9), ylabel="test accuracy with TTA (%)",
                   title="final, per seed (bar: mean)")  # fmt: skip
    final_axes.grid(alpha=0.3, axis="y")
    return figure, means


def save_comparison_figure(results: dict, path: Path) -> Path:
    """`comparison_figure` as `path` (a .png beside the results file)."""
    from jaxres import plots

    figure, _ = comparison_figure(results)
    return plots.save_figure(figure, path, dpi=120)


def write(results: dict, path: Path) -> None:
    results["comparison"] = compare(results)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=1))
    os.replace(temporary, path)


def plan_runs(seeds: list[int], reference_seeds: list[int]) -> list[tuple[str, int]]:
    """Alternating order: reference seed s, then jaxres seed s, for each seed; leftovers at the end."""
    order = []
    for seed in sorted(set(seeds) | set(reference_seeds)):
        if seed in reference_seeds:
            order.append(("reference", seed))
        if seed in seeds:
            order.append(("jaxres", seed))
    return order


def stop_runs_on_sigterm() -> None:
    """A SIGTERM (`kill`, `pkill`) raises SystemExit, so `subprocess.run` kills the run in
    progress before this process ends: without it the run went on, orphaned, in the scratch
    folder, stealing the CPU from the next comparison (Ctrl-C reaches the run anyway)."""

    def exit_on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.airbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help=f"the dataset (jaxres --data; default {DEFAULT_DATA}, or the resumed file's)")
    p.add_argument("--seeds", type=int, nargs="+", help="jaxres seeds (default: 0 1 2, or the resumed file's)")
    p.add_argument("--reference", help="the reference's command, with {seed}, {npz} and {json} "
                                       "(default: none, jaxres only, or the resumed file's)")  # fmt: skip
    p.add_argument("--reference-seeds", type=int, nargs="+", help="reference seeds (default: 0 1, or the resumed file's)")
    p.add_argument("--npz", default=str(common.RESULTS_DIR / "tmp" / "cifar10-shuffled.npz"),
                   help="where the reference's shuffled data is written (git-ignored; never commit it)")  # fmt: skip
    p.add_argument("--threads", type=int, help="threads of each side (default: the cores available, or the resumed file's)")
    p.add_argument("--malloc", choices=tuple(MALLOCS), help="glibc's malloc in each side's process: "
                   + "; ".join(f"{k}: {v}" for k, v in MALLOCS.items()) + " (default: each-own, or the resumed file's)")  # fmt: skip
    p.add_argument("--jaxres-flag", action="append", help="an extra jaxres.train flag (repeatable; default: the resumed file's)")
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--resume", help="a results file of an earlier run of this script: keep its runs, do the rest")
    p.add_argument("--combine", nargs="+", metavar="FILE[:SIDE]",
                   help="run nothing: write one results file (in --out) from these results files, e.g. one per core; "
                        "FILE:jaxres or FILE:reference takes one side's runs only")  # fmt: skip
    p.add_argument("--ignore-flag", action="append", default=[], metavar="FLAG",
                   help="with --combine: a jaxres flag left out when the files' flags are compared, one that some "
                        "files give and the others' commit does by default (e.g. --conv-algorithm=winograd, the "
                        "airbench94 preset's own choice on a CPU since a0ddd89); each run keeps its file's flags")  # fmt: skip
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ignore_flag and not args.combine:
        parser.error("--ignore-flag applies to --combine only")
    if args.combine:
        if args.resume:
            parser.error("--combine runs nothing; --resume runs: one or the other")
        path = combine(args.combine, Path(args.out), tuple(args.ignore_flag))
        results = json.loads(path.read_text())
        print(json.dumps(results["comparison"], indent=1))
        print(f"wrote {path} and {save_comparison_figure(results, path.with_suffix('.png'))}")
        return 0
    stop_runs_on_sigterm()
    if args.resume:
        path = Path(args.resume)
        results = json.loads(path.read_text())
        if results.get("combined_from"):
            parser.error(f"{path} is a combined file (--combine); resume one of the files it names")
        # a resumed comparison goes on as it began: the same threads, data, jaxres flags and malloc
        for name, key in (("threads", "threads"), ("data", "data"), ("jaxres_flag", "jaxres_flags"), ("malloc", "malloc")):
            recorded, given = results.get(key, RECORDED_SETTINGS[key]), getattr(args, name)
            if given is not None and given != recorded:
                parser.error(f"{path} was measured with {key} {recorded!r}, not {given!r}; resume it as it began")
            setattr(args, name, recorded)
        # and runs the seeds it planned, unless told other seeds (to add some, say)
        if args.seeds is None and "seeds" not in results:
            parser.error(f"{path} does not record its seeds (it predates that record): name them with --seeds")
        for key in RUN_PLAN:
            if getattr(args, key) is None:
                setattr(args, key, results.get(key, RUN_PLAN[key]))
        results.setdefault("resumed", []).append(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    else:
        args.threads = common.available_cores() if args.threads is None else args.threads
        args.data = DEFAULT_DATA if args.data is None else args.data
        args.jaxres_flag = args.jaxres_flag or []
        args.malloc = args.malloc or "each-own"
        for key, default in RUN_PLAN.items():
            setattr(args, key, default if getattr(args, key) is None else getattr(args, key))
        now = datetime.datetime.now(datetime.timezone.utc)
        path = new_results_path(Path(args.out), f"airbench94-cpu-{now.strftime('%Y%m%dT%H%M%SZ')}")
        results = {
            "name": path.stem, "created": now.isoformat(timespec="seconds"), "machine": common.machine_record(),
            "packages": common.package_versions(), "git": common.git_commit(), "threads": args.threads,
            "data": args.data, "jaxres_flags": args.jaxres_flag, "runs": {side: [] for side in SIDES},
        }  # fmt: skip
    # what this process runs, new or resumed: the next resume's plan and malloc
    results.update({key: getattr(args, key) for key in (*RUN_PLAN, "malloc")})
    scratch = Path(args.out) / "tmp" / results["name"]  # workdirs and the reference's JSON (git-ignored)
    scratch.mkdir(parents=True, exist_ok=True)
    npz = Path(args.npz)
    reference_seeds = args.reference_seeds if args.reference else []
    if reference_seeds and not npz.is_file():
        results["reference_data"] = write_reference_data(args.data, npz)
    write(results, path)  # before the first run: a run interrupted in it resumes with --resume too
    print(f"results: {path} (if interrupted, go on with --resume {path})", flush=True)
    for side, seed in plan_runs(args.seeds, reference_seeds):
        if any(r["seed"] == seed for r in results["runs"][side]):
            continue
        print(f"{side} seed {seed} ...", flush=True)
        run = run_jaxres(args, seed, scratch) if side == "jaxres" else run_reference(args, seed, scratch, npz)
        results["runs"][side].append(run)
        write(results, path)
        print(f"{side} seed {seed}: {100 * run['tta_accuracy']:.2f} % with TTA ({100 * run['accuracy']:.2f} % without), "
              f"{run['timed_seconds']:.0f} s timed, {run['wall_seconds_this_process']:.0f} s wall", flush=True)  # fmt: skip
    write(results, path)
    print(json.dumps(results["comparison"], indent=1))
    print(f"wrote {path} and {save_comparison_figure(results, path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
