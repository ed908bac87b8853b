"""The PyTorch side of a benchmark worker (imported by `benchmarks.worker` only; no jax here)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import torch_train
from benchmarks.torch_reference import CustomResNet, torch_gradcam
from jaxres.data import select_train_subset  # NumPy only: no jax in the PyTorch worker


def configure_threads(threads: int) -> dict:
    torch.set_num_threads(threads)
    return {
        "torch_num_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def torch_device(args) -> torch.device:
    if args.device == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("--device gpu, but torch sees no CUDA device (is this the CPU wheel?)")
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def channels_last(args) -> bool:
    """auto: on. channels_last is the GPU best practice, and on this project's 2-core CPU it was
    faster too (x1.23 at width 0.25, x1.03 at width 1.0, batch 128, alternating runs)."""
    return args.channels_last in ("auto", "on")


def recipe_for(args, **overrides) -> torch_train.Recipe:
    values = dict(
        width=args.width,
        norm=args.norm,
        batch_size=args.batch,
        precision=args.precision,
        channels_last=channels_last(args),
        compile=args.torch_compile,
        eval_batch_size=args.eval_batch,
    )
    values.update(overrides)
    return torch_train.Recipe(**values)


def load_weights(path: str) -> dict:
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_common(args, recipe: torch_train.Recipe, device: torch.device) -> dict:
    out = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "channels_last": recipe.channels_last,
        "torch_compile": recipe.compile,
        "precision": recipe.precision,
        "amp": recipe.precision != "fp32",  # torch.autocast (CPU: bf16 only)
    }
    if device.type == "cuda":
        out["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        out["grad_scaler"] = recipe.precision == "fp16"
        out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return out


def device_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"device_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}


# --------------------------------------------------------------------------- repeated tasks


class TrainSession:
    """`measure()`: `args.steps` optimizer steps through the chosen input pipeline."""

    def __init__(self, args, arrays):
        self.args = args
        self.device = torch_device(args)
        self.recipe = recipe_for(args)
        model = torch_train.build_model(self.recipe, self.device, state_dict=load_weights(args.weights))
        self.trainer = torch_train.Trainer(
            model, self.recipe, steps_per_epoch=args.steps, device=self.device, allow_cpu_amp=self.recipe.precision == "bf16"
        )
        if args.pipeline == "device":
            images = torch.from_numpy(arrays["train_images"]).to(self.device)
            labels = torch.from_numpy(arrays["train_labels"].astype(np.int64)).to(self.device)
            generator = torch.Generator(device=self.device).manual_seed(args.seed)
            self.batches = torch_train.device_batches(images, labels, self.recipe, generator)
        else:
            self.loader = torch_train.make_loader(
                arrays["train_images"], arrays["train_labels"], self.recipe, args.loader_workers, self.device, args.seed
            )
            self.batches = torch_train.loader_batches(self.loader, self.recipe, self.device)

    def describe(self) -> dict:
        out = describe_common(self.args, self.recipe, self.device)
        out["pipeline"] = self.args.pipeline
        if self.args.pipeline == "loader":
            out["loader_workers"] = self.args.loader_workers
        return out

    def measure(self) -> dict:
        synchronize(self.device)
        started = time.perf_counter()
        metrics = torch_train.train_steps(self.trainer, self.batches, self.args.steps)
        seconds = time.perf_counter() - started
        return {"images": self.args.steps * self.args.batch, "seconds": seconds, "loss": metrics["loss"]}

    def device_memory(self) -> dict:
        return device_memory(self.device)


class EvalSession:
    """`measure()`: loss and accuracy over the first `eval_images` test images, in eval mode."""

    def __init__(self, args, arrays):
        self.args = args
        self.device = torch_device(args)
        self.recipe = recipe_for(args)
        self.model = torch_train.build_model(self.recipe, self.device, state_dict=load_weights(args.weights))
        self.forward = torch.compile(self.model) if self.recipe.compile else self.model
        count = args.eval_images
        self.images = torch.from_numpy(arrays["test_images"][:count]).to(self.device)
        self.labels = torch.from_numpy(arrays["test_labels"][:count].astype(np.int64)).to(self.device)

    def describe(self) -> dict:
        return {**describe_common(self.args, self.recipe, self.device), "eval_batch": self.args.eval_batch}

    def measure(self) -> dict:
        synchronize(self.device)
        started = time.perf_counter()
        result = torch_train.evaluate(self.model, self.images, self.labels, self.recipe, forward=self.forward)
        seconds = time.perf_counter() - started
        return {"images": int(self.images.shape[0]), "seconds": seconds, "accuracy": result["accuracy"]}

    def device_memory(self) -> dict:
        return device_memory(self.device)


def _gradcam_maps(model, inputs: torch.Tensor) -> np.ndarray:
    """`torch_reference.torch_gradcam` (the hook-based method of the original library), as NumPy.

    On a CUDA device, a reference that calls `.numpy()` on a device tensor fails; then
    the same hooks run through `_gradcam_on_device` (identical maths, `.cpu()` added).
    """
    if inputs.device.type == "cpu":
        return torch_gradcam(model, inputs)
    try:
        return torch_gradcam(model, inputs)
    except TypeError:
        return _gradcam_on_device(model, inputs)


def _gradcam_on_device(model, inputs: torch.Tensor, layer_name: str = "layer3") -> np.ndarray:
    """The reference's hook-based Grad-CAM (predicted class) with the result copied to the host."""
    model.eval()
    layer = dict(model.named_modules())[layer_name]
    saved = {}

    def forward_hook(module, _inputs, output):
        saved["activation"] = output.detach()
        output.register_hook(lambda gradient: saved.__setitem__("gradient", gradient.detach()))

    handle = layer.register_forward_hook(forward_hook)
    try:
        model.zero_grad()
        logits = model(inputs)
        one_hot = F.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)
        logits.backward(gradient=one_hot)
    finally:
        handle.remove()
    weights = saved["gradient"].mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * saved["activation"]).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=inputs.shape[2:], mode="bilinear", align_corners=False)
    flat = cam.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    flat = torch.where(span > 0, (flat - low) / safe, torch.zeros_like(flat))
    return flat.view(cam.shape[0], *cam.shape[2:]).cpu().numpy()


