"""The GPU path, checked on every commit without a GPU: each program a GPU run compiles is
built exactly as that run builds it and exported for CUDA on this CPU-only machine
(`jax.export.export(jitted, platforms=("cuda",))`, which lowers for a platform JAX does
not run on).

"As a GPU run builds it": the run's choices are resolved with `jax.default_backend()`
reading "gpu" (`as_on_a_gpu`), so `backends.resolve` picks the convolution backend and
`loops.choose_loop` the loop a GPU run gets (XLA's convolutions, one
`lax.scan`); the programs are then built by the library's own builders
(`train.make_train_epoch`, `evaluate.make_evaluate`, `gradcam.gradcam` under `jax.jit`,
the LR range test's step) at the full recipe's shapes (width 1, batch 512, 50,000 training
and 10,000 test images).

Each exported module (`exported.mlir_module()`) is checked (`check_exported`) for
- no CPU-only custom call: none of the oneDNN FFI targets (`jaxres.onednn`), and no other
  custom call at all (a clean CUDA module of jaxres has none);
- no host callback inside the program (`jax.debug.callback`, `jax.debug.print`,
  `pure_callback`, `io_callback`: looked for in the traced program, where a callback
  still shows before lowering fails on it, and as a custom call in the module) and no
  effects;
- only the precision the policy asks for: every convolution's operands and result in the
  compute dtype (float32, bfloat16 or float16), every BatchNorm statistic computed in
  float32 (the sums and reductions under a `norm` module), parameters, optimizer state and
  BatchNorm running averages float32.

What the export cannot show (only a real GPU run can): which cuDNN algorithms XLA picks,
the memory the program needs, its speed, and that it runs at all on a given driver.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.export import DisabledSafetyCheck

from jaxres import backends, evaluate, gradcam, loops, lr_find, models, onednn, optim, parallel, precision, train
from jaxres import config as config_lib
from jaxres.config import MIX_METHODS, TTA_MODES, TrainConfig

REPO = Path(__file__).resolve().parents[1]

# the full recipe's shapes (CIFAR-10): what a GPU run compiles
TRAIN_IMAGES, TEST_IMAGES, NUM_CLASSES = 50_000, 10_000, 10
GRADCAM_IMAGES = 256

ONEDNN_TARGETS = frozenset(name + suffix for name in onednn.TARGETS.values() for suffix in ("", onednn.BF16_SUFFIX))
# custom calls a CUDA module of jaxres may hold (the random bits, sorting and BatchNorm all
# lower to plain StableHLO); a new one is a decision, made here. cuSOLVER's symmetric
# eigendecomposition and Jacobi SVD: the principal components of the eigen CAM methods
# (eigencam, eigengradcam, segeigencam) and kernel PCA (kpca_cam), which JAX lowers to them on CUDA
GPU_CUSTOM_CALLS = frozenset({"cusolver_syevd_ffi", "cusolver_gesvdj_ffi"})
ELEMENT_TYPES = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
NORM_SCOPE = re.compile(r"(?:^|/)(?:\w+_)?norm\d*/")  # norm, norm1, norm2, shortcut_norm


# --------------------------------------------------------------------------- building as a GPU run does


@contextlib.contextmanager
def as_on_a_gpu():
    """While inside, `jax.default_backend()` reads "gpu": what the run's resolvers
    (`backends.resolve`, `loops.choose_loop`) see on a GPU. Only the choices are
    made inside; building and exporting happen outside, on the real (CPU) backend."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax, "default_backend", lambda: "gpu")
        yield


def gpu_model(config: TrainConfig):
    """The model `backends.model_from_config` builds for `config` on a GPU (its conv_backend resolved there)."""
    with as_on_a_gpu():
        backend = backends.resolve(config.conv_backend)
        model = backends.model_from_config(config, NUM_CLASSES)
    assert backend.name == "xla", f"a GPU run resolves conv_backend {config.conv_backend!r} to {backend.name!r}"
    assert model.conv is backends.XLA.conv, f"a GPU run's model convolves with {model.conv!r}, not XLA's"
    return model


def gpu_program(build):
    """The compiled program (`loops.EpochProgram.function`) that `build()` (a train epoch, an
    evaluation) makes on a GPU: the loop `loops.choose_loop` picks there, which must be the
    one `lax.scan` program (its carry first: the state, or None for an evaluation)."""
    with as_on_a_gpu():
        program = build()
    assert program.loop == "scan", f"it runs as {program.loop!r} on a GPU, not as one scan"
    return program.function


