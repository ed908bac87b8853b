"""Data parallelism: one device, four devices and two processes compute the same training.

What is guaranteed, and so what is checked (the reasoning, measured on a 2-core AMD EPYC;
the same on the Intel Xeon the suite also runs on):

* Splitting the batch over devices changes only the order in which sums are taken (each
  device's convolutions see a quarter of the batch, and XLA:CPU picks its algorithm by
  shape), so one fp32 step agrees to float rounding: relative ~1e-6 on losses, gradients
  and BatchNorm statistics.
* Over several steps fp32 runs can then part at the kinks of the model: ReLU and max-pool
  have gradients that jump where an input crosses zero or two inputs of a window swap
  order, and a rounding-sized difference in the state can move one activation across one.
  Measured: from two states 3e-7 apart, one step gave optimizer states 6e-5 apart, and a
  sweep along the line between the states showed the jump at one point (at 10% of the way
  the result was still within 2e-7, from 30% on 6e-5): a discontinuity, not a bug nor
  smooth growth. After the 4-step epoch below the fp32 parameters differ by up to 9e-3 on
  one CPU and 4.5e-4 on another, while the same epoch in float64 agrees to 2e-15 (in
  float64 an activation would have to lie within ~1e-15 of a kink).
* So the tight check is the float64 epoch (1e-10 relative: five orders of magnitude above
  its rounding, while a data-parallel bug such as BatchNorm statistics of one shard only,
  a missing gradient all-reduce or a per-shard loss mean is 1e-3..1 relative), and in fp32:
  one step tight where no kink can act (the loss and BatchNorm statistics of the first step
  are continuous functions of the inputs: 1e-5 relative), its gradients within 1e-2 of
  their scale (a kink crossing changes one position's share of a gradient sum: measured
  5e-4 relative at most; a missing all-reduce is 75%), and the epoch's loss and accuracy
  within 5e-3 relative and one test image (10x the worst measured difference, 4.5e-4).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxres import rundir
from jaxres.errors import JaxresError

REPO = Path(__file__).resolve().parents[1]

MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from jaxres import models, optim, parallel, train
    from tests.helpers import quiet, random_dataset, tiny_config
    assert jax.device_count() == 4, jax.devices()
    dataset = random_dataset()
    loop = {loop!r}

    def mesh_of(devices):
        return Mesh(np.array(jax.devices()[:devices]), ("batch",))

    def epoch_from_scratch(devices, steps, dtype):
        # make_train_epoch (shuffle, gather, augment, step over `steps` batches) from the
        # run's initial state, in the compute dtype `dtype`; returns (state, metrics) on the host
        config = tiny_config("unused", epochs=1, epoch_loop=loop)
        model = models.create_model(config.model, num_classes=4, width=config.width, norm=config.norm, dtype=dtype)
        optimizer, _ = optim.make_optimizer(config, steps_per_epoch=4)
        state = train.init_train_state(config, optimizer, models.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3)))
        state = jax.tree_util.tree_map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, jax.device_get(state))
        mesh = mesh_of(devices)
        epoch = train.make_train_epoch(model, optimizer, config, mesh, steps)
        put = lambda x: parallel.replicate(mesh, x)
        state, metrics = epoch(parallel.replicate_tree(mesh, state), put(dataset.train.images), put(dataset.train.labels), jax.random.PRNGKey(5))
        return jax.device_get(state), jax.device_get(metrics)

    def relative_difference(a, b):
        # max over leaves of max|a - b| / max|a| (each leaf on its own scale)
        worst = 0.0
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            worst = max(worst, float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-30)))
        return worst

    report = {{}}
    # float64, one 4-step epoch
    jax.config.update("jax_enable_x64", True)
    runs = [epoch_from_scratch(devices, 4, jnp.float64) for devices in (1, 4)]
    report["float64_epoch"] = {{
        name: relative_difference(getattr(runs[0][0], name), getattr(runs[1][0], name))
        for name in ("params", "batch_stats", "opt_state")
    }}
    report["float64_epoch"]["loss"] = abs(float(runs[0][1]["loss"]) / float(runs[1][1]["loss"]) - 1)
    jax.config.update("jax_enable_x64", False)  # the fp32 runs as a user runs them
    # fp32, one step (LR 0 at step 0, so the optimizer state holds gradient + weight decay)
    runs = [epoch_from_scratch(devices, 1, jnp.float32) for devices in (1, 4)]
    report["fp32_step"] = {{
        name: relative_difference(getattr(runs[0][0], name), getattr(runs[1][0], name))
        for name in ("batch_stats", "opt_state")
    }}
    report["fp32_step"]["loss"] = abs(float(runs[0][1]["loss"]) / float(runs[1][1]["loss"]) - 1)
    # fp32, the whole run as a user runs it
    rows = []
    for devices in (1, 4):
        config = tiny_config(os.path.join({tmp!r}, f"devices{{devices}}"), epochs=1, epoch_loop=loop)
        result = train.train_and_evaluate(config, dataset=dataset, progress=False, log=quiet, mesh=mesh_of(devices), write_plots=False)
        rows.append(result.history[-1])
    report["fp32_run"] = {{"rows": rows}}
    print(json.dumps(report))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("epoch_loop", ["steps", "scan"])
def test_one_epoch_on_four_devices_matches_one_device(tmp_path, epoch_loop):
    script = MULTI_DEVICE_SCRIPT.format(tmp=str(tmp_path), loop=epoch_loop)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    for name, difference in report["float64_epoch"].items():
        assert difference < 1e-10, (name, report)
    assert report["fp32_step"]["loss"] < 1e-5, report
    assert report["fp32_step"]["batch_stats"] < 1e-5, report
    assert report["fp32_step"]["opt_state"] < 1e-2, report
    one, four = report["fp32_run"]["rows"]
    for key in ("train_loss", "test_loss"):
        assert one[key] == pytest.approx(four[key], rel=5e-3), (key, report)
    assert abs(one["test_accuracy"] - four["test_accuracy"]) <= 1 / 40 + 1e-9, report  # 40 test images


MULTI_HOST_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import jax
    from jaxres import parallel, train
    process_id, port = int(sys.argv[1]), sys.argv[2]
    if process_id >= 0:
        parallel.initialize_distributed(f"localhost:{{port}}", 2, process_id)
    from tests.helpers import random_dataset, tiny_config, quiet
    name = f"process{{process_id}}" if process_id >= 0 else "single"
    config = tiny_config(os.path.join({tmp!r}, name), epochs=1)
    result = train.train_and_evaluate(config, dataset=random_dataset(), progress=False, log=quiet, write_plots=False)
    print(json.dumps({{"devices": jax.device_count(), "local": jax.local_device_count(),
                      "loss": result.history[-1]["train_loss"]}}))
    """
)