class GradcamSession:
    """`measure()`: Grad-CAM (layer3, predicted class) of `gradcam_images` test images, in
    batches of `gradcam_batch`, normalisation included, maps copied to the host."""

    def __init__(self, args, arrays):
        self.args = args
        self.device = torch_device(args)
        self.recipe = recipe_for(args, precision="fp32", compile=False)
        self.model = torch_train.build_model(self.recipe, self.device, state_dict=load_weights(args.weights))
        images = arrays["test_images"][: args.gradcam_images]
        self.batches = [
            torch.from_numpy(images[i : i + args.gradcam_batch]).to(self.device)
            for i in range(0, len(images), args.gradcam_batch)
        ]

    def describe(self) -> dict:
        return {**describe_common(self.args, self.recipe, self.device), "gradcam_batch": self.args.gradcam_batch}

    def measure(self) -> dict:
        synchronize(self.device)
        started = time.perf_counter()
        for batch in self.batches:
            inputs = torch_train.to_model_input(torch_train.normalize(batch.permute(0, 3, 1, 2)), self.recipe)
            _gradcam_maps(self.model, inputs)
        seconds = time.perf_counter() - started
        return {"images": sum(int(b.shape[0]) for b in self.batches), "seconds": seconds}

    def device_memory(self) -> dict:
        return device_memory(self.device)


SESSIONS = {"train": TrainSession, "eval": EvalSession, "gradcam": GradcamSession}


def make_session(args, arrays):
    return SESSIONS[args.task](args, arrays)


# --------------------------------------------------------------------------- one-shot tasks


def make_weights(args, arrays) -> dict:
    """A fresh PyTorch-initialised model (seeded) whose BatchNorm running statistics are
    calibrated on a few training batches (so eval mode is not the identity); as an npz."""
    torch.manual_seed(args.seed)
    model = CustomResNet(width=args.width, norm=args.norm)
    model.train()
    recipe = torch_train.Recipe(width=args.width, norm=args.norm, channels_last=False)
    with torch.no_grad():
        for start in range(0, 1024, 256):
            batch = torch.from_numpy(arrays["train_images"][start : start + 256])
            model(torch_train.to_model_input(torch_train.normalize(batch.permute(0, 3, 1, 2)), recipe))
    state = {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}
    Path(args.weights).parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(str(args.weights) + ".tmp.npz")
    np.savez(temporary, **state)
    os.replace(temporary, args.weights)
    return state


def parity(args, arrays) -> dict:
    """Logits (eval mode, fp32) and Grad-CAM maps of the first test images, from `--weights`.

    With --save-weights the weights are created first. On a GPU, TF32 is switched off for
    this check so that it compares the same fp32 computation.
    """
    device = torch_device(args)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.save_weights:
        make_weights(args, arrays)
    recipe = recipe_for(args, precision="fp32", compile=False)
    model = torch_train.build_model(recipe, device, state_dict=load_weights(args.weights)).eval()
    images = torch.from_numpy(arrays["test_images"][: args.parity_images]).to(device)
    inputs = torch_train.to_model_input(torch_train.normalize(images.permute(0, 3, 1, 2)), recipe)
    with torch.inference_mode():
        logits = model(inputs).float().cpu().numpy()
    cams = _gradcam_maps(model, inputs[:8].clone())
    return {
        "logits": logits.tolist(),
        "cams": np.asarray(cams, np.float32).tolist(),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def time_to_accuracy(args, arrays) -> dict:
    """The recipe for `--epochs` epochs (device pipeline) from `--weights`; test accuracy per epoch."""
    device = torch_device(args)
    recipe = recipe_for(args, epochs=args.epochs, batch_size=args.accuracy_batch, eval_batch_size=1000)
    indices = select_train_subset(arrays["train_labels"], args.train_subset, args.seed)  # as jaxres
    train_images = torch.from_numpy(arrays["train_images"][indices]).to(device)
    train_labels = torch.from_numpy(arrays["train_labels"][indices].astype(np.int64)).to(device)
    test_images = torch.from_numpy(arrays["test_images"]).to(device)
    test_labels = torch.from_numpy(arrays["test_labels"].astype(np.int64)).to(device)
    model = torch_train.build_model(recipe, device, state_dict=load_weights(args.weights))
    result = torch_train.train_to_accuracy(
        model, recipe, train_images, train_labels, test_images, test_labels, device, seed=args.seed, target=args.target,
        tta=getattr(args, "tta", "none"),
    )
    return {
        **result,
        **describe_common(args, recipe, device),
        **device_memory(device),
        "train_images": int(train_images.shape[0]),
        "test_images": int(test_images.shape[0]),
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "pipeline": "device",
    }
