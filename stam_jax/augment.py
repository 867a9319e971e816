"""Batch-level video augmentation: Mixup and CutMix on clips, jit-compatible.

Follows timm's batch mode: one mixing per batch, each video mixed with its partner in the
reversed batch (`videos[::-1]`), one lambda ~ Beta(alpha, alpha) per call. For video, a CutMix
box is a spatial box shared by every frame of every clip (a temporally consistent patch).

All configuration (alphas, switch probability) is static Python floats; every random decision
is drawn from the key, so `mix_videos` can sit inside a jitted train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mix_videos"]


def _check_config(mixup_alpha: float, cutmix_alpha: float, switch_prob: float) -> None:
    # Written as `not x >= 0` so that NaN is rejected too.
    if not mixup_alpha >= 0:
        raise ValueError(f"mixup_alpha must be >= 0, got {mixup_alpha!r}")
    if not cutmix_alpha >= 0:
        raise ValueError(f"cutmix_alpha must be >= 0, got {cutmix_alpha!r}")
    if not 0 <= switch_prob <= 1:
        raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob!r}")


def _box_mask(key: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
    """A CutMix box as a boolean `(H, W)` mask, as timm's `rand_bbox` draws it.

    The box reaches `floor(side * sqrt(1 - lam)) // 2` on each side of a centre uniform over the
    frame (so its sides are that cut rounded down to an even number: an odd cut loses a pixel,
    as in timm), and is clipped at the frame's edges; it may thus cover less than `1 - lam` of
    the frame, and `mix_videos` corrects lam to the area it covers.
    """
    key_y, key_x = jax.random.split(key)
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy = jax.random.randint(key_y, (), 0, height)
    cx = jax.random.randint(key_x, (), 0, width)
    y0 = jnp.clip(cy - cut_h // 2, 0, height)
    y1 = jnp.clip(cy + cut_h // 2, 0, height)
    x0 = jnp.clip(cx - cut_w // 2, 0, width)
    x1 = jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height)
    cols = jnp.arange(width)
    in_rows = (rows >= y0) & (rows < y1)
    in_cols = (cols >= x0) & (cols < x1)
    return in_rows[:, None] & in_cols[None, :]


def mix_videos(
    key: jax.Array,
    videos: jax.Array,
    targets: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mixup or CutMix a batch of videos with the reversed batch.

    With both alphas 0 the inputs come back unchanged. With one alpha > 0 that mode is used; with
    both, CutMix is chosen with probability `switch_prob` (a coin drawn from `key`).

    Mixup: `x = lam * x + (1 - lam) * x[::-1]`, targets likewise.
    CutMix: the pixels of one box, the same for every frame and every video, come from
    `x[::-1]`; `lam` is then the exact fraction of the frame kept, and the targets are mixed with
    that corrected `lam`.

    Args:
        key: a PRNG key; all randomness (mode, lambda, box) comes from it.
        videos: float videos `(B, T, H, W, C)`, e.g. in `[0, 1]`.
        targets: float soft labels `(B, K)` (one-hot or smoothed).
        mixup_alpha: Beta parameter of Mixup's lambda; 0 disables Mixup. A static Python float.
        cutmix_alpha: Beta parameter of CutMix's lambda; 0 disables CutMix. A static Python float.
        switch_prob: probability of CutMix when both modes are enabled. A static Python float.
        valid: optional bool `(B,)`, False for rows that are no video (a training loop's
            padding, or a video that failed to load, at weight 0): a video whose partner is not
            valid is left as it is (pixels and target), rather than mixed with that row's.

    Returns:
        `(videos, targets)`: the mixed videos (dtype of `videos`) and mixed targets (dtype of
        `targets`), with the input shapes.

    Raises:
        ValueError: an alpha < 0, `switch_prob` outside `[0, 1]`, or inputs of the wrong rank,
            dtype or batch size.
    """
    _check_config(mixup_alpha, cutmix_alpha, switch_prob)
    if videos.ndim != 5:
        raise ValueError(f"videos must be (B, T, H, W, C), got shape {videos.shape}")
    if targets.ndim != 2 or targets.shape[0] != videos.shape[0]:
        raise ValueError(
            f"targets must be (B, K) with B = {videos.shape[0]}, got shape {targets.shape}"
        )
    if not jnp.issubdtype(videos.dtype, jnp.floating):
        # Mixed pixels are fractions of two videos': uint8 ones would be truncated.
        raise ValueError(
            f"videos must be floating point, got dtype {videos.dtype}: convert uint8 frames "
            "(as load_train_clip makes them) with stam_jax.model.uint8_to_unit(videos), the "
            "model's own exact scaling to [0, 1], and pass the mixed float videos to the model"
        )
    if not jnp.issubdtype(targets.dtype, jnp.floating):
        # Mixed targets keep the targets' dtype: integer ones would be truncated to 0 or 1.
        raise ValueError(
            f"targets must be floating point, got dtype {targets.dtype}: mixed targets are "
            "fractions; pass e.g. jax.nn.one_hot(labels, K) (float32) or "
            "targets.astype(jnp.float32)"
        )
    if valid is not None and tuple(valid.shape) != (videos.shape[0],):
        raise ValueError(f"valid must be (B,) with B = {videos.shape[0]}, got shape {valid.shape}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return videos, targets

    key_coin, key_lam, key_box = jax.random.split(key, 3)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(key_coin) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = jnp.where(use_cutmix, float(cutmix_alpha), float(mixup_alpha))
    lam = jax.random.beta(key_lam, alpha, alpha, dtype=jnp.float32)

    height, width = videos.shape[2], videos.shape[3]
    box = _box_mask(key_box, lam, height, width)
    kept = 1.0 - jnp.mean(box, dtype=jnp.float32)
    lam = jnp.where(use_cutmix, kept, lam)

    # Per-pixel weight of the video itself: lam everywhere (Mixup) or 0/1 off/in the box (CutMix).
    # Both factors are exact 0/1 for CutMix, so the box's pixels are exact copies of the partner.
    own = jnp.where(use_cutmix, jnp.where(box, 0.0, 1.0), lam)[None, None, :, :, None]
    partner = 1.0 - own
    mixed_videos = videos * own.astype(videos.dtype) + videos[::-1] * partner.astype(videos.dtype)
    soft = targets.astype(jnp.float32)
    mixed_targets = (lam * soft + (1.0 - lam) * soft[::-1]).astype(targets.dtype)
    if valid is not None:  # a row whose partner is not valid stays as it is, exactly
        alone = ~jnp.asarray(valid, bool)[::-1]
        mixed_videos = jnp.where(alone[:, None, None, None, None], videos, mixed_videos)
        mixed_targets = jnp.where(alone[:, None], targets, mixed_targets)
    return mixed_videos, mixed_targets
