"""Initialising STAM's spatial part from image ViT files: timm .pth / .safetensors, Google .npz."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from test_init import flat, fresh_params

from convert.mapping import torch_to_flax
from convert.torch_reference import randomize_, reference_from_config
from stam_jax import create_model, model_config
from stam_jax.init import InitError, init_from_checkpoint, read_vit

MODEL = create_model("stam_tiny")
CONFIG = model_config(MODEL)


def timm_state_dict() -> dict[str, torch.Tensor]:
    """An image ViT in timm's names: STAM's spatial keys, a 1000-class head, a timm extra."""
    reference = randomize_(reference_from_config(CONFIG), seed=3)
    sd = {k: v for k, v in reference.state_dict().items() if not k.startswith("aggregate.")}
    width = CONFIG["hidden_size"]
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, width), torch.randn(1000)
    sd["fc_norm.weight"] = torch.ones(width)
    return sd


def spatial_reference(sd) -> dict[str, np.ndarray]:
    """The same tensors through the official-checkpoint converter, as stam-jax paths."""
    full = randomize_(reference_from_config(CONFIG), seed=3).state_dict()
    _, params, _ = torch_to_flax(
        {k: v.numpy() for k, v in full.items()},
        num_heads=CONFIG["num_heads"],
        temporal_heads=CONFIG["temporal_heads"],
    )
    return {k: v for k, v in flat(params).items() if not k.startswith(("aggregate", "head"))}


def check(path, want):
    fresh = fresh_params(MODEL)
    params, report = init_from_checkpoint(MODEL, fresh, path, temporal_pos_embed_std=1.0)
    got = flat(params)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    fresh = flat(fresh)
    np.testing.assert_array_equal(got["head/kernel"], fresh["head/kernel"])
    text = "\n".join(report)
    assert "head: re-initialised (checkpoint has 1000 classes, model 10)" in text
    assert "aggregate: " in text and "redrawn as normal(0, 1.0)" in text
    return text


def test_a_vit_file_of_other_key_names_is_refused_not_ignored(tmp_path):
    # Hugging Face's ViT names: nothing was copied, and training went on from a fresh
    # initialisation, with "0 of N tensors copied" in the report only.
    names = {
        "vit.embeddings.cls_token": torch.zeros(1, 1, 32),
        "vit.encoder.layer.0.attention.attention.query.weight": torch.zeros(32, 32),
        "classifier.weight": torch.zeros(10, 32),
    }
    torch.save(names, tmp_path / "hf.pth")
    with pytest.raises(
        InitError,
        match=r"nothing in .*hf\.pth fits this model \(not part of STAM, ignored: 3 keys "
        r"\(classifier\.weight, .*\)\)\. An image ViT file needs timm's key names "
        r"\(patch_embed\.proj\.weight, blocks\.0\.attn\.qkv\.weight, \.\.\.\)",
    ):
        init_from_checkpoint(MODEL, fresh_params(MODEL), tmp_path / "hf.pth")


def test_timm_pth_and_safetensors(tmp_path):
    sd = timm_state_dict()
    want = spatial_reference(sd)
    torch.save(sd, tmp_path / "vit.pth")
    text = check(tmp_path / "vit.pth", want)
    assert "not part of STAM, ignored: 1 keys (fc_norm.weight)" in text
    # Saved from DistributedDataParallel ('module.' keys) without a head (a feature
    # extractor): the same spatial tensors; the head and the aggregate are fresh, each counted.
    ddp = {f"module.{k}": v for k, v in sd.items() if not k.startswith("head.")}
    torch.save(ddp, tmp_path / "ddp.pth")
    params, report = init_from_checkpoint(MODEL, fresh_params(MODEL), tmp_path / "ddp.pth")
    got = flat(params)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    aggregate = sum(k.startswith("aggregate/") for k in got)
    assert report[0] == f"{len(want)} of {len(got)} tensors copied from {tmp_path / 'ddp.pth'}"
    assert report[-2:] == [
        f"aggregate: {aggregate} tensors not in the checkpoint, freshly initialised",
        "head: 2 tensors not in the checkpoint, freshly initialised (head/bias, head/kernel)",
    ]
    # The same tensors as .safetensors (bfloat16 and float16 ones too), written by hand to
    # the format; those two hold values their dtype represents exactly.
    half = {"norm.weight": ("BF16", ml_dtypes.bfloat16), "norm.bias": ("F16", np.float16)}
    want = dict(want)
    header, blobs, offset = {}, [], 0
    for key, value in sd.items():
        kind, dtype = half.get(key, ("F32", np.float32))
        array = value.numpy().astype(dtype)
        if key in half:
            want[key.replace("weight", "scale").replace(".", "/")] = array.astype(np.float32)
        header[key] = {
            "dtype": kind,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        blobs.append(array.tobytes())
        offset += array.nbytes
    raw = json.dumps(header).encode()
    (tmp_path / "vit.safetensors").write_bytes(
        len(raw).to_bytes(8, "little") + raw + b"".join(blobs)
    )
    check(tmp_path / "vit.safetensors", want)
    # Damaged files and other files under the name: one InitError, not a MemoryError (the first
    # 8 bytes of a web page, read as the header's length, asked for exabytes).
    whole = (tmp_path / "vit.safetensors").read_bytes()
    for bad, why in (
        (b"<!DOCTYPE html><html></html>", "its header length, .* exceeds its size of 28"),
        (whole[: 8 + len(raw) // 2], "its header length, .* exceeds its size"),
        (len(raw).to_bytes(8, "little") + b"x" * len(raw), "its header is not a JSON object"),
        (whole[:-4], "tensor .*'s data ends past the file"),
    ):
        (tmp_path / "bad.safetensors").write_bytes(bad)
        with pytest.raises(InitError, match=r"bad.safetensors is not a readable .safet.*\(" + why):
            read_vit(tmp_path / "bad.safetensors")


def test_google_vit_npz(tmp_path):
    want = spatial_reference(timm_state_dict())
    heads, width = CONFIG["num_heads"], CONFIG["hidden_size"]
    g = {
        "cls": want["cls_token"],
        "embedding/kernel": want["patch_embed/proj/kernel"],
        "embedding/bias": want["patch_embed/proj/bias"],
        "Transformer/posembed_input/pos_embedding": want["pos_embed"],
        "Transformer/encoder_norm/scale": want["norm/scale"],
        "Transformer/encoder_norm/bias": want["norm/bias"],
        "head/kernel": np.zeros((width, 1000), np.float32),
        "head/bias": np.zeros(1000, np.float32),
        "pre_logits/kernel": np.zeros((width, width), np.float32),
    }
    for i in range(CONFIG["depth"]):
        src, dst = f"blocks_{i}", f"Transformer/encoderblock_{i}"
        for ours, google in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            for leaf in ("scale", "bias"):
                g[f"{dst}/{google}/{leaf}"] = want[f"{src}/{ours}/{leaf}"]
        for ours, google in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            for leaf in ("kernel", "bias"):
                g[f"{dst}/MlpBlock_3/{google}/{leaf}"] = want[f"{src}/mlp/{ours}/{leaf}"]
        attn = f"{dst}/MultiHeadDotProductAttention_1"
        kernels = np.split(want[f"{src}/attn/qkv/kernel"], 3, axis=1)
        biases = np.split(want[f"{src}/attn/qkv/bias"], 3)
        for n, name in enumerate(("query", "key", "value")):
            g[f"{attn}/{name}/kernel"] = kernels[n].reshape(width, heads, -1)
            g[f"{attn}/{name}/bias"] = biases[n].reshape(heads, -1)
        g[f"{attn}/out/kernel"] = want[f"{src}/attn/proj/kernel"].reshape(heads, -1, width)
        g[f"{attn}/out/bias"] = want[f"{src}/attn/proj/bias"]
    np.savez(tmp_path / "vit.npz", **g)
    text = check(tmp_path / "vit.npz", want)
    assert "LayerNorm epsilon is 1e-6" in text
    assert "not part of STAM, ignored: 1 arrays (pre_logits/kernel)" in text
    # Damaged files and other files under the name: an InitError naming the file (numpy said
    # "File is not a zip file", a zipfile error run_train.py did not catch, or advised loading
    # the file unsafely with allow_pickle).
    whole = (tmp_path / "vit.npz").read_bytes()
    for bad in (whole[:40], b"<!DOCTYPE html><html></html>"):
        (tmp_path / "bad.npz").write_bytes(bad)
        with pytest.raises(InitError, match=r"bad.npz is not a readable .npz file \(.*download"):
            read_vit(tmp_path / "bad.npz")
