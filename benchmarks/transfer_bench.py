"""Host-to-device cost of one evaluation batch: uint8 videos against float32.

    python benchmarks/transfer_bench.py --frames 16 --batch 2 --repeats 10          # CPU
    python benchmarks/transfer_bench.py --frames 16 --batch 32 --repeats 20         # GPU

`run_eval.py` and `run_train.py` send videos to the device as uint8 and scale them to [0, 1]
there (in the model's first step). This times, per batch of `(batch, frames, 224, 224, 3)`
pixels, alternating in one process:

- `uint8`: `jax.device_put` of the uint8 batch, as the pipeline does;
- `float32`: scaling on the host (`x.astype(float32) / 255`), then `jax.device_put` of the
  4x larger float32 batch: what a pipeline that normalises on the host would do;
- `float32_put_only`: the `jax.device_put` of that float32 batch alone (the transfer's share).

Each figure is the median over `--repeats` of the seconds until the batch is on the device
(`block_until_ready`), with its bytes and GB/s. Then, on the device, the uint8 batch scaled to
[0, 1] float32 by the compiled model's way (`scale_table`: a 256-entry look-up, exactly
ToTensor's values) and by a division by 255 (`scale_divide`: compiled as a multiplication by
1/255, one ulp off for 126 of the 256 values), alternating, median ms. Needs jax, flax, numpy.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _args import whole

from stam_jax.cli import ArgumentParser
from stam_jax.model import uint8_to_unit


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--batch", default=2, action=whole(1))
    parser.add_argument("--frames", default=16, action=whole(1))
    parser.add_argument("--size", default=224, action=whole(1), help="frame side in pixels")
    parser.add_argument("--repeats", default=10, action=whole(1))
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    rng = np.random.default_rng(0)
    shape = (args.batch, args.frames, args.size, args.size, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    scaled = pixels.astype(np.float32) / 255.0
    runners = {
        "uint8": lambda: jax.device_put(pixels, device),
        "float32": lambda: jax.device_put(pixels.astype(np.float32) / 255.0, device),
        "float32_put_only": lambda: jax.device_put(scaled, device),
    }
    for run in runners.values():  # first transfers allocate; not timed
        _timed(run)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            samples[name].append(_timed(run))
    result: dict[str, object] = {
        "device": str(device),
        "jax": jax.__version__,
        "batch_shape": list(shape),
        "repeats": args.repeats,
    }
    for name, times in samples.items():
        seconds = statistics.median(times)
        nbytes = pixels.nbytes * (1 if name == "uint8" else 4)
        result[name] = {
            "ms": round(seconds * 1e3, 3),
            "bytes": nbytes,
            "GB_per_s": round(nbytes / seconds / 1e9, 2),
        }
    result["float32_over_uint8"] = round(
        result["float32"]["ms"] / max(result["uint8"]["ms"], 1e-6), 2
    )
    on_device = jax.device_put(pixels, device)
    scalers = {
        "scale_table": jax.jit(uint8_to_unit),
        "scale_divide": jax.jit(lambda x: x.astype(jnp.float32) / 255.0),
    }
    scaled_ms: dict[str, list[float]] = {name: [] for name in scalers}
    for scale in scalers.values():  # compiled here, not timed
        _timed(lambda scale=scale: scale(on_device))
    for _ in range(args.repeats):
        for name, scale in scalers.items():
            scaled_ms[name].append(_timed(lambda scale=scale: scale(on_device)))
    for name, times in scaled_ms.items():
        result[name] = {"ms": round(statistics.median(times) * 1e3, 3)}
    result["table_over_divide"] = round(
        result["scale_table"]["ms"] / max(result["scale_divide"]["ms"], 1e-6), 2
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
