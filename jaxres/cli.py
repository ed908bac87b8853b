"""Every command's command line, built from `TrainConfig`'s fields.

    python -m jaxres.train      `train_main`: train (or resume) a run
    python -m jaxres.lr_find    `lr_find_main`: the LR range test for a config
    python -m jaxres.evaluate   `evaluate_main`: a saved run on its test split, with TTA
    python -m jaxres.gradcam    `gradcam_main`: CAM figures of a saved run

A config field `peak_lr` is the flag `--peak-lr`; its help text and default come from the
field's metadata (`jaxres.config.knob`), which also makes the README's options table
(`options_table`; `python -m jaxres.cli` prints it). Each command is wrapped in
`jaxres.errors.command_line`: a JaxresError or OSError prints one `error:` line and exits
with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import typing
from pathlib import Path
from typing import Callable, Iterable

import jax
import numpy as np

from jaxres import cam_meta, data, evaluate, gradcam, guided, lr_find, parallel, plots, rundir, runtime, train
from jaxres import config as config_lib
from jaxres.config import TTA_MODES, TrainConfig
from jaxres.errors import JaxresError, command_line, figure_output_path

AUTO = "auto"  # --peak-lr auto: run the LR range test first


# --------------------------------------------------------------------------- flags from the config


def flag_name(name: str) -> str:
    """The command-line flag of config field `name`: peak_lr -> --peak-lr."""
    return "--" + name.replace("_", "-")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _float_or_auto(text: str):
    return AUTO if text.lower() == AUTO else float(text)


_float_or_auto.__name__ = "float or 'auto'"


def _whole_or_float(text: str):
    """A number, kept an int when it is whole ("24" -> 24, "9.9" -> 9.9): config.json then
    records `epochs` as the user wrote it."""
    value = float(text)
    return int(value) if value.is_integer() else value


_whole_or_float.__name__ = "float"


def shown_default(field: dataclasses.Field) -> str:
    """How a field's default reads in --help and the README: its metadata's `shown`, else the value."""
    if field.metadata.get("shown"):
        return field.metadata["shown"]
    if isinstance(field.default, bool):
        return "on" if field.default else "off"
    return f"`{field.default}`" if isinstance(field.default, str) else f"{field.default:g}"


def _plain(text: str) -> str:
    return text.replace("`", "")


def add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """One flag per TrainConfig field in `names` (default: all), with the field's help and
    default; a flag left out parses as None (the config's default, or the saved run's)."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for name in fields if names is None else names:
        field, hint = fields[name], hints[name]
        help_text = f"{_plain(field.metadata['help'])} (default: {_plain(shown_default(field))})"
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if kind is bool:
            parser.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        parse = _optional(kind) if type(None) in typing.get_args(hint) else kind
        flags = [flag_name(name)]
        if name == "peak_lr":
            parse = _float_or_auto
        if name == "epochs":
            parse = _whole_or_float
        parser.add_argument(*flags, type=parse, default=None, metavar=name.upper(), help=help_text)


def given_fields(args: argparse.Namespace) -> dict:
    """The TrainConfig fields a command line sets (flags left out are absent)."""
    names = [field.name for field in dataclasses.fields(TrainConfig)]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


# Flags of `python -m jaxres.train` that are not config fields: (flags, add_argument options, README default).
TRAIN_EXTRA_FLAGS = (
    (("--preset",), dict(choices=sorted(config_lib.PRESETS), help="start from a named config (jaxres.config.PRESETS: "
     "quick, recipe, shapes_demo, airbench94); flags given beside it override its values"), ""),
    (("--resume",), dict(action="store_true", help="continue the run in --workdir from its last checkpoint (flags may "
     "be omitted: the saved config is reused; run options such as --data, --cache-dir or --epoch-loop may change, "
     "the recipe may not)"), ""),
    (("--progress",), dict(action=argparse.BooleanOptionalAction, default=None, help="a progress bar per epoch"),
     "when stderr is a terminal"),
)  # fmt: skip


