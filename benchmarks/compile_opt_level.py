"""XLA:CPU compile time and run time of one training step at each backend optimisation level.

    python benchmarks/compile_opt_level.py --model stam_demo --batch 16  # what the tests use
    python benchmarks/compile_opt_level.py --model stam_tiny_mean --batch 2 --repeats 1  # smoke
    python benchmarks/compile_opt_level.py --model stam_tiny --batch 4 --levels 0,0/nofusion

The test suite compiles at `--xla_backend_optimization_level=0` with XLA:CPU's fusion emitters
off (tests/conftest.py), because compiling is most of its time. This measures what that buys
and costs: for each level (`default` or 0-3; with `/nofusion`, also
`--xla_cpu_use_fusion_emitters=false`), in a fresh process (XLA reads XLA_FLAGS when its
backend starts), a train step of the model (forward, backward, AdamW) is compiled (process CPU
seconds and wall seconds of `.compile()`), then run (median wall seconds of `--repeats`
steps), and its loss printed to show how far the levels' results differ. Both flags are taken
out of the XLA_FLAGS it is started with. One JSON line per level, in the order given. Needs
jax, flax, optax.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _args import checked, variant, whole

from stam_jax.cli import ArgumentParser

ROOT = Path(__file__).resolve().parent.parent


def measure(model_name: str, batch: int, repeats: int) -> dict:
    """Compiles and runs one train step in this process (under its XLA_FLAGS)."""
    import jax
    import jax.numpy as jnp
    import optax

    from stam_jax import create_model

    model = create_model(model_name)
    shape = (batch, model.num_frames, model.image_size, model.image_size, 3)
    videos = jax.random.uniform(jax.random.key(0), shape)
    labels = jnp.arange(batch) % model.num_classes
    params = jax.jit(model.init)(jax.random.key(1), videos[:1])
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)

    def step(params, opt_state, videos, labels, rng):
        def loss_fn(p):
            logits = model.apply(p, videos, deterministic=False, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    args = (params, opt_state, videos, labels, jax.random.key(2))
    cpu, wall = time.process_time(), time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = jax.block_until_ready(compiled(*args))[2]
        times.append(time.perf_counter() - start)
    return {
        "compile_cpu_s": round(cpu, 2),
        "compile_wall_s": round(wall, 2),
        "step_s_median": round(statistics.median(times), 4),
        "loss": float(loss),
    }


LEVELS = ("default", "0", "1", "2", "3")


def check_levels(text: str) -> str:
    """`--levels` as given, each a level of `LEVELS`, optionally with '/nofusion'.

    Raises:
      ValueError: another level or option, saying what to use.
    """
    for level in text.split(","):
        number, slash, option = level.partition("/")
        if number not in LEVELS or (slash and option != "nofusion"):
            raise ValueError(
                f"{level!r} is not a level; use a comma list of {', '.join(LEVELS)}, each "
                "optionally with '/nofusion'"
            )
    return text


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object per optimisation level."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="stam_demo", action=variant())
    parser.add_argument("--batch", default=16, action=whole(1))
    parser.add_argument("--repeats", default=5, action=whole(1))
    parser.add_argument(
        "--levels",
        default="default,0",
        action=checked(check_levels),
        help="'default' or 0-3, each optionally with '/nofusion', comma-separated",
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model, args.batch, args.repeats)))
        return
    chosen = ("optimization_level", "fusion_emitters")  # set per level below
    base = " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split() if not any(c in f for c in chosen)
    )
    for level in args.levels.split(","):
        number, _, option = level.partition("/")
        flags = base
        if number != "default":
            flags += f" --xla_backend_optimization_level={number}"
        if option:
            flags += " --xla_cpu_use_fusion_emitters=false"
        command = [sys.executable, __file__, "--child", "1", "--model", args.model]
        command += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
        env = {**os.environ, "XLA_FLAGS": flags.strip(), "PYTHONPATH": str(ROOT)}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cold compile each time
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        row = {"level": level, "model": args.model, "batch": args.batch}
        print(json.dumps({**row, **json.loads(result.stdout.strip().splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