def read_checkpoint_leaves(workdir):
    state, _ = rundir.read_checkpoint(workdir)
    return jax.tree_util.tree_leaves(state["params"])


# What process 0 writes when jax.distributed's coordinator cannot listen on its port: gRPC's log
# line, then mostly a segfault, at times JaxRuntimeError "Failed to start RPC server".
COORDINATOR_BIND_FAILURES = ("Failed to add port to server", "Failed to start RPC server")


def reserve_port() -> socket.socket:
    """A socket bound to a free port on every address, not listening, with SO_REUSEPORT: while it
    is open no other program can take the port (a plain bind fails, and connect() skips bound
    ports), but the coordinator can still listen there, as gRPC's server sets SO_REUSEPORT too."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):  # "::" holds IPv4 too
        reservation = socket.socket(family)
        try:
            reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            reservation.bind((address, 0))
            return reservation
        except OSError:  # no IPv6: the IPv4 one
            reservation.close()
    raise OSError("cannot bind a free port on the IPv4 nor the IPv6 wildcard address")


def run_coordinated_processes(script, env, log_dir: Path, tries: int = 3) -> list[tuple[int, str, str]]:
    """Runs `script PROCESS_ID PORT` as processes 0 and 1 of a jax.distributed run on a reserved
    port; (return code, stdout, stderr) of each. Should the coordinator still fail to listen
    (another gRPC server of this user took the port first), the run is retried on a new port,
    `tries` times in all."""
    log_dir.mkdir()
    for attempt in range(tries):
        logs = [(log_dir / f"{attempt}-{i}.out", log_dir / f"{attempt}-{i}.err") for i in range(2)]
        workers = []
        with reserve_port() as reservation:
            port = str(reservation.getsockname()[1])
            try:
                for i, (out, err) in enumerate(logs):
                    with open(out, "w") as stdout, open(err, "w") as stderr:  # files: no pipe can fill up
                        command = [sys.executable, "-c", script, str(i), port]
                        workers.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, cwd=REPO))
                workers[0].wait(timeout=900)  # process 0 first: if it fails, process 1 would wait for it
                failed_to_listen = any(text in logs[0][1].read_text() for text in COORDINATOR_BIND_FAILURES)
                if workers[0].returncode != 0 and failed_to_listen:
                    continue  # on a new port (the finally ends process 1)
                if workers[0].returncode == 0:
                    workers[1].wait(timeout=900)
            finally:  # ends process 1 when process 0 failed
                for worker in workers:
                    if worker.poll() is None:
                        worker.kill()
                        worker.wait()
        return [(worker.returncode, out.read_text(), err.read_text()) for worker, (out, err) in zip(workers, logs)]
    pytest.fail(
        f"jax.distributed's coordinator could not listen on a reserved free port in {tries} tries (does its "
        f"gRPC server still set SO_REUSEPORT?); its last error:\n{logs[0][1].read_text()[-3000:]}"
    )


@pytest.mark.slow
def test_two_processes_on_localhost_match_one_process_with_two_devices(tmp_path):
    """Multi-host through jax.distributed (CPU collectives over gloo): 2 processes x 1 device.

    Each device computes the same half-batch with the same shapes as one process with two
    devices, so the programs (and their convolution algorithms) are the same: only the
    all-reduce differs (gloo between processes), which sums two numbers per element.
    """
    script = MULTI_HOST_SCRIPT.format(tmp=str(tmp_path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    outputs = run_coordinated_processes(script, env, tmp_path / "logs")
    for returncode, _, stderr in outputs:
        assert returncode == 0, stderr[-3000:]
    reports = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in outputs]
    assert [(r["devices"], r["local"]) for r in reports] == [(2, 1), (2, 1)]
    assert reports[0]["loss"] == reports[1]["loss"]
    assert (tmp_path / "process0" / "checkpoint.msgpack").is_file()
    assert not (tmp_path / "process1").exists(), "only process 0 writes logs and checkpoints"

    single_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    completed = subprocess.run(
        [sys.executable, "-c", script, "-1", "0"], env=single_env, capture_output=True, text=True, timeout=900,
        cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1])["devices"] == 2
    for multi, single in zip(read_checkpoint_leaves(tmp_path / "process0"), read_checkpoint_leaves(tmp_path / "single")):
        np.testing.assert_allclose(multi, single, atol=1e-5)


def test_auto_scans_off_the_cpu_and_on_the_cpu_only_without_xla_convolutions(monkeypatch):
    """`loops.xla_convolutions` counts XLA convolutions in a traced program, inside a scan's
    body and a custom_vjp's rules too; `loops.choose_loop` traces the model's forward pass
    once, when the run is prepared; explicit loops pass through untraced."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxres import loops, models

    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))

    def conv(x):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def in_scan(x):
        return jax.lax.scan(lambda carry, _: (conv(carry), None), x, None, length=2)[0]

    traced_conv = lambda: jax.make_jaxpr(jax.grad(lambda x: in_scan(x).sum()))(x)  # noqa: E731
    traced_none = lambda: jax.make_jaxpr(lambda x: jnp.tanh(x).sum())(x)  # noqa: E731
    assert loops.xla_convolutions(traced_conv()) >= 2  # forward and gradients, inside the scan
    assert loops.xla_convolutions(traced_none()) == 0

    class NoConvolution(nn.Module):
        @nn.compact
        def __call__(self, images, train=False):
            return nn.Dense(3)(images.reshape(images.shape[0], -1))

    with_convolutions = models.create_model(width=0.0625)  # XLA's convolutions
    assert loops.model_xla_convolutions(with_convolutions) >= 1
    assert loops.choose_loop("auto", with_convolutions) == "steps"
    assert loops.choose_loop("auto", NoConvolution()) == "scan"
    assert loops.choose_loop("auto") == "steps"  # no model to trace: the safe loop on CPU

    class Untraceable(nn.Module):
        def __call__(self, *args, **kwargs):
            pytest.fail("an explicit loop or another backend needs no trace")

    assert loops.choose_loop("scan", Untraceable()) == "scan"
    assert loops.choose_loop("steps", Untraceable()) == "steps"
    with pytest.raises(JaxresError, match="epoch_loop"):
        loops.choose_loop("sometimes")
    monkeypatch.setattr(loops.jax, "default_backend", lambda: "gpu")
    assert loops.choose_loop("auto", Untraceable()) == "scan"
