"""Numerical error of stam-jax and of the PyTorch reference, per dtype, against float64.

    python benchmarks/precision.py --model stam_16 --videos 4

Weights: the PyTorch reference of the official architecture with random weights (every tensor
random, LayerNorms included), converted to stam-jax. Inputs: uniform random uint8 videos. Ground
truth: the PyTorch reference in float64 on the same device. For each stam-jax compute dtype
(float32 at JAX's default matmul precision, float32 at 'highest', bfloat16, float16) and each
PyTorch mode (float32 with TF32 off, autocast bfloat16 and float16) it reports
max |logits - truth| / max |truth| and the top-1 agreement with the truth, so that stam-jax's
half precision is judged beside PyTorch's own on the same weights. Runs on the default JAX
device and the matching PyTorch device (CUDA when JAX runs on a GPU).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import torch
from _args import MODEL_DTYPES, checked, variant, whole

from convert.mapping import torch_to_flax
from convert.torch_reference import frames_from_videos, randomize_, reference_from_config
from stam_jax import create_model, model_config, sharding
from stam_jax.cli import ArgumentParser

# stam-jax's matmul precisions (`jax.default_matmul_precision`) a --dtypes entry may add.
PRECISIONS = ("default", "high", "highest")


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    """Max relative error and top-1 agreement of `got` against `want`."""
    got = np.asarray(got, np.float64)
    return {
        "max_rel_error": float(np.abs(got - want).max() / np.abs(want).max()),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
    }


def check_dtypes(text: str) -> str:
    """`--dtypes` as given: a comma list of DTYPE or DTYPE-PRECISION (`float32-highest`).

    Raises:
      ValueError: another dtype or precision, saying what to use.
    """
    for name in text.split(","):
        dtype, dash, precision = name.partition("-")
        if dtype not in MODEL_DTYPES or (dash and precision not in PRECISIONS):
            raise ValueError(
                f"{name!r} is not a dtype; use a comma list of {', '.join(MODEL_DTYPES)}, each "
                f"optionally with a matmul precision: -{', -'.join(PRECISIONS)}"
            )
    return text


def main(argv: list[str] | None = None) -> None:
    """Prints one JSON object with the measured errors."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="stam_16", action=variant())
    parser.add_argument("--videos", default=4, action=whole(1))
    parser.add_argument(
        "--dtypes",
        default="float32,float32-highest,bfloat16,float16",
        action=checked(check_dtypes),
        help="stam-jax's compute dtypes, each optionally with a matmul precision "
        "(float32-highest), comma-separated",
    )
    args = parser.parse_args(argv)
    config = model_config(create_model(args.model))
    reference = randomize_(reference_from_config(config), seed=0)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    heads = dict(num_heads=config["num_heads"], temporal_heads=config["temporal_heads"])
    _, params, _ = torch_to_flax(state_dict, **heads)
    del state_dict
    t, s = config["num_frames"], config["image_size"]
    videos = np.random.default_rng(1).integers(0, 256, (args.videos, t, s, s, 3), dtype=np.uint8)

    on_gpu = jax.default_backend() == "gpu"
    device = "cuda" if on_gpu else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    frames = frames_from_videos(videos).to(device)
    with torch.inference_mode():
        truth = reference.double().to(device)(frames.double()).cpu().numpy()
        result = {
            "model": args.model,
            "videos": args.videos,
            "device": str(jax.devices()[0]),
            "truth": f"PyTorch reference, float64, {device}",
            "jax": {},
            "torch": {},
        }
        reference = reference.float()
        result["torch"]["float32"] = compare(reference(frames).float().cpu().numpy(), truth)
        for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            with torch.autocast(device, dtype):
                got = reference(frames).float().cpu().numpy()
            result["torch"][f"autocast_{name}"] = compare(got, truth)

    for name in args.dtypes.split(","):
        dtype, _, precision = name.partition("-")
        model = create_model(args.model, dtype=dtype)
        start = time.perf_counter()
        with jax.default_matmul_precision(precision or None):
            # Compiled as run_eval.py compiles it (config.triton_gemm's default).
            forward = jax.jit(model.apply, compiler_options=sharding.compiler_options(False))
            got = np.asarray(forward({"params": params}, videos), np.float32)
        result["jax"][name] = compare(got, truth)
        result["jax"][name]["seconds_incl_compile"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
