"""`python -m convert.selfcheck`: prove conversion and parity on this machine, end to end.

Builds the official architecture in PyTorch (`convert.torch_reference`) with random weights,
saves it as an official `{'model': state_dict}` `.pth`, converts it with the same code as
`python -m convert`, compares stam-jax logits with PyTorch's on random videos, writes the
checkpoint back with `convert.to_torch` and checks the round trip is bit-exact. Exit status 0
only if every check passes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from convert import convert_checkpoint, export_checkpoint
from convert.torch_reference import frames_from_videos, randomize_, reference_from_config
from stam_jax import VARIANTS, checkpoints, create_model, model_config
from stam_jax.cli import ArgumentParser

TOLERANCE = 1e-4  # max |jax - torch| / max |torch| in float32


def outputs(model_name: str) -> tuple[str, str, str]:
    """The names `run` writes in its workdir: the random-weight `.pth`, the stam-jax checkpoint
    converted from it and the `.pth` written back (never an official file's name, which a
    workdir holding the real `stam_16.pth` would have lost)."""
    prefix = _prefix(model_name)
    return f"{prefix}random.pth", f"{prefix}ckpt", f"{prefix}roundtrip.pth"


def _prefix(model_name: str) -> str:
    """What every file `run` writes for `model_name` starts with."""
    return f"selfcheck_{model_name}_"


def check_workdir(workdir: Path) -> str | None:
    """Why selfcheck must not write in `workdir` (None: it may). Only a missing or empty folder,
    or one holding nothing but an earlier selfcheck's outputs (replaced; what a stopped one
    left beside them too, named after them), is taken."""
    if not workdir.exists():
        return None
    if not workdir.is_dir():
        return f"--workdir {workdir} is not a folder; give a new or empty one."
    ours = tuple(_prefix(variant) for variant in VARIANTS)
    other = sorted(entry.name for entry in workdir.iterdir() if not entry.name.startswith(ours))
    if other:
        shown = ", ".join(other[:5]) + (" ..." if len(other) > 5 else "")
        return (
            f"--workdir {workdir} holds files this selfcheck did not write ({shown}); give a new "
            "or empty folder (nothing was written). An older stam-jax's selfcheck named its "
            "files <model>.pth, ckpt and <model>.roundtrip.pth: delete those if they are its."
        )
    return None


def run(model_name: str, batch: int, workdir: Path, seed: int = 0) -> bool:
    """Runs every check for `model_name`, printing each result; True if all pass.

    Earlier outputs of the same checks in `workdir` are replaced."""
    config = model_config(create_model(model_name))
    torch.manual_seed(seed)
    reference = randomize_(reference_from_config(config), seed)
    random_pth, ckpt_name, roundtrip_pth = outputs(model_name)
    pth = workdir / random_pth
    torch.save({"model": reference.state_dict()}, pth)
    size_mb = pth.stat().st_size / 2**20
    print(f"[1/4] official-format {model_name} with random weights: {pth} ({size_mb:.0f} MiB)")

    start = time.perf_counter()
    ckpt, _, report = convert_checkpoint(
        pth,
        workdir / ckpt_name,
        overwrite=True,  # an earlier run's (check_workdir took only selfcheck's outputs)
        num_heads=config["num_heads"],
        temporal_heads=config.get("temporal_heads"),
        num_frames=config["num_frames"] if config["aggregate"] == "mean" else None,
    )
    print(f"[2/4] converted to {ckpt} in {time.perf_counter() - start:.1f}s")
    for warning in report.warnings():
        print(f"      warning: {warning}")

    model, params = checkpoints.load(ckpt)
    rng = np.random.default_rng(seed)
    t, s = model.num_frames, model.image_size
    videos = rng.integers(0, 256, (batch, t, s, s, 3), dtype=np.uint8)
    got = np.asarray(model.apply({"params": params}, videos))
    with torch.inference_mode():
        want = reference(frames_from_videos(videos)).numpy()
    error = float(np.abs(got - want).max() / np.abs(want).max())
    same_top1 = bool((got.argmax(-1) == want.argmax(-1)).all())
    parity = error <= TOLERANCE and same_top1
    print(
        f"[3/4] logits vs PyTorch on {batch} random videos: max error {error:.2e} of the logit "
        f"scale (tolerance {TOLERANCE:.0e}), same top-1: {same_top1} -> "
        f"{'OK' if parity else 'FAIL'}"
    )

    back = workdir / roundtrip_pth
    export_checkpoint(ckpt, back, overwrite=True)
    original = torch.load(pth, weights_only=True)["model"]
    restored = torch.load(back, weights_only=True)["model"]
    exact = original.keys() == restored.keys() and all(
        original[k].dtype == restored[k].dtype and torch.equal(original[k], restored[k])
        for k in original
    )
    print(
        f"[4/4] official -> stam-jax -> official, {len(original)} tensors: "
        f"{'bit-exact' if exact else 'NOT bit-exact'} -> {'OK' if exact else 'FAIL'}"
    )
    return parity and exact


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 if every check passed, 1 otherwise."""
    parser = ArgumentParser(prog="python -m convert.selfcheck", description=__doc__)
    parser.add_argument("--model", default="stam_16", choices=sorted(VARIANTS))
    parser.add_argument("--batch", type=int, default=2, help="random videos to compare")
    parser.add_argument(
        "--workdir",
        help="keep the files here: a new or empty folder, or an earlier selfcheck's, whose "
        "outputs are replaced (default: a temporary folder)",
    )
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"argument --batch: {args.batch} videos; compare at least 1.")
    if args.workdir:
        workdir = Path(args.workdir)
        problem = check_workdir(workdir)
        if problem:
            parser.error(problem)
        workdir.mkdir(parents=True, exist_ok=True)
        ok = run(args.model, args.batch, workdir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ok = run(args.model, args.batch, Path(tmp))
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