def replicated_struct(shape, dtype, mesh=None):
    sharding = None if mesh is None or mesh.devices.size == 1 else parallel.replicated(mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def struct_tree(tree, mesh=None):
    return jax.tree_util.tree_map(lambda leaf: replicated_struct(leaf.shape, leaf.dtype, mesh), tree)


def variable_structs(model, mesh=None):
    """{params, batch_stats} of `model` as ShapeDtypeStructs (no weights are made)."""
    return struct_tree(jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0))), mesh)


def train_epoch_program(config: TrainConfig, mesh=None, progress=None):
    """(jitted epoch, its argument structs) as a GPU run of `config` builds its training epoch."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    model = gpu_model(config)
    steps_per_epoch = TRAIN_IMAGES // config.batch_size
    optimizer, _ = optim.make_optimizer(config, steps_per_epoch)
    variables = variable_structs(model)
    state = struct_tree(jax.eval_shape(lambda v: train.init_train_state(config, optimizer, v), variables), mesh)
    epoch = gpu_program(lambda: train.make_train_epoch(model, optimizer, config, mesh, steps_per_epoch, progress=progress))
    arguments = (
        state,
        replicated_struct((TRAIN_IMAGES, 32, 32, 3), jnp.uint8, mesh),
        replicated_struct((TRAIN_IMAGES,), jnp.int32, mesh),
        struct_tree(jax.eval_shape(lambda: jax.random.PRNGKey(0)), mesh),
    )
    return epoch, arguments


# --------------------------------------------------------------------------- exporting and checking


def host_callbacks(closed_jaxpr) -> dict:
    """{primitive: count} of the host callbacks in a traced program, sub-programs included."""
    counts = loops.primitive_counts(closed_jaxpr)
    return {name: count for name, count in counts.items() if "callback" in name or name == "debug_print"}


def export_for_cuda(jitted, *arguments, **static):
    """`jax.export` of `jitted` for ("cuda",). A host callback is refused first, by name (its
    lowering for CUDA would fail with "the platform for the specified backend cpu is
    different from the lowering platform cuda"); the oneDNN targets are let through
    jax.export's own custom-call check so that `check_exported` names them."""
    callbacks = host_callbacks(jitted.trace(*arguments, **static).jaxpr)
    assert not callbacks, f"host callback(s) inside the GPU program: {callbacks}"
    disabled = [DisabledSafetyCheck.custom_call(name) for name in sorted(ONEDNN_TARGETS)]
    return jax.export.export(jitted, platforms=("cuda",), disabled_checks=disabled)(*arguments, **static)


def location_names(text: str) -> dict:
    """{"#locN": the op's name stack, e.g. "jvp(CustomResNet)/prep/conv_block/norm/dot_general"}
    from the module's location aliases (a callsite's callee; "" where unknown)."""
    raw = dict(re.findall(r"^(#loc\d*) = (loc\(.*\))$", text, re.MULTILINE))

    def name(alias, depth=0):
        value = raw.get(alias, "")
        quoted = re.match(r'loc\("([^"]*)"', value)
        if quoted:
            return quoted.group(1)
        callee = re.match(r"loc\(callsite\((#loc\d*) at", value)
        return name(callee.group(1), depth + 1) if callee and depth < 50 else ""

    return {alias: name(alias) for alias in raw}


def operations(text: str, op: str) -> list[tuple[list[str], str, str]]:
    """[(element types of operands and results, name stack, the line)] of every `op` in the
    module (one line each, as stablehlo prints convolution, dot_general and reduce)."""
    names = location_names(text)
    found = []
    for line in text.splitlines():
        if f"= {op} " not in line and f"= {op}(" not in line:
            continue
        signature = line.rsplit(" : ", 1)[-1]
        types = re.findall(r"tensor<(?:[0-9?]+x)*([a-z]+\d*)>", signature)
        location = re.search(r"loc\((#loc\d*)\)\s*$", line)
        found.append((types, names.get(location.group(1), "") if location else "", line))
    return found


def check_exported(exported, precision_name: str, *, batch_norm_statistics: bool) -> dict:
    """Assert that `exported` is fit for a GPU (see the module docstring); returns what was
    counted: {convolutions, batch_norm_ops}. `batch_norm_statistics`: the program trains
    (BatchNorm computes statistics), so those must be there, in float32."""
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    targets = set(re.findall(r"stablehlo\.custom_call @([\w.$-]+)", text))
    targets |= set(re.findall(r'call_target_name = "([^"]+)"', text))
    assert not targets & ONEDNN_TARGETS, f"CPU-only oneDNN FFI call(s) in the GPU program: {sorted(targets & ONEDNN_TARGETS)}"
    callbacks = {target for target in targets if "callback" in target}
    assert not callbacks, f"host callback(s) inside the GPU program: {sorted(callbacks)}"
    assert targets <= GPU_CUSTOM_CALLS, f"custom call(s) not known to run on a GPU: {sorted(targets - GPU_CUSTOM_CALLS)}"
    assert not exported.ordered_effects and not exported.unordered_effects, (exported.ordered_effects, exported.unordered_effects)

    wanted = ELEMENT_TYPES[precision_name]
    convolutions = operations(text, "stablehlo.convolution")
    assert convolutions and len(convolutions) == text.count("stablehlo.convolution"), "convolutions not all read"
    wrong = sorted({f"{name}: {types}" for types, name, _ in convolutions if set(types) != {wanted}})
    assert not wrong, f"{precision_name} asks for {wanted} convolutions; these are not: {wrong[:5]}"

    statistics = [
        (types, name, line) for op in ("stablehlo.dot_general", "stablehlo.reduce")
        for types, name, line in operations(text, op) if NORM_SCOPE.search(name)
    ]
    if batch_norm_statistics:
        assert statistics, "no BatchNorm statistics found in a training program (their name stacks changed?)"
    low = sorted({f"{name}: {types}" for types, name, _ in statistics if set(types) & {"bf16", "f16"}})
    assert not low, f"BatchNorm statistics not computed in float32: {low[:5]}"
    # a float32 dot at XLA's DEFAULT precision may run in TF32 on a GPU (Ampere and newer):
    # the sums of BatchNorm's statistics (`models.row_means`) must ask for HIGHEST
    tf32 = sorted({name for _, name, line in statistics if "dot_general" in line and "precision = [HIGHEST, HIGHEST]" not in line})
    assert not tf32, f"BatchNorm statistics as float32 dots that a GPU may run in TF32 (not HIGHEST precision): {tf32[:5]}"
    return {"convolutions": len(convolutions), "batch_norm_ops": len(statistics)}


def check_float32_state(exported) -> None:
    """The epoch's returned state: parameters, optimizer state, BatchNorm running averages,
    loss scale all float32 whatever the policy (integers aside)."""
    state, _ = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
    floats = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert floats == {"float32"}, floats


# --------------------------------------------------------------------------- the programs


TRAIN_CASES = [
    (model, precision_name, mix)
    for model in ("custom_resnet", "resnet18")
    for precision_name in ("fp32", "bf16", "fp16")
    for mix in ("none", "cutmix")
] + [("airbench94", precision_name, "none") for precision_name in ("fp32", "bf16", "fp16")]


@pytest.mark.parametrize("model_name, precision_name, mix", TRAIN_CASES)
def test_train_epoch_exports_for_cuda(model_name, precision_name, mix):
    """The training epoch of the recipe (scan over 97 steps of 512: gather, augment, mix,
    forward, backward, SGD, fp16's loss scaling and skipped steps), as a GPU run builds it."""
    if model_name == "airbench94":  # the fast recipe: its preset's lookahead, alternating flip, groups
        config = config_lib.airbench94(precision=precision_name)
    else:
        config = TrainConfig(model=model_name, precision=precision_name, mix=mix)
    epoch, arguments = train_epoch_program(config)
    exported = export_for_cuda(epoch, *arguments)
    check_exported(exported, precision_name, batch_norm_statistics=True)
    check_float32_state(exported)
    assert "stablehlo.while" in exported.mlir_module()  # the scanned epoch


@pytest.mark.parametrize("mix", [m for m in MIX_METHODS if m not in ("none", "cutmix")])
def test_train_epoch_exports_for_cuda_with_every_label_mix(mix):
    """The other label mixes (RICAP's four crops, mixup's blend), in fp16 with loss scaling."""
    epoch, arguments = train_epoch_program(TrainConfig(precision="fp16", mix=mix))
    check_exported(export_for_cuda(epoch, *arguments), "fp16", batch_norm_statistics=True)


EVAL_CASES = [("custom_resnet", "fp32", tta) for tta in TTA_MODES] + [
    ("custom_resnet", "bf16", "flip_translate"), ("custom_resnet", "fp16", "flip"), ("resnet18", "bf16", "flip"),
]


@pytest.mark.parametrize("model_name, precision_name, tta", EVAL_CASES)
def test_evaluation_exports_for_cuda(model_name, precision_name, tta):
    """The evaluation after each epoch (the run's model and precision) with each TTA mode."""
    config = TrainConfig(model=model_name, precision=precision_name, tta=tta)
    mesh = parallel.make_mesh()
    model = gpu_model(config)
    program = gpu_program(lambda: evaluate.make_evaluate(model, config, mesh))
    arguments = (
        None,  # the evaluation's carry
        variable_structs(model),
        jax.ShapeDtypeStruct((TEST_IMAGES, 32, 32, 3), jnp.uint8),
        jax.ShapeDtypeStruct((TEST_IMAGES,), jnp.int32),
    )
    exported = export_for_cuda(program, *arguments)
    views = {"none": 1, "flip": 2}.get(tta, 6)
    counts = check_exported(exported, precision_name, batch_norm_statistics=False)
    assert counts["convolutions"] % views == 0 and counts["batch_norm_ops"] == 0  # inference: running averages


@pytest.mark.parametrize("method", gradcam.ALL_METHODS)
def test_gradcam_exports_for_cuda(method):
    """Every CAM method at layer3 of the trained model (float32, as `load_for_inference` builds it)."""
    model = gpu_model(TrainConfig(precision="fp32"))
    options = {"key": jax.random.PRNGKey(0)} if method == "randomcam" else {}
    program = jax.jit(
        lambda variables, images: gradcam.gradcam(model, variables, images, layer="layer3", method=method, **options)
    )
    arguments = (variable_structs(model), jax.ShapeDtypeStruct((GRADCAM_IMAGES, 32, 32, 3), jnp.uint8))
    check_exported(export_for_cuda(program, *arguments), "fp32", batch_norm_statistics=False)


@pytest.mark.parametrize("precision_name", ["fp32", "bf16", "fp16"])
def test_lr_range_test_step_exports_for_cuda(precision_name):
    """The LR range test's step (`--peak-lr auto`) for the model it trains (fp16 runs it in fp32)."""
    config = TrainConfig(precision=precision_name)
    with as_on_a_gpu():
        model = lr_find.range_test_model(config, NUM_CLASSES)
    assert model.conv is backends.XLA.conv
    variables = variable_structs(model)
    hyperparameters = dict(momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay)
    recipe = lr_find.range_test_recipe(label_smoothing=config.label_smoothing, **hyperparameters)
    optimizer = lr_find._optimizer(**hyperparameters)
    state = struct_tree(jax.eval_shape(lambda v: train.init_train_state(recipe, optimizer, v), variables))
    batch = (
        jax.ShapeDtypeStruct((config.batch_size, 32, 32, 3), jnp.uint8),
        jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.float32),
    )
    exported = export_for_cuda(lr_find._range_test_step, state, batch, model=model, optimizer=optimizer, config=recipe)
    check_exported(exported, "fp32" if precision_name == "fp16" else precision_name, batch_norm_statistics=True)