def train_parser() -> argparse.ArgumentParser:
    """The parser of `python -m jaxres.train` (`train_main`): every TrainConfig field as a flag,
    TRAIN_EXTRA_FLAGS, and the multi-host flags."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxres.train",
        description="Train the custom ResNet (ResNet-9) on CIFAR-10 with a one-cycle schedule, "
        "label smoothing and on-device augmentation. Defaults are the original 24-epoch recipe.",
    )
    add_config_flags(parser)
    for flags, options, _ in TRAIN_EXTRA_FLAGS:
        parser.add_argument(*flags, **options)
    distributed = parser.add_argument_group("multi-host (see README)")
    distributed.add_argument("--coordinator-address", help="host:port of process 0 (jax.distributed.initialize)")
    distributed.add_argument("--num-processes", type=int, help="number of processes in the run")
    distributed.add_argument("--process-id", type=int, help="this process's index")
    return parser


def options_table() -> str:
    """The README's table of `python -m jaxres.train`'s options (Markdown), from the same
    metadata as --help (tests/test_cli.py checks that the README holds it verbatim)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(TrainConfig):
        flag = f"`{flag_name(field.name)}`"
        if isinstance(field.default, bool):
            flag = f"`{flag_name(field.name)}/--no-{field.name.replace('_', '-')}`"
        rows.append(f"| {flag} | {shown_default(field)} | {field.metadata['help']} |")
    for flags, options, default in TRAIN_EXTRA_FLAGS:
        flag = f"`{flags[0]}/--no-{flags[0][2:]}`" if options.get("action") is argparse.BooleanOptionalAction else f"`{flags[0]}`"
        rows.append(f"| {flag} | {default} | {options['help']} |")
    return "\n".join(rows) + "\n"


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The config the flags ask for: flags given, over the preset's values (`--preset`), over
    the saved config when resuming, over the defaults.

    Also says whether the peak LR is still to be found by the range test (`--peak-lr auto`);
    when resuming, the saved run's peak LR stands (it was found, or given, when the run began).
    """
    given = given_fields(args)
    auto_lr = given.get("peak_lr") == AUTO
    if auto_lr:
        del given["peak_lr"]
    preset = {}
    if args.preset:  # only what the preset sets: on --resume the saved run fills in the rest
        chosen, defaults = config_lib.preset(args.preset), TrainConfig()
        preset = {f.name: getattr(chosen, f.name) for f in dataclasses.fields(TrainConfig)
                  if getattr(chosen, f.name) != getattr(defaults, f.name)}  # fmt: skip
        for mine, other in (("peak_epoch", "peak_fraction"), ("peak_fraction", "peak_epoch")):
            if mine in given:  # the peak given one way replaces the preset's given the other
                preset.pop(other, None)
    workdir = given.get("workdir", preset.get("workdir", TrainConfig.workdir))
    saved_path = Path(workdir) / rundir.CONFIG_NAME
    if args.resume and saved_path.is_file():
        saved = dataclasses.asdict(TrainConfig.load(saved_path))
        return TrainConfig.from_dict({**saved, **preset, **given, "workdir": workdir}), False
    return TrainConfig.from_dict({**preset, **given}), auto_lr


def find_peak_lr(config: TrainConfig, dataset, log: Callable[[str], None] = print) -> TrainConfig:
    """`config` with the peak LR the LR range test suggests for it (`--peak-lr auto`).

    The sweep (jaxres.lr_find.range_test_for_config, its default range and steps) starts
    from the same initial model as the run; its plot is written to WORKDIR/lr_find.png.
    """
    result = lr_find.range_test_for_config(config, dataset)
    if jax.process_index() == 0:
        workdir = Path(config.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        plots.save_figure(lr_find.plot_lr_range(result), workdir / "lr_find.png")
    log(
        f"LR range test: lowest smoothed loss at LR {result.min_loss_lr:.3g}; "
        f"peak LR set to {result.suggested_lr:.4g} (plot: {Path(config.workdir) / 'lr_find.png'})"
    )
    return dataclasses.replace(config, peak_lr=float(result.suggested_lr))


@command_line
def train_main(argv: list[str] | None = None) -> int:
    """`python -m jaxres.train`: 0 when the run finished, 2 on an error, 130 when interrupted."""
    # before any JAX computation starts XLA's threads: a training process keeps freed memory
    runtime.malloc_setting = runtime.keep_freed_memory()
    args = train_parser().parse_args(argv)
    workdir = args.workdir or TrainConfig.workdir  # until the config (a preset's workdir, say) is known
    try:
        parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        config, auto_lr = config_from_args(args)
        workdir = config.workdir
        log = print if jax.process_index() == 0 else (lambda _: None)
        tune = functools.partial(find_peak_lr, log=log) if auto_lr else None  # run once the data is loaded
        result = train.train_and_evaluate(config, resume=args.resume, progress=args.progress, log=log, tune=tune)
    except KeyboardInterrupt:
        if rundir.checkpoint_path(workdir).is_file():
            print("interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        else:
            print("interrupted before the first checkpoint; start the run again", file=sys.stderr)
        return 130
    if result.history and jax.process_index() == 0:
        final = result.history[-1]
        with_tta = f" ({100 * final['final_tta_accuracy']:.2f}% with TTA {final['final_tta']})" if "final_tta" in final else ""
        print(f"final test accuracy {100 * final['test_accuracy']:.2f}%{with_tta} — outputs in {config.workdir}")
    return 0


# --------------------------------------------------------------------------- python -m jaxres.lr_find

LR_FIND_FIELDS = (
    "data", "cache_dir", "train_subset", "model", "width", "norm", "precision", "batch_size",
    "momentum", "nesterov", "weight_decay", "label_smoothing", "seed",
)  # fmt: skip


def lr_find_parser() -> argparse.ArgumentParser:
    """The parser of `python -m jaxres.lr_find` (`lr_find_main`): the config fields of
    LR_FIND_FIELDS and the sweep's --steps, --min-lr, --max-lr (its last LR) and --out."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxres.lr_find",
        description="LR range test: train briefly with an exponentially growing LR and suggest the "
        "peak LR of the one-cycle schedule (the LR of the lowest smoothed loss / 10). The run's "
        "options are those of python -m jaxres.train (fp16 runs as fp32).",
    )
    add_config_flags(parser, LR_FIND_FIELDS)
    parser.add_argument("--steps", type=int, default=200, help="steps of the sweep (default: %(default)s)")
    parser.add_argument("--min-lr", type=float, default=1e-4, help="first LR (default: %(default)s)")
    parser.add_argument("--max-lr", type=float, default=10.0, help="last LR (default: %(default)s)")
    parser.add_argument("--out", default="lr_find.png", help="the plot; its suffix (.png, .pdf, .svg, ...) sets the format (default: %(default)s)")
    return parser


