"""A step -> an epoch program: one `lax.scan` or a host loop, for training, evaluation and the
LR range test alike.

    loop = choose_loop(config.epoch_loop, model)          # once, when a run is prepared
    program = epoch_program(loop, prepare, body, finish)  # carry, *args -> result
    carry, outputs = host_loop(step, carry, count, inputs_of, stop=None)

A program is written as three pure functions: `prepare(*args) -> (xs, context)` lays out
the per-step inputs `xs` (a pytree whose leaves have the step count as their leading
axis), `body(carry, x, context, *args) -> (carry, y)` is one step, and
`finish(carry, ys, context, *args)` reduces the stacked per-step outputs. The "scan" program
compiles all three as one `jax.jit` around a `lax.scan`; the "steps" program jits each
and runs the body from the host (`host_loop`). Both compute the same values.

Why two loops (`choose_loop`): off the CPU one scanned program is the faster. On the CPU,
XLA's own convolutions inside a while loop (which `lax.scan` lowers to) run many times
slower than outside one (jax-ml/jax#12868), while the convolutions of the oneDNN backend
(`jaxres.onednn`) do not; so a CPU epoch scans only when none of its convolutions is XLA's.
The measured gains are in benchmarks/README.md ("What each change gained"). The LR range
test always loops on the host: it watches each step's loss there to stop on divergence.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from jaxres.config import EPOCH_LOOPS, check_choice

LOOPS = ("scan", "steps")  # what `choose_loop` returns: "auto" resolved


def primitive_counts(closed_jaxpr) -> collections.Counter:
    """{primitive name: how many times it occurs} in a jaxpr, sub-jaxprs included (the bodies
    of scans, conditionals, custom_vjp rules, pjit calls)."""
    counts = collections.Counter()
    pending = [closed_jaxpr.jaxpr]
    while pending:
        jaxpr = pending.pop()
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for param in eqn.params.values():
                for value in param if isinstance(param, (list, tuple)) else (param,):
                    if isinstance(value, jax_core.ClosedJaxpr):
                        pending.append(value.jaxpr)
                    elif isinstance(value, jax_core.Jaxpr):
                        pending.append(value)
    return counts


def xla_convolutions(closed_jaxpr) -> int:
    """How many `conv_general_dilated` (XLA convolutions) a jaxpr holds, sub-jaxprs included."""
    return primitive_counts(closed_jaxpr)["conv_general_dilated"]


def model_xla_convolutions(model, image_shape=(32, 32, 3)) -> int:
    """The XLA convolutions of `model`'s forward pass on one image of `image_shape` (traced only,
    nothing runs). A convolution the backend leaves to XLA is XLA's in the gradients too, so
    this is zero exactly when no step of training or evaluation has one."""
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return xla_convolutions(jax.make_jaxpr(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images))


def choose_loop(epoch_loop: str, model=None, image_shape=(32, 32, 3)) -> str:
    """"scan" or "steps" for `epoch_loop` in `config.EPOCH_LOOPS` (auto, scan, steps), on the
    backend JAX runs on.

    auto: scan off the CPU; on the CPU scan when `model` (built with its convolution backend)
    has no XLA convolution (`model_xla_convolutions`), else steps (also without a model).
    Decided once per run, when it is prepared, and recorded in every metrics row.
    """
    check_choice("epoch_loop", epoch_loop, EPOCH_LOOPS)
    if epoch_loop != "auto":
        return epoch_loop
    if jax.default_backend() != "cpu":
        return "scan"
    if model is None or model_xla_convolutions(model, image_shape):
        return "steps"
    return "scan"


def stack_outputs(outputs: list):
    """A list of per-step output pytrees -> one pytree of arrays with a leading step axis."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *outputs)


def host_loop(step: Callable, carry, count: int, inputs_of: Callable[[int], Any], stop: Callable | None = None):
    """Run `carry, y = step(carry, inputs_of(i))` for i in 0 .. count - 1 from the host;
    `stop(i, y)` (if given) returning True ends the loop after step i. Returns (carry, [y, ...])."""
    outputs = []
    for index in range(count):
        carry, output = step(carry, inputs_of(index))
        outputs.append(output)
        if stop is not None and stop(index, output):
            break
    return carry, outputs


class EpochProgram:
    """A compiled epoch (or evaluation) in the loop it was built for: `program(carry, *args)`,
    or `program(*args)` when built with a fixed `carry` (an evaluation has none: None).
    `loop` says which loop ("scan" or "steps"); `function` is the compiled program itself
    (for "scan", one `jax.jit` taking the carry first: what `jax.export` takes)."""

    _NO_CARRY = object()

    def __init__(self, loop: str, function: Callable, carry=_NO_CARRY):
        self.loop, self.function, self.carry = loop, function, carry

    def with_carry(self, carry) -> "EpochProgram":
        """This program with its carry fixed to `carry`: called with the other arguments only."""
        return EpochProgram(self.loop, self.function, carry)

    def __call__(self, *args):
        if self.carry is EpochProgram._NO_CARRY:
            return self.function(*args)
        return self.function(self.carry, *args)


def epoch_program(loop: str, prepare: Callable, body: Callable, finish: Callable, *, out_shardings=None,
                  donate_carry: bool = True) -> EpochProgram:
    """The program `carry, *args -> finish(carry, ys, context, *args)` where `xs, context =
    prepare(*args)` and `carry, y = body(carry, x, context, *args)` runs for every step's x of
    xs, in `loop` ("scan": one jitted program around `lax.scan`; "steps": `prepare`, `body`
    and `finish` jitted apart and `body` called from the host). `carry` is donated unless
    `donate_carry` is False; outputs get `out_shardings`."""
    check_choice("loop", loop, LOOPS)
    donated = (0,) if donate_carry else ()
    if loop == "scan":

        def scanned(carry, *args):
            xs, context = prepare(*args)
            carry, ys = jax.lax.scan(lambda carry, x: body(carry, x, context, *args), carry, xs)
            return finish(carry, ys, context, *args)

        return EpochProgram(loop, jax.jit(scanned, donate_argnums=donated, out_shardings=out_shardings))

    prepare_jitted = jax.jit(prepare, out_shardings=out_shardings)
    body_jitted = jax.jit(body, donate_argnums=donated, out_shardings=out_shardings)
    finish_jitted = jax.jit(
        lambda carry, ys, context, *args: finish(carry, stack_outputs(ys), context, *args), out_shardings=out_shardings
    )

    def stepped(carry, *args):
        xs, context = prepare_jitted(*args)
        count = jax.tree_util.tree_leaves(xs)[0].shape[0]
        step = lambda carry, x: body_jitted(carry, x, context, *args)  # noqa: E731
        carry, ys = host_loop(step, carry, count, lambda index: jax.tree_util.tree_map(lambda leaf: leaf[index], xs))
        return finish_jitted(carry, ys, context, *args)

    return EpochProgram(loop, stepped)