# --------------------------------------------------------------------------- several devices

MULTI_DEVICE_SCRIPT = textwrap.dedent(
    r"""
    import json, re
    import jax
    from jaxres import parallel
    from jaxres.config import TrainConfig
    from tests import test_gpu_export as export_check
    assert jax.device_count() == 4, jax.devices()
    mesh = parallel.make_mesh()
    report = {}
    for precision in ("fp32", "fp16"):
        epoch, arguments = export_check.train_epoch_program(TrainConfig(precision=precision, mix="cutmix"), mesh)
        exported = export_check.export_for_cuda(epoch, *arguments)
        counts = export_check.check_exported(exported, precision, batch_norm_statistics=True)
        text = exported.mlir_module()
        report[precision] = {
            "nr_devices": exported.nr_devices,
            "batch_split": len(re.findall(r'sharding_constraint %\S+ <@mesh, \[\{"batch"\}', text)),
            "mesh": re.findall(r'sdy.mesh @mesh = <\[[^]]*\]>', text),
            **counts,
        }
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_data_parallel_epoch_exports_for_cuda_over_four_devices():
    """The data-parallel epoch over a 4-device mesh, exported for 4 CUDA devices.

    jax.export can express it from here: a process with 4 simulated CPU devices
    (`--xla_force_host_platform_device_count=4`) builds the mesh, the program is traced and
    lowered with its shardings (the batch split over the `batch` axis, the rest
    replicated) and exported for ("cuda",); the module records 4 devices and the shardings
    (Shardy), not the CPU devices, so it is the program 4 GPUs would run. XLA's SPMD
    partitioning (the all-reduces it inserts) happens when it is compiled, on the GPU."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE_SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    for precision_name, found in report.items():
        assert found["nr_devices"] == 4, report
        assert found["mesh"] == ['sdy.mesh @mesh = <["batch"=4]>'], report
        assert found["batch_split"] >= 2, report  # the batch's indices and its images split over the devices


# --------------------------------------------------------------------------- the check itself


def test_the_check_refuses_a_host_callback_in_the_epoch():
    """A progress bar's `jax.debug.callback` in the epoch (what `make_train_epoch(progress=...)`
    puts there, at a terminal) is refused by name."""
    epoch, arguments = train_epoch_program(TrainConfig(), progress=lambda step: None)
    with pytest.raises(AssertionError, match=r"host callback\(s\) inside the GPU program: \{'debug_callback': 1\}"):
        export_for_cuda(epoch, *arguments)


def test_the_check_refuses_onednn_convolutions():
    """The oneDNN convolutions (what a CPU run resolves) exported for CUDA are refused by name."""
    reason = onednn.default().unavailable_reason  # asked here, not at collection: it builds the library
    if reason is not None:
        pytest.skip(f"the oneDNN library cannot be had here: {reason}")
    config = TrainConfig(width=0.25)
    model = gpu_model(config).clone(conv=backends.resolve("onednn").conv)
    program = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
    arguments = (variable_structs(model), jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32))
    exported = export_for_cuda(program, *arguments)
    with pytest.raises(AssertionError, match=r"CPU-only oneDNN FFI call\(s\) in the GPU program: \['JaxresOnednnConvForward'\]"):
        check_exported(exported, "fp32", batch_norm_statistics=False)


