"""Do XLA:CPU's oneDNN / XNNPACK switches speed up STAM's biggest GEMM? Side by side with torch.

    python benchmarks/xla_cpu_flags.py --rounds 2

The ViT-B MLP's first Linear on one STAM-16 video (3152 tokens x 768 -> 3072, 14.9 GFLOP), alone
and followed by the exact GELU, under each `XLA_FLAGS` setting (a fresh process each, since XLA
reads the flags once), alternating the settings `--rounds` times, and PyTorch's eager matmul on
the same shape in between. Prints one JSON object: GFLOP/s per setting and round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _args import whole

from stam_jax.cli import ArgumentParser

SETTINGS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_dot_fusion": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
}
M, K, N = 3152, 768, 3072

CHILD = """
import json, sys, time
import numpy as np
which, m, k, n, repeats = sys.argv[1], *map(int, sys.argv[2:6])
rng = np.random.default_rng(0)
a = rng.random((m, k), dtype=np.float32)
b = rng.random((k, n), dtype=np.float32)
if which == "torch":
    import torch
    a, b = torch.from_numpy(a), torch.from_numpy(b)
    fns = {"gemm": lambda: a @ b, "gemm_gelu": lambda: torch.nn.functional.gelu(a @ b)}
else:
    import jax, jax.numpy as jnp
    a, b = jnp.asarray(a), jnp.asarray(b)
    gemm = jax.jit(lambda a, b: a @ b)
    gelu = jax.jit(lambda a, b: jax.nn.gelu(a @ b, approximate=False))
    fns = {
        "gemm": lambda: gemm(a, b).block_until_ready(),
        "gemm_gelu": lambda: gelu(a, b).block_until_ready(),
    }
out = {}
for name, fn in fns.items():
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    out[name] = round(2 * m * k * n / float(np.median(times)) / 1e9, 1)
print(json.dumps(out))
"""


def measure(which: str, flags: str, repeats: int) -> dict[str, float]:
    """GFLOP/s of the GEMM and GEMM+GELU in a fresh process."""
    env = {**os.environ, "XLA_FLAGS": flags}
    args = [which, str(M), str(K), str(N), str(repeats)]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", default=2, action=whole(1))
    parser.add_argument("--repeats", default=7, action=whole(1), help="timed calls per measurement")
    args = parser.parse_args(argv)
    rows: dict[str, list] = {name: [] for name in [*SETTINGS, "torch"]}
    for _ in range(args.rounds):
        for name, flags in SETTINGS.items():
            rows[name].append(measure("jax", flags, args.repeats))
        rows["torch"].append(measure("torch", "", args.repeats))
    print(json.dumps({"shape": [M, K, N], "gflop_per_s": rows}, indent=1))


if __name__ == "__main__":
    main()
