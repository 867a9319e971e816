"""The official STAM architecture in PyTorch, written from the published facts.

It holds the official parameter names (`blocks.N.attn.qkv`, `aggregate.transformer_enc...`), and
its temporal part is PyTorch's stock `nn.TransformerEncoder`, as in the official code, so that a
`state_dict()` of it is an official-format checkpoint and its outputs are the official outputs.
Input: frames flattened to `(B*T, 3, H, W)` float in [0, 1], as the official evaluation feeds them.
It is the reference that tests, benchmarks and `python -m convert.selfcheck` compare against.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Conv2d patches, flattened row-major to tokens."""

    def __init__(self, patch: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` images to `(N, patches, width)` tokens."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm-style attention with one fused qkv Linear."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    # Benchmarks set this to compare with PyTorch's fused kernel (same function, other rounding).
    use_sdpa = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over `(B, N, C)` tokens, same shape (PyTorch's SDPA if `use_sdpa`)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.use_sdpa:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> fc2."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward of `(..., width)` features, same shape."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block."""

    def __init__(
        self, width: int, heads: int, mlp: int, qkv_bias: bool = True, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x + attn(norm1(x))`, then `x + mlp(norm2(x))`, on `(B, N, C)` tokens."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TAggregate(nn.Module):
    """The official temporal aggregate around the stock nn.TransformerEncoder."""

    def __init__(
        self, frames: int, width: int, depth: int, heads: int, ff: int, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.frames = frames
        layer = nn.TransformerEncoderLayer(
            d_model=width, nhead=heads, dim_feedforward=ff, layer_norm_eps=eps
        )
        self.transformer_enc = nn.TransformerEncoder(
            layer, num_layers=depth, norm=nn.LayerNorm(width, eps=eps), enable_nested_tensor=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, frames + 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B*T, D)` frame features to the temporal cls token's output, `(B, D)`."""
        x = x.view(x.shape[0] // self.frames, self.frames, -1)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        # The stock encoder is sequence-first: (T+1, B, D).
        return self.transformer_enc(x.transpose(0, 1))[0]


class MeanAggregate(nn.Module):
    """Mean of the frame features."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B*T, D)` frame features to their mean over each video's frames, `(B, D)`."""
        return x.view(x.shape[0] // self.frames, self.frames, -1).mean(dim=1)


class ReferenceSTAM(nn.Module):
    """The official `STAM_224` structure with configurable sizes.

    `layer_norm_eps` is the official 1e-5 unless changed (for a stam-jax model trained with
    another value; an official `.pth` does not store it).
    """

    def __init__(
        self,
        num_classes: int = 400,
        num_frames: int = 16,
        image_size: int = 224,
        patch_size: int = 16,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        aggregate: str = "transformer",
        temporal_depth: int = 6,
        temporal_heads: int = 8,
        temporal_mlp_dim: int = 2048,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, hidden_size))
        self.patch_embed = PatchEmbed(patch_size, hidden_size)
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, mlp_dim, qkv_bias, layer_norm_eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        if aggregate == "transformer":
            self.aggregate = TAggregate(
                num_frames,
                hidden_size,
                temporal_depth,
                temporal_heads,
                temporal_mlp_dim,
                layer_norm_eps,
            )
        else:
            self.aggregate = MeanAggregate(num_frames)
        self.head = nn.Linear(hidden_size, num_classes)

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` frames to the ViT's final cls-token features, `(N, hidden)`."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B*T, 3, H, W)` frames in [0, 1] (`frames_from_videos`) to `(B, classes)` logits."""
        return self.head(self.aggregate(self.frame_features(x)))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every parameter distinct random values (LayerNorm scales and biases included).

    Default initialisation leaves LayerNorm weights at one and many biases at zero, which would
    hide a swapped or dropped tensor; here every tensor matters to the output.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            elif name.endswith(("cls_token", "pos_embed")):
                p.copy_(0.1 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)
    return model.eval()


def reference_from_config(config: dict) -> ReferenceSTAM:
    """Builds the reference for a stam-jax model config dict (`stam_jax.model_config`)."""
    from stam_jax.model import STAM

    if config.get("temporal_hidden_size") not in (None, config.get("hidden_size", 768)):
        raise ValueError("the official architecture has no separate temporal width.")
    names = inspect.signature(ReferenceSTAM).parameters
    # Keys are filtered to the reference's, so another dict (a checkpoint's whole config,
    # {'model': ..., 'metadata': ...}) would otherwise build the default STAM-16 without a word.
    unknown = sorted(set(config) - set(names) - {f.name for f in dataclasses.fields(STAM)})
    if unknown:
        raise ValueError(
            f"config keys {unknown} are not model fields; pass a model config "
            "(stam_jax.model_config(model), or a checkpoint config's ['model'])."
        )
    return ReferenceSTAM(**{k: v for k, v in config.items() if k in names})


def frames_from_videos(videos: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B*T, 3, H, W) float in [0, 1], as `ToTensor` makes them."""
    b, t, h, w, c = videos.shape
    x = torch.from_numpy(np.ascontiguousarray(videos)).reshape(b * t, h, w, c)
    return x.permute(0, 3, 1, 2).float().div(255)