def test_the_check_refuses_a_convolution_in_another_precision():
    """float32 convolutions where the policy asks for bfloat16 (the compute dtype not reaching
    the model) are refused, naming the layers."""
    model = gpu_model(TrainConfig(precision="fp32", width=0.25))
    program = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
    exported = export_for_cuda(program, variable_structs(model), jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32))
    check_exported(exported, "fp32", batch_norm_statistics=False)
    with pytest.raises(AssertionError, match=r"bf16 asks for bf16 convolutions; these are not: .*layer1/conv_block/conv"):
        check_exported(exported, "bf16", batch_norm_statistics=False)


# --------------------------------------------------------------------------- the GPU benchmark script, on the CPU


@pytest.mark.slow
def test_gpu_benchmark_script_smoke_runs_on_the_cpu(tmp_path):
    """`bash benchmarks/gpu.sh --smoke` (the GPU suite's plan, order and rows at toy sizes, on
    the CPU: fp16 dropped), trimmed to one precision and one repeat to keep it near a minute:
    parity, the skipped time-to-accuracy row (no real data), a train row with both PyTorch
    pipelines and jaxres's second run, eval and Grad-CAM."""
    env = {**os.environ, "SMOKE_OUT": str(tmp_path)}
    env.pop("XLA_FLAGS", None)
    completed = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--smoke", "--data", "synthetic", "--no-chart",
         "--precisions", "fp32", "--repeats", "1"],
        env=env, capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert (results["suite"], results["mode"], results["device"]) == ("gpu", "smoke", "cpu")
    assert results["parity"] and all(row["passed"] for row in results["parity"])
    names = [row["name"] for row in results["rows"]]
    assert [row["task"] for row in results["rows"]] == ["accuracy", "train", "eval", "gradcam"], names
    assert not [row for row in results["rows"] if "error" in row], results["rows"]
    train_row = results["rows"][1]
    assert set(train_row["workers"]) == {"jax", "torch-device", "torch-loader"}
    assert "second_run" in train_row["workers"]["jax"]
