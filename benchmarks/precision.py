"""Half-precision error of a full-size model against float32, on the same converted weights.

    python benchmarks/precision.py --model stam_16 --videos 4

Weights: the PyTorch reference of the official architecture with random weights (every tensor
random, LayerNorms included), converted. Inputs: uniform random uint8 videos. Reports, per
compute dtype, max |logits - float32 logits| / max |float32 logits| and top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from convert.mapping import torch_to_flax
from convert.torch_reference import randomize_, reference_from_config
from stam_jax import create_model, model_config


def main() -> None:
    """Prints one JSON object with the measured errors."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="stam_16")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--dtypes", default="bfloat16,float16")
    args = parser.parse_args()
    config = model_config(create_model(args.model))
    reference = randomize_(reference_from_config(config), seed=0)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    heads = dict(num_heads=config["num_heads"], temporal_heads=config["temporal_heads"])
    _, params, _ = torch_to_flax(state_dict, **heads)
    del reference, state_dict
    t, s = config["num_frames"], config["image_size"]
    videos = np.random.default_rng(1).integers(0, 256, (args.videos, t, s, s, 3), dtype=np.uint8)

    def logits(dtype: str) -> np.ndarray:
        model = create_model(args.model, dtype=dtype)
        return np.asarray(jax.jit(model.apply)({"params": params}, videos))

    want = logits("float32")
    result = {"model": args.model, "videos": args.videos, "device": str(jax.devices()[0])}
    for dtype in args.dtypes.split(","):
        start = time.perf_counter()
        got = logits(dtype)
        result[dtype] = {
            "max_rel_error": float(np.abs(got - want).max() / np.abs(want).max()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "seconds": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