@command_line
def lr_find_main(argv: list[str] | None = None) -> int:
    """`python -m jaxres.lr_find`: runs the LR range test, writes its plot to --out and prints
    the suggested peak LR; 0, or 2 on an error."""
    args = lr_find_parser().parse_args(argv)
    out = figure_output_path(args.out)
    config = TrainConfig.from_dict(given_fields(args))
    dataset = data.load_dataset(config.data, cache_dir=config.cache_dir, progress=sys.stderr.isatty())
    result = lr_find.range_test_for_config(config, dataset, min_lr=args.min_lr, max_lr=args.max_lr, steps=args.steps)
    path = plots.save_figure(lr_find.plot_lr_range(result), out)
    ending = "stopped when the loss diverged" if result.stopped_early else "ran all steps"
    print(
        f"swept LR {result.lrs[0]:.3g} .. {result.lrs[-1]:.3g} in {len(result.lrs)} steps ({ending}); "
        f"lowest smoothed loss {result.smoothed_losses.min():.4f} at LR {result.min_loss_lr:.3g}"
    )
    print(f"suggested peak LR: {result.suggested_lr:.4g}  (plot: {path})")
    if lr_find.still_falling_at_the_end(result):
        print(
            "warning: the smoothed loss was still falling at the largest LR; the suggestion may be too low "
            "(try a larger --max-lr)",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------- python -m jaxres.gradcam


def gradcam_parser() -> argparse.ArgumentParser:
    """The parser of `python -m jaxres.gradcam` (`gradcam_main`)."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxres.gradcam",
        description="Grad-CAM heatmaps of a trained jaxres run: one row per image "
        "(image / heatmap / overlay, titled with the true and predicted classes), saved as a PNG; "
        f"at most {gradcam.MAX_FIGURE_IMAGES} images a figure (--skip pages through more misclassified ones).",
    )
    parser.add_argument("--workdir", required=True, help="run directory written by `python -m jaxres.train` (checkpoint + config)")
    parser.add_argument("--data", default=None, help="dataset source (default: the one the run trained on); it must have the run's classes and image size")
    parser.add_argument("--cache-dir", default=None, help="decoded-dataset cache (default: the run's)")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="which split to draw images from (default: test)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--misclassified", type=int, default=None, metavar="K",
        help="explain K misclassified images, taken round-robin over their true classes (classes in the order they "
        f"first appear in the split), so that a split sorted by class still shows several; at most {gradcam.MAX_FIGURE_IMAGES}, "
        "one figure (default: 16)",
    )  # fmt: skip
    which.add_argument("--indices", type=int, nargs="+", default=None, metavar="I",
                       help=f"explain these image indices of the split (at most {gradcam.MAX_FIGURE_IMAGES})")  # fmt: skip
    parser.add_argument(
        "--skip", type=int, default=0, metavar="S",
        help=f"with --misclassified: skip the first S of them, to page through more than one figure holds "
        f"(at most {gradcam.MAX_FIGURE_IMAGES}): --skip {gradcam.MAX_FIGURE_IMAGES} shows the next page (default: 0)",
    )  # fmt: skip
    parser.add_argument("--layer", default=None, help="stage to explain: one of the model's stages, e.g. prep, layer1, layer2, layer3 (default: the last)")
    parser.add_argument("--method", choices=gradcam.ALL_METHODS, default="gradcam", help="CAM method (default: gradcam)")
    parser.add_argument("--score", choices=gradcam.SCORES, default="logit", help="what is explained: the class's logit, its softmax "
                        "probability, a one-output model's binary output, or ReST (default: logit)")  # fmt: skip
    parser.add_argument("--eigen-smooth", action="store_true", help="first principal component of the weighted activations instead of their sum")
    parser.add_argument("--aug-smooth", action="store_true", help="average the maps of flipped and 0.9/1.0/1.1-scaled inputs")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of randomcam's weights (default: 0)")
    parser.add_argument(
        "--guided", action="store_true",
        help="add a column of Guided Grad-CAM: guided backpropagation (every ReLU guided) times the map, "
        "shown as pytorch_grad_cam's deprocess_image does (models with ReLUs only)",
    )  # fmt: skip
    meta = parser.add_mutually_exclusive_group()
    meta.add_argument(
        "--refine-layers", nargs="+", default=None, metavar="L",
        help="RefineCAM: the product of the --method maps at these stages, normalised again "
        "(pytorch_grad_cam RefineCAM, whose own default base method is gradcam++); replaces --layer",
    )  # fmt: skip
    meta.add_argument(
        "--sess", action="store_true",
        help="SESS around --method at --layer: the maps of sliding windows over the image resized "
        "to several scales, weighted by their softmax scores and fused (pytorch_grad_cam SESS)",
    )  # fmt: skip
    parser.add_argument("--sess-scales", type=int, default=None, metavar="S",
                        help=f"with --sess: how many scales (default: {cam_meta.SESS_NUM_SCALES}, the library's)")  # fmt: skip
    parser.add_argument("--sess-pool", choices=cam_meta.SESS_POOLS, default=None,
                        help="with --sess: fuse the patch maps by their mean over the patches covering each pixel, or by their maximum (default: mean)")  # fmt: skip
    parser.add_argument("--target", choices=("predicted", "true"), default="predicted", help="class to explain: the predicted or the true one (default: predicted)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass when predicting and computing CAMs (default: 256)")
    parser.add_argument("--out", default="cams.png", help="the image to write; its suffix (.png, .pdf, .svg, ...) sets the format (default: cams.png)")
    return parser


def gradcam_run(args: argparse.Namespace) -> str:
    """`python -m jaxres.gradcam`'s work on parsed `args`; returns the path written. Raises
    JaxresError on user mistakes."""
    if args.batch_size < 1:
        raise JaxresError(f"--batch-size must be positive, got {args.batch_size}")
    wanted = 16 if args.misclassified is None else args.misclassified
    if wanted < 1:
        raise JaxresError(f"--misclassified must be positive, got {wanted}")
    if wanted > gradcam.MAX_FIGURE_IMAGES:
        raise JaxresError(
            f"--misclassified {wanted}: one figure shows at most {gradcam.MAX_FIGURE_IMAGES} images (MAX_FIGURE_IMAGES); "
            f"ask for {gradcam.MAX_FIGURE_IMAGES} or fewer, and page through more with --skip "
            f"(--misclassified {gradcam.MAX_FIGURE_IMAGES} --skip {gradcam.MAX_FIGURE_IMAGES} shows the next {gradcam.MAX_FIGURE_IMAGES})"
        )
    skip = getattr(args, "skip", 0)
    if skip < 0:
        raise JaxresError(f"--skip must be 0 or more, got {skip}")
    if args.indices is not None:
        if skip:
            raise JaxresError("--skip pages through --misclassified; with --indices, name the images wanted")
        if len(args.indices) > gradcam.MAX_FIGURE_IMAGES:
            raise JaxresError(
                f"--indices names {len(args.indices)} images: one figure shows at most {gradcam.MAX_FIGURE_IMAGES} "
                f"(MAX_FIGURE_IMAGES); split them over several commands of {gradcam.MAX_FIGURE_IMAGES} or fewer"
            )
    if args.layer is not None and not args.layer:
        raise JaxresError("--layer is empty: name one of the model's stages (e.g. layer2), or omit it for the last")
    # The meta-methods (jaxres.cam_meta): RefineCAM over several layers, SESS around the method.
    refine_layers = getattr(args, "refine_layers", None)
    use_sess = bool(getattr(args, "sess", False))
    sess_scales, sess_pool = getattr(args, "sess_scales", None), getattr(args, "sess_pool", None)
    if refine_layers is not None and use_sess:
        raise JaxresError("--refine-layers and --sess are two meta-methods: choose one")
    if refine_layers is not None and (not refine_layers or not all(refine_layers)):
        raise JaxresError("--refine-layers needs stage names, e.g. --refine-layers layer2 layer3")
    if refine_layers is not None and args.layer is not None:
        raise JaxresError("--refine-layers names the layers RefineCAM multiplies: drop --layer")
    if (sess_scales is not None or sess_pool is not None) and not use_sess:
        raise JaxresError(f"{'--sess-scales' if sess_scales is not None else '--sess-pool'} is an option of --sess: add --sess")
    if sess_scales is not None and sess_scales < 1:
        raise JaxresError(f"--sess-scales must be positive, got {sess_scales}")
    if args.aug_smooth and (refine_layers is not None or use_sess):
        raise JaxresError(f"--aug-smooth is not an option of {'--sess' if use_sess else '--refine-layers'} "
                          "(pytorch-grad-cam's RefineCAM and SESS take eigen_smooth only)")  # fmt: skip
    out = figure_output_path(args.out)
    model, variables, _, dataset = evaluate.load_run_and_data(args.workdir, args.data, args.cache_dir)
    layer = tuple(model.STAGES)[-1] if args.layer is None else args.layer
    gradcam._check_layer(model, layer)
    if getattr(args, "guided", False):
        guided.guided_model(model)  # a model without ReLUs to guide is refused before any work
    for refined in refine_layers or ():
        gradcam._check_layer(model, refined)
    split = getattr(dataset, args.split)
    images, labels = np.asarray(split.images), np.asarray(split.labels)
    if args.indices is not None:
        indices = np.asarray(args.indices)
        bad = indices[(indices < 0) | (indices >= len(images))]
        if bad.size:
            raise JaxresError(f"--indices {int(bad[0])} out of range: the {args.split} split has {len(images)} images")
        predictions = gradcam._predict(model, variables, images[indices], args.batch_size)
    else:
        all_predictions = gradcam._predict(model, variables, images, args.batch_size)
        wrong = np.flatnonzero(all_predictions != labels)
        indices = gradcam.round_robin_over_classes(wrong, labels[wrong], skip + wanted)[skip:]
        if wrong.size == 0:
            raise JaxresError(f"no misclassified images in the {args.split} split: use --indices instead")
        if indices.size == 0:
            raise JaxresError(
                f"--skip {skip} skips every misclassified image: the {args.split} split has {wrong.size}"
            )
        predictions = all_predictions[indices]
    chosen, truths = images[indices], labels[indices]
    targets = predictions if args.target == "predicted" else truths
    options = dict(method=args.method, score=args.score, eigen_smooth=args.eigen_smooth)
    if args.method == "randomcam":
        options["key"] = jax.random.key(args.seed)
    if refine_layers is not None or use_sess:
        if refine_layers is not None:
            explain = functools.partial(cam_meta.refinecam, layers=tuple(refine_layers), **options)
            explained = f"refinecam of {args.method} over {', '.join(refine_layers)}"
        else:
            sess_options = dict(pool=sess_pool or "mean", num_scales=cam_meta.SESS_NUM_SCALES if sess_scales is None else sess_scales)
            explain = functools.partial(cam_meta.sess, layer=layer, **options, **sess_options)
            explained = f"sess of {args.method} at {layer}"
    else:
        explain = functools.partial(gradcam.gradcam, layer=layer, aug_smooth=args.aug_smooth, **options)
        explained = f"{args.method} at {layer}"

    def in_batches(function) -> np.ndarray:  # function(model, variables, images, targets), --batch-size images a call
        return np.concatenate([
            np.asarray(function(model, variables, chosen[i : i + args.batch_size], targets[i : i + args.batch_size]))
            for i in range(0, len(chosen), args.batch_size)
        ])  # fmt: skip

    cams = in_batches(explain)
    guided_maps = None
    if getattr(args, "guided", False):
        score = "logit" if args.method == "finercam" else args.score
        saliency = in_batches(functools.partial(guided.guided_backprop, score=score))
        guided_maps = guided.deprocess(saliency * cams[..., None])
        explained = f"{explained}, guided"
    figure = gradcam.plot_cams(
        chosen,
        cams,
        guided=guided_maps,
        true_labels=truths,
        pred_labels=predictions,
        class_names=list(dataset.class_names),
        title=f"{explained} ({args.target} class), {args.split} images {', '.join(map(str, indices[:8]))}{' ...' if len(indices) > 8 else ''}",
    )
    return str(plots.save_figure(figure, out))


@command_line
def gradcam_main(argv: list[str] | None = None) -> int:
    """`python -m jaxres.gradcam`: writes the figure of `gradcam_run`; 0, or 2 on an error."""
    args = gradcam_parser().parse_args(argv)
    print(f"wrote {gradcam_run(args)}")
    return 0


# --------------------------------------------------------------------------- python -m jaxres.evaluate


@command_line
def evaluate_main(argv: list[str] | None = None) -> int:
    """`python -m jaxres.evaluate`: prints a saved run's test loss and accuracy under each --tta
    mode and its gain over no TTA; 0, or 2 on an error."""
    parser = argparse.ArgumentParser(prog="python -m jaxres.evaluate", description=evaluate.__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run directory written by python -m jaxres.train")
    parser.add_argument("--data", help="dataset source (default: the run's own); it must have the run's classes and image size")
    parser.add_argument("--cache-dir", help="decoded-array cache (default: the run's)")
    parser.add_argument("--tta", nargs="+", default=list(TTA_MODES), choices=TTA_MODES, help="TTA modes to compare")
    args = parser.parse_args(argv)
    results = evaluate.evaluate_run(args.workdir, args.data, args.tta, args.cache_dir)
    baseline = results.get("none")
    print(f"{'tta':<16}{'test_loss':>10}{'test_acc':>10}{'gain':>8}")
    for mode, result in results.items():
        gain = f"{100 * (result['accuracy'] - baseline['accuracy']):+.2f}" if baseline else ""
        print(f"{mode:<16}{result['loss']:>10.4f}{100 * result['accuracy']:>9.2f}%{gain:>8}")
    return 0


if __name__ == "__main__":  # python -m jaxres.cli: the README's options table
    print(options_table(), end="")
