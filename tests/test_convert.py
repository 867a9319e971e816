"""Conversion: every tensor accounted for, bad files refused clearly, round trips bit-exact."""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import (
    TINY_CONFIGS,
    cli_args,
    convert_kwargs,
    random_params,
    random_videos,
    torch_logits,
)

from convert import ConversionError, convert_checkpoint, export_checkpoint
from convert.__main__ import main as convert_main
from convert.mapping import _torch_shape, infer_config, key_table, torch_to_flax
from convert.to_torch import main as to_torch_main
from convert.torch_io import UnsafeCheckpointError, load_state_dict
from convert.torch_reference import randomize_, reference_from_config
from stam_jax import checkpoints, create_model, model_config
from stam_jax.checkpoints import CheckpointError
from stam_jax.model import param_shapes
from stam_jax.train_step import TrainState

TINY = TINY_CONFIGS["tiny"]


def load_refusal(path: Path) -> str:
    """The message `load_state_dict` refuses `path` with."""
    with pytest.raises(ConversionError) as info:
        load_state_dict(path)
    return str(info.value)


def load_official(path):
    return torch.load(path, weights_only=True)["model"]


def assert_state_dicts_identical(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def official_stam_16_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of an official stam_16 checkpoint and its shape, written out from the facts."""
    d, linear = 768, lambda key, o, i: {f"{key}.weight": (o, i), f"{key}.bias": (o,)}
    norm = lambda key: {f"{key}.weight": (d,), f"{key}.bias": (d,)}  # noqa: E731
    shapes = {
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
        "cls_token": (1, 1, d),
        "pos_embed": (1, 197, d),
        **norm("norm"),
        "aggregate.cls_token": (1, 1, d),
        "aggregate.pos_embed": (1, 17, d),
        **norm("aggregate.transformer_enc.norm"),
        **linear("head", 400, d),
    }
    for n in range(12):
        b = f"blocks.{n}"
        shapes |= norm(f"{b}.norm1") | norm(f"{b}.norm2") | linear(f"{b}.attn.qkv", 3 * d, d)
        shapes |= linear(f"{b}.attn.proj", d, d) | linear(f"{b}.mlp.fc1", 3072, d)
        shapes |= linear(f"{b}.mlp.fc2", d, 3072)
    for n in range(6):
        layer = f"aggregate.transformer_enc.layers.{n}"
        shapes |= {
            f"{layer}.self_attn.in_proj_weight": (3 * d, d),
            f"{layer}.self_attn.in_proj_bias": (3 * d,),
        }
        shapes |= linear(f"{layer}.self_attn.out_proj", d, d) | norm(f"{layer}.norm1")
        shapes |= linear(f"{layer}.linear1", 2048, d) | linear(f"{layer}.linear2", d, 2048)
        shapes |= norm(f"{layer}.norm2")
    return shapes


def test_stam_16_keys_and_shapes_are_the_official_ones():
    want = official_stam_16_shapes()
    assert len(want) == 4 + 12 * 12 + 2 + 2 + 6 * 12 + 2 + 2
    assert sum(math.prod(shape) for shape in want.values()) == 119_205_520
    model = create_model("stam_16")
    flax = param_shapes(model)
    assert {key: _torch_shape(flax[path], how) for key, path, how in key_table(model)} == want
    # From the shapes alone (head counts are in none of them), the converter reads stam_16.
    inferred = infer_config({k: np.broadcast_to(np.float32(0), s) for k, s in want.items()})
    assert inferred == {k: model_config(model)[k] for k in inferred}
    assert (inferred["num_heads"], inferred["temporal_heads"]) == (12, 8)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_round_trip_is_bit_exact(name, official_pth, tmp_path, capsys):
    config = TINY_CONFIGS[name]
    pth, _ = official_pth(config)
    convert_checkpoint(pth, tmp_path / "ckpt", **convert_kwargs(config))
    assert to_torch_main([str(tmp_path / "ckpt"), str(tmp_path / "back.pth")]) == 0
    assert_state_dicts_identical(load_official(pth), load_official(tmp_path / "back.pth"))
    # The flags that read it back as it was (its head counts are not the official ones).
    flags = " ".join(cli_args(config))
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"OUT_DIR {flags}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_round_trips_in_its_dtype(dtype, official_pth, tmp_path):
    def to_half(sd):
        sd.update({k: v.to(dtype) for k, v in sd.items()})

    pth, _ = official_pth(TINY, edit=to_half)
    convert_checkpoint(pth, tmp_path / "ckpt", **convert_kwargs(TINY))
    written = export_checkpoint(tmp_path / "ckpt", tmp_path / "back.pth")
    assert written[:2] == (tmp_path / "back.pth", str(dtype).removeprefix("torch."))
    assert written[2] and all(n.startswith("note: the .pth does not store") for n in written[2])
    assert_state_dicts_identical(load_official(pth), load_official(tmp_path / "back.pth"))
    # An explicit dtype overrides the recorded one.
    export_checkpoint(tmp_path / "ckpt", tmp_path / "f32.pth", dtype="float32")
    back = load_official(tmp_path / "f32.pth")
    assert all(v.dtype == torch.float32 for v in back.values())
    original = load_official(pth)
    assert all(torch.equal(back[k], original[k].float()) for k in original)


def test_float16_export_refuses_params_beyond_its_range(official_pth, tmp_path):
    # The .pth held Inf for them, without a word; read back, its conversion warned of Inf.
    pth, _ = official_pth(TINY, edit=lambda sd: sd["head.bias"].fill_(-1e5))
    convert_checkpoint(pth, tmp_path / "ckpt", **convert_kwargs(TINY))
    beyond = r"ckpt holds values beyond float16's range .* \(head/bias\).* bfloat16"
    with pytest.raises(ConversionError, match=beyond):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "half.pth", dtype="float16")
    assert not (tmp_path / "half.pth").exists()
    export_checkpoint(tmp_path / "ckpt", tmp_path / "bf16.pth", dtype="bfloat16")
    assert load_official(tmp_path / "bf16.pth")["head.bias"].min() < -9e4


def test_bfloat16_tensors_load_as_ml_dtypes(official_pth):
    pth, _ = official_pth(
        TINY, edit=lambda sd: sd.update({"head.bias": sd["head.bias"].bfloat16()})
    )
    sd = load_state_dict(pth)
    assert sd["head.bias"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: sd,
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["state_dict", "bare", "module_prefix"],
)
def test_accepted_containers_give_identical_params(wrap, official_pth, tmp_path):
    plain, _ = official_pth(TINY, name="plain.pth")
    other, _ = official_pth(TINY, wrap=wrap, name="other.pth")
    convert_checkpoint(plain, tmp_path / "a", **convert_kwargs(TINY))
    convert_checkpoint(other, tmp_path / "b", **convert_kwargs(TINY))
    chex.assert_trees_all_equal(
        checkpoints.load(tmp_path / "a")[1], checkpoints.load(tmp_path / "b")[1]
    )


def test_missing_keys_are_all_named(official_pth, tmp_path, capsys):
    def drop(sd):
        del sd["blocks.1.mlp.fc2.weight"]
        del sd["aggregate.transformer_enc.layers.0.linear1.bias"]

    pth, _ = official_pth(TINY, edit=drop)
    assert convert_main([str(pth), str(tmp_path / "ckpt"), *cli_args(TINY)]) == 2
    err = capsys.readouterr().err
    assert "missing key blocks.1.mlp.fc2.weight" in err
    assert "missing key aggregate.transformer_enc.layers.0.linear1.bias" in err
    assert not (tmp_path / "ckpt").exists()


def test_missing_qkv_bias_is_zero_filled_like_the_official_loader(official_pth, tmp_path, capsys):
    def drop_qkv_bias(sd):
        for key in [k for k in sd if k.endswith("attn.qkv.bias")]:
            del sd[key]

    # The reference without qkv bias computes exactly what a zero bias computes.
    pth, reference = official_pth(TINY, edit=drop_qkv_bias, qkv_bias=False)
    assert convert_main([str(pth), str(tmp_path / "ckpt"), *cli_args(TINY)]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 qkv bias tensors are absent" in err
    assert "blocks.0.attn.qkv.bias" in err and "blocks.1.attn.qkv.bias" in err
    model, params = checkpoints.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["bias"], 0.0)
    videos = random_videos(TINY, batch=2)
    want = torch_logits(reference, videos)
    got = np.asarray(model.apply({"params": params}, videos))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_unexpected_keys_warn_or_fail_with_strict(official_pth, tmp_path, capsys):
    def add(sd):
        sd["aggregate.extra.weight"] = torch.zeros(3)
        sd["head_dist.weight"] = torch.zeros(2, 2)

    pth, _ = official_pth(TINY, edit=add)
    assert convert_main([str(pth), str(tmp_path / "a"), *cli_args(TINY)]) == 0
    err = capsys.readouterr().err
    assert "2 unexpected keys ignored" in err and "aggregate.extra.weight, head_dist.weight" in err
    assert checkpoints.read_config(tmp_path / "a")["metadata"]["ignored_keys"] == [
        "aggregate.extra.weight",
        "head_dist.weight",
    ]

    assert convert_main([str(pth), str(tmp_path / "b"), "--strict", *cli_args(TINY)]) == 2
    err = capsys.readouterr().err
    assert "unexpected key aggregate.extra.weight (--strict)" in err
    assert not (tmp_path / "b").exists()


def test_wrong_shape_names_key_expected_and_found(official_pth):
    def reshape(sd):
        sd["blocks.0.attn.proj.weight"] = torch.zeros(32, 31)

    pth, _ = official_pth(TINY, edit=reshape)
    with pytest.raises(
        ConversionError,
        match=r"wrong shape blocks\.0\.attn\.proj\.weight: "
        r"expected \(32, 32\), found \(32, 31\)",
    ):
        torch_to_flax(load_state_dict(pth), **convert_kwargs(TINY))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "extra": Payload()}, path)
    with pytest.raises(
        UnsafeCheckpointError, match=r"refused.*io\.open.*Nothing from it was executed"
    ):
        load_state_dict(path)
    assert not marker.exists()
    # The file really is malicious: an unsafe load runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_cli_refuses_malicious_pickle(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    assert convert_main([str(path), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "code ran" not in captured.out
    assert "refused" in captured.err and "print" in captured.err


def test_damaged_and_wrong_files(official_pth, tmp_path):
    pth, _ = official_pth(TINY)
    data = pth.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(4))
    html = tmp_path / "stam_16.pth"  # what a failed download saves
    html.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")
    cases = {
        truncated: r"truncated or corrupt zip-format \.pth",
        empty: r"is empty \(0 bytes\)",
        text: r"is not a PyTorch \.pth \(17 bytes, starting b'not a checkpoint'\): neither",
        npy: r"array\.npy is not a PyTorch \.pth \(\d+ bytes, starting b\"\\x93NUMPY",
        html: r"is a web page \(\d+ bytes\), not a PyTorch \.pth: the download saved an error",
        tmp_path / "absent.pth": r"no such file",
        tmp_path: r"is a directory",
    }
    for path, message in cases.items():
        with pytest.raises(ConversionError, match=message):
            load_state_dict(path)


def test_reader_matches_torch_load(tmp_path):
    base = torch.randn(6, 5)
    tensors = {
        "contiguous": torch.randn(3, 4),
        "transposed": base.t(),  # non-contiguous strides
        "row_slice": base[2:4],  # storage offset into a shared storage
        "column": base[:, 1],
        "half": torch.randn(7).half(),
        "bfloat": torch.randn(2, 3).bfloat16(),
        "parameter": torch.nn.Parameter(torch.randn(4)),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "mixed.pth"
    torch.save({"model": tensors}, path)
    loaded = load_state_dict(path)
    for key, tensor in tensors.items():
        array = np.asarray(loaded[key])
        assert array.shape == tuple(tensor.shape), key
        expected = tensor.detach()
        if expected.dtype == torch.bfloat16:
            assert array.dtype == ml_dtypes.bfloat16
            expected, array = expected.float(), array.astype(np.float32)
        np.testing.assert_array_equal(array, expected.numpy(), err_msg=key)


def test_corrupt_storage_bytes_are_reported(official_pth, tmp_path):
    pth, _ = official_pth(TINY)
    data = bytearray(pth.read_bytes())
    # Zero bytes inside a tensor's stored data: the zip CRC no longer matches.
    weight = torch.load(pth, weights_only=True)["model"]["blocks.1.mlp.fc1.weight"]
    start = bytes(data).find(weight.numpy().tobytes())
    assert start > 0
    data[start + 64 : start + 80] = bytes(16)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r"storage .*data/\d+ is unreadable: Bad CRC-32"):
        torch_to_flax(load_state_dict(damaged), **convert_kwargs(TINY))


def test_conversion_needs_no_torch(official_pth, tmp_path):
    pth, _ = official_pth(TINY)
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now fails
        "from convert.__main__ import main\n"
        f"sys.exit(main({[str(pth), str(tmp_path / 'ckpt'), *cli_args(TINY)]!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert checkpoints.read_config(tmp_path / "ckpt")["model"] == TINY


def test_legacy_non_zip_format(official_pth, tmp_path):
    zip_pth, _ = official_pth(TINY, name="zip.pth")
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(zip_pth, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    convert_checkpoint(zip_pth, tmp_path / "a", **convert_kwargs(TINY))
    convert_checkpoint(legacy, tmp_path / "b", **convert_kwargs(TINY))
    chex.assert_trees_all_equal(
        checkpoints.load(tmp_path / "a")[1], checkpoints.load(tmp_path / "b")[1]
    )

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil_legacy.pth"
    torch.save({"model": Payload()}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="Nothing from it was executed"):
        load_state_dict(evil)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_calling_os_system_is_refused_as_unsafe(tmp_path, zip_format):
    # torch blocks the os and sys modules outright and words that refusal differently from an
    # unlisted global; both must read as unsafe, not as "not a PyTorch checkpoint".
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(
        UnsafeCheckpointError, match=r"refused.*system.*Nothing from it was executed"
    ):
        load_state_dict(path)
    assert not marker.exists()


def test_a_state_dict_entry_that_is_not_a_tensor_is_named_with_the_fix(tmp_path):
    path = tmp_path / "with_epoch.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2), "head.bias": 5}}, path)
    assert load_refusal(path) == (
        f"{path}: state dict entry 'head.bias' is not a tensor but a value of type int (5); "
        "re-save it with the model's tensors alone: sd = torch.load(PATH, weights_only=True)"
        "['model']; torch.save({'model': {k: v for k, v in sd.items() if torch.is_tensor(v)}}, "
        "'stam.pth')."
    )
    torch.save({"model": {"module.norm.weight": "x" * 100}}, path)  # a long value is cut short
    with pytest.raises(ConversionError, match=r"value of type str \('xxxxxxxxx+\.\.\.\); "):
        load_state_dict(path)


def test_entries_outside_stams_keys_are_unexpected_whatever_they_hold(official_pth, capsys):
    # The official loader (strict=False) skips keys the model does not have, whatever they hold:
    # so does the conversion, naming them, where it refused the file for their dtype or type.
    extra = {
        "epoch": 5,
        "extra.num_batches_tracked": torch.tensor(5),
        "extra.running_mean": torch.zeros(3, dtype=torch.float64),
        "normalizer.mask": torch.ones(2, dtype=torch.bool),  # not STAM's `norm.`
    }
    pth, _ = official_pth(TINY, edit=lambda sd: sd.update(extra))
    loaded = load_state_dict(pth)
    assert {k: loaded[k].dtype for k in extra} == {
        "epoch": "a value of type int (5)",
        "extra.num_batches_tracked": "an int64 tensor",
        "extra.running_mean": "a float64 tensor",
        "normalizer.mask": "a bool tensor",
    }
    _, params, report = torch_to_flax(loaded, num_heads=2, temporal_heads=4)
    assert report.unexpected == sorted(extra)
    with pytest.raises(ConversionError, match=r"unexpected key epoch \(--strict\)"):
        torch_to_flax(loaded, num_heads=2, temporal_heads=4, strict=True)
    assert convert_main([str(pth), str(pth.parent / "ckpt"), *cli_args(TINY)]) == 0
    assert (
        "4 unexpected keys ignored (pass --strict to refuse): epoch, extra.num_batches_tracked, "
        "extra.running_mean, normalizer.mask" in capsys.readouterr().err
    )
    _, converted = checkpoints.load(pth.parent / "ckpt")
    chex.assert_trees_all_equal(converted, params)
    # So in a bare state dict (it was "no state dict": not every value a tensor).
    bare = pth.parent / "bare.pth"
    torch.save({**torch.load(pth, weights_only=True)["model"], "step": 5}, bare)
    assert load_state_dict(bare)["step"].dtype == "a value of type int (5)"


def test_values_checkpoints_keep_beside_the_weights_are_read(official_pth, tmp_path):
    # What PyTorch's weights-only loader takes: bytes (protocol 2: _codecs.encode), bytearray,
    # sets, complex numbers, Counter, torch.Size and torch.device, here beside the state dict.
    import collections

    beside = {
        "git": b"\x00abc\xff",
        "buffer": bytearray(b"\x01\x02"),
        "empty": bytearray(),
        "tags": {"a", "b"},
        "z": 1 + 2j,
        "counts": collections.Counter({"x": 2}),
        "shape": torch.Size([1, 2]),
        "device": torch.device("cuda", 1),
        "cpu": torch.device("cpu"),
    }
    expected = {**beside, "shape": (1, 2), "device": "cuda:1", "cpu": "cpu"}
    pth, _ = official_pth(TINY)
    sd = torch.load(pth, weights_only=True)["model"]
    for protocol in (2, 4):
        path = tmp_path / f"beside_{protocol}.pth"
        torch.save({"model": sd, **beside}, path, pickle_protocol=protocol)
        with zipfile.ZipFile(path) as archive:
            pickled = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
        from convert.torch_io import _read_zip

        assert {k: v for k, v in _read_zip(path).items() if k != "model"} == expected
        loaded = load_state_dict(path)
        assert sorted(loaded) == sorted(sd)
        if protocol == 2:
            assert b"_codecs\nencode" in pickled and b"__builtin__\nset" in pickled
    # Their stand-ins take only what a pickle of such a value holds: no size to allocate.
    for call in (
        _op_call(_op_global("builtins", "bytearray"), b"J\x00\xca\x9a\x3b"),  # 10^9 bytes
        _op_call(_op_global("_codecs", "encode"), _op_str("abc"), _op_str("rot13")),
        _op_call(_op_global("torch", "Size"), b"(" + _op_str("x") + b"t"),
    ):
        path = tmp_path / "odd.pth"
        _write_pth(path, b"\x80\x04}" + _op_str("model") + call + b"s.")
        with pytest.raises(ConversionError, match=r"odd\.pth: malformed checkpoint: "):
            load_state_dict(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(ConversionError, match=r"no state dict.*\['epoch', 'optimizer'\]"):
        load_state_dict(path)
    path = tmp_path / "ints.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, dtype=torch.int64)}}, path)
    with pytest.raises(ConversionError, match=r"'head.weight' has dtype int64; expected float32"):
        load_state_dict(path)


def test_shapes_the_architecture_is_read_from_are_checked(official_pth, tmp_path, capsys):
    # A tensor of another rank, or with a 0 dimension, gave an IndexError, a ValueError from
    # unpacking or the model's own check: tracebacks, exit status 1.
    edits = {
        "pos_embed": (torch.zeros(17 * 32), r"pos_embed has shape \(544,\); expected 3 dim"),
        "patch_embed.proj.weight": (
            torch.zeros(32, 192),
            r"patch_embed\.proj\.weight has shape \(32, 192\); expected 4 dimensions, none of "
            r"them 0, as \(width, 3, p, p\), to infer the patch size: the file is damaged",
        ),
        "head.weight": (torch.zeros(0, 32), r"head\.weight has shape \(0, 32\); expected 2 dim"),
        "aggregate.cls_token": (torch.tensor(1.0), r"aggregate\.cls_token has shape \(\); "),
        "blocks.0.mlp.fc1.weight": (torch.zeros(64), r"blocks\.0\.mlp\.fc1\.weight has shape"),
        "aggregate.pos_embed": (
            torch.zeros(1, 1, 32),
            r"aggregate\.pos_embed holds the temporal cls token's position only, no frame's",
        ),
    }
    for key, (tensor, message) in edits.items():
        pth, _ = official_pth(TINY, edit=lambda sd, k=key, t=tensor: sd.update({k: t}))
        with pytest.raises(ConversionError, match=message):
            torch_to_flax(load_state_dict(pth), num_heads=2, temporal_heads=4)
    pth, _ = official_pth(TINY, edit=lambda sd: sd.update({"pos_embed": torch.zeros(1, 1, 32)}))
    assert convert_main([str(pth), str(tmp_path / "out"), *cli_args(TINY)]) == 2
    assert "error: pos_embed holds 0 patch positions, not a square grid." in capsys.readouterr().err


def test_head_counts_and_frames_are_checked(official_pth, tmp_path):
    pth, _ = official_pth(TINY)
    sd = load_state_dict(pth)
    with pytest.raises(ConversionError, match=r"not apply to width 32; pass --num-heads"):
        torch_to_flax(sd)
    with pytest.raises(ConversionError, match=r"does not divide into 5 heads"):
        torch_to_flax(sd, num_heads=5)
    with pytest.raises(ConversionError, match=r"temporal width 32 does not divide into 3 heads"):
        torch_to_flax(sd, num_heads=2, temporal_heads=3)
    with pytest.raises(ConversionError, match=r"--num-frames 9 contradicts .* T=4"):
        torch_to_flax(sd, num_heads=2, temporal_heads=4, num_frames=9)

    mean_pth, _ = official_pth(TINY_CONFIGS["mean"], name="mean.pth")
    with pytest.raises(ConversionError, match=r"T is not stored in it; pass --num-frames"):
        torch_to_flax(load_state_dict(mean_pth), num_heads=2)


def test_missing_layer_in_sequence(official_pth):
    def drop_block(sd):
        for key in [k for k in sd if k.startswith("blocks.0.")]:
            del sd[key]

    pth, _ = official_pth(TINY, edit=drop_block)
    with pytest.raises(
        ConversionError,
        match=r"the ViT blocks \(blocks\.N\.\*\) are numbered 1: blocks\.0\.\* is missing, so "
        r"the \d+ key\(s\) past it do not fit a model of 0 layers: blocks\.1\.",
    ):
        torch_to_flax(load_state_dict(pth), **convert_kwargs(TINY))


def test_existing_output_needs_force(official_pth, tmp_path, capsys):
    pth, _ = official_pth(TINY)
    out = tmp_path / "ckpt"
    assert convert_main([str(pth), str(out), *cli_args(TINY)]) == 0
    assert convert_main([str(pth), str(out), *cli_args(TINY)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_main([str(pth), str(out), "--force", *cli_args(TINY)]) == 0

    back = tmp_path / "back.pth"
    assert to_torch_main([str(out), str(back)]) == 0
    assert to_torch_main([str(out), str(back)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert to_torch_main([str(out), str(back), "--force"]) == 0


def test_a_pth_output_name_is_refused(tmp_path, capsys, official_pth):
    pth, _ = official_pth(TINY)
    assert convert_main([str(pth), str(tmp_path / "out.pth"), *cli_args(TINY)]) == 2
    assert "out.pth names a PyTorch file, but python -m convert writes a stam-jax checkpoint" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out.pth").exists()


def test_to_torch_refuses_non_checkpoints(tmp_path, capsys):
    assert to_torch_main([str(tmp_path / "nothing"), str(tmp_path / "x.pth")]) == 2
    assert "nothing does not exist; expected a stam-jax checkpoint directory" in (
        capsys.readouterr().err
    )
    (tmp_path / "afile").write_text("x")
    assert to_torch_main([str(tmp_path / "afile"), str(tmp_path / "x.pth")]) == 2
    assert "afile is not a directory" in capsys.readouterr().err
    # A folder inside a checkpoint names the checkpoint.
    ckpt = tmp_path / "saved"
    checkpoints.save(ckpt, create_model("stam_tiny"), random_params(TINY))
    assert to_torch_main([str(ckpt / "params"), str(tmp_path / "x.pth")]) == 2
    assert f"{ckpt / 'params'} is a folder inside the checkpoint {ckpt}: pass {ckpt}." in (
        capsys.readouterr().err
    )
    # The arguments swapped: the .pth is named with the command that converts it.
    pth = tmp_path / "stam_16.pth"
    pth.write_bytes(b"PK")
    assert to_torch_main([str(pth), str(tmp_path / "ckpt")]) == 2
    assert (
        f"{pth} is a PyTorch file; a stam-jax checkpoint directory is expected: convert it once "
        f"with python -m convert {pth} {tmp_path / 'stam_16'} and pass {tmp_path / 'stam_16'}."
    ) in capsys.readouterr().err
    assert to_torch_main([str(tmp_path), str(tmp_path / "x.pth")]) == 2
    assert "is not a stam-jax checkpoint" in capsys.readouterr().err


def test_checkpoint_save_load_round_trip(tmp_path):
    model = create_model("stam_tiny")
    videos = random_videos(TINY, batch=1)
    params = model.init(jax.random.key(0), videos)["params"]
    checkpoints.save(tmp_path / "ckpt", model, params, metadata={"note": "x"})
    loaded_model, loaded = checkpoints.load(tmp_path / "ckpt")
    assert loaded_model == model
    chex.assert_trees_all_equal(loaded, params)
    assert checkpoints.read_config(tmp_path / "ckpt")["metadata"] == {"note": "x"}
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoints.save(tmp_path / "ckpt", model, params)


def test_save_refuses_params_of_another_model(tmp_path):
    model = create_model("stam_tiny")
    params = model.init(jax.random.key(0), random_videos(TINY, batch=1))["params"]
    other = create_model("stam_tiny", num_classes=11)
    with pytest.raises(CheckpointError) as error:
        checkpoints.save(tmp_path / "ckpt", other, params)
    assert str(error.value).splitlines() == [
        "params do not fit the model:",
        "  param head/bias: shape (10,), this model's (11,)",
        "  param head/kernel: shape (32, 10), this model's (32, 11)",
        "To use them, build the model they were made for (`create_model(name, num_classes=10)`).",
    ]
    assert not (tmp_path / "ckpt").exists()


def test_force_refuses_outputs_that_are_not_checkpoints_before_reading(
    official_pth, tmp_path, monkeypatch, capsys
):
    # A folder holding the source .pth and other files is never deleted by --force.
    pth, _ = official_pth(TINY)
    (tmp_path / "notes.txt").write_text("keep")
    assert convert_main([str(pth), str(tmp_path), "--force", *cli_args(TINY)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a stam-jax checkpoint (it holds notes.txt" in err
    assert "nothing was deleted" in err and pth.exists() and (tmp_path / "notes.txt").exists()

    # Bad outputs are refused before the (here absent) .pth is read.
    afile = tmp_path / "afile"
    afile.write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: Path(p).name != "locked" and real_access(p, mode)
    )
    cases = {
        (afile, "--force"): r"afile is a file, not a checkpoint directory",
        (tmp_path / "link", "--force"): r"link is a symbolic link \(to .*nowhere\)",
        (afile / "sub",): r"cannot write .*afile/sub: .*afile is a file, not a folder",
        (tmp_path / "locked" / "ckpt",): r"cannot write .*locked/ckpt: .*locked is not writable",
    }
    for (out, *flags), message in cases.items():
        args = [str(tmp_path / "absent.pth"), str(out), *flags, *cli_args(TINY)]
        assert convert_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert re.search(message, err), err
    assert afile.read_text() == "keep"


def test_to_torch_output_paths(official_pth, tmp_path, monkeypatch, capsys):
    pth, _ = official_pth(TINY)
    ckpt = tmp_path / "ckpt"
    convert_checkpoint(pth, ckpt, **convert_kwargs(TINY))
    # Missing parent directories are created.
    nested = tmp_path / "new" / "deeper" / "back.pth"
    assert to_torch_main([str(ckpt), str(nested)]) == 0
    assert_state_dicts_identical(load_official(pth), load_official(nested))
    assert "note: the .pth does not store the ViT head count" in capsys.readouterr().err
    with pytest.raises(ConversionError, match=r"or pass --force \(overwrite=True from Python\)"):
        export_checkpoint(tmp_path / "absent", nested)  # refused before the checkpoint is read

    afile = tmp_path / "afile"
    afile.write_text("keep")
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: Path(p).name != "locked" and real_access(p, mode)
    )
    cases = {
        (tmp_path / "new", "--force"): r"new is a directory; pass the name of the \.pth file",
        (afile / "x.pth",): r"cannot write .*afile/x\.pth: .*afile is a file, not a folder",
        (tmp_path / "locked" / "x.pth",): r"cannot write .*locked/x\.pth: .*locked is not writable",
    }
    for (out, *flags), message in cases.items():
        # Checked before the (here absent) checkpoint is read.
        assert to_torch_main([str(tmp_path / "absent"), str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err

    # A write that fails midway is one clear error, and leaves no .partial file.
    real_save = torch.save

    def fail_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise RuntimeError("[enforce fail at inline_container.cc:1] . strerror: No space left")

    monkeypatch.setattr(torch, "save", fail_midway)
    assert to_torch_main([str(ckpt), str(tmp_path / "full.pth")]) == 2
    assert "error: cannot write " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("full")) == []
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["deeper"]


def test_key_with_and_without_module_prefix_is_refused(official_pth):
    def duplicate(sd):
        sd["module.head.weight"] = torch.zeros_like(sd["head.weight"])

    pth, _ = official_pth(TINY, edit=duplicate)
    with pytest.raises(
        ConversionError,
        match=r"both with and without the 'module\.' prefix: head\.weight and module\.head\.weight",
    ):
        torch_to_flax(load_state_dict(pth), **convert_kwargs(TINY))


def test_head_and_frame_counts_must_be_at_least_one(official_pth):
    sd = load_state_dict(official_pth(TINY)[0])
    bad = {
        "--num-heads 0": dict(num_heads=0, temporal_heads=4),
        "--temporal-heads 0": dict(num_heads=2, temporal_heads=0),
        "--temporal-heads -4": dict(num_heads=2, temporal_heads=-4),
        "--num-frames -3": dict(num_heads=2, temporal_heads=4, num_frames=-3),
    }
    for flag, kwargs in bad.items():
        with pytest.raises(ConversionError, match=f"{flag} is not a count; pass .* N >= 1"):
            torch_to_flax(sd, **kwargs)

    mean = load_state_dict(official_pth(TINY_CONFIGS["mean"], name="mean.pth")[0])
    with pytest.raises(ConversionError, match=r"--num-frames 0 is not a count"):
        torch_to_flax(mean, num_heads=2, num_frames=0)
    with pytest.raises(ConversionError, match=r"--temporal-heads 8 does not apply.*mean-aggregate"):
        torch_to_flax(mean, num_heads=2, num_frames=4, temporal_heads=8)


def test_common_non_pth_files_are_named(official_pth, tmp_path):
    pth, _ = official_pth(TINY)
    header = json.dumps({"head.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    safetensors = tmp_path / "stam.safetensors"
    safetensors.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(8))
    tar = tmp_path / "stam.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(pth, arcname="stam_16.pth")
    tgz = tmp_path / "stam.tar.gz"
    tgz.write_bytes(gzip.compress(tar.read_bytes()))
    npz = tmp_path / "stam.npz"
    np.savez(npz, head=np.zeros(2))
    plain_zip = tmp_path / "stam.zip"
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.write(pth, "stam_16.pth")
    reads = r"python -m convert reads official PyTorch \.pth files"
    cases = {
        safetensors: rf"is a safetensors file, not a PyTorch \.pth; {reads}.*load_file",
        tar: rf"is a tar archive, not a PyTorch \.pth; {reads}.*Extract it first \(tar -xf",
        tgz: rf"is gzip-compressed, not a PyTorch \.pth; {reads}.*Extract it first \(tar -xzf",
        npz: rf"is a numpy \.npz archive, not a PyTorch \.pth; {reads}",
        plain_zip: rf"holds stam_16\.pth\); {reads}.*extract it first \(unzip stam\.zip\)",
    }
    for path, message in cases.items():
        with pytest.raises(ConversionError, match=message) as info:
            load_state_dict(path)
        assert "weights_only=False" not in str(info.value) and "download" not in str(info.value)
    advice = load_refusal(npz).split("as one: ")[1].removesuffix(".")
    compile(advice, "advice", "eval")  # pasteable as written (had an unbalanced brace)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    import convert.core

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.core, "convert_checkpoint", interrupted)
    monkeypatch.setattr(convert.core, "export_checkpoint", interrupted)
    assert convert_main(["in.pth", str(tmp_path / "out")]) == 130
    assert to_torch_main([str(tmp_path / "ckpt"), str(tmp_path / "out.pth")]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "interrupted: nothing was written (a checkpoint already there is kept).",
        "interrupted: the .pth was not written.",
    ]


def test_float64_fix_and_non_finite_weights_warning(official_pth, tmp_path, capsys):
    f64, _ = official_pth(TINY, edit=lambda sd: sd.update({"head.bias": sd["head.bias"].double()}))
    with pytest.raises(
        ConversionError, match=r"has dtype float64.*Re-save it in float32.*v\.float"
    ):
        load_state_dict(f64)

    def poison(sd):
        sd["head.bias"][0] = float("nan")
        sd["norm.weight"][1] = float("inf")

    pth, _ = official_pth(TINY, edit=poison, name="nan.pth")
    assert convert_main([str(pth), str(tmp_path / "ckpt"), *cli_args(TINY)]) == 0
    err = capsys.readouterr().err
    assert "warning: NaN or Inf values in the weights" in err
    assert "2 tensor(s): norm.weight, head.bias" in err and "explain refuse such a" in err
    assert checkpoints.read_config(tmp_path / "ckpt")["metadata"]["non_finite"] == [
        "norm.weight",
        "head.bias",
    ]


def test_export_says_what_the_pth_does_not_carry():
    from convert.core import official_notes

    official = {"hidden_size": 768, "num_heads": 12, "temporal_heads": 8, "num_frames": 16}
    assert official_notes(official) == []
    assert official_notes({**official, "layer_norm_eps": 1e-6}) == [
        "warning: layer_norm_eps=1e-06 is not stored in a .pth; the official code (and python "
        "-m convert) uses 1e-5, so its logits will differ from this model's."
    ]
    assert official_notes({**official, "temporal_hidden_size": 384}) == [
        "warning: the temporal transformer is 384 wide and the ViT 768: the .pth holds "
        "aggregate.input_proj, which the official code does not have, so it cannot load the "
        "file (python -m convert can)."
    ]
    assert official_notes({**official, "num_heads": 6, "temporal_heads": 4}) == [
        "note: the .pth does not store the ViT head count or the temporal head count; read it "
        "back with: python -m convert FILE.pth OUT_DIR --num-heads 6 --temporal-heads 4"
    ]
    assert official_notes({**official, "aggregate": "mean", "temporal_heads": 4}) == [
        "note: the .pth does not store T (a mean aggregate has no temporal tensors); read it "
        "back with: python -m convert FILE.pth OUT_DIR --num-frames 16"
    ]


def test_a_gap_in_the_layer_numbers_names_the_keys_past_it(official_pth, tmp_path):
    def stray(sd):
        sd["aggregate.transformer_enc.layers.5.linear1.weight"] = torch.zeros(2, 2)

    pth, _ = official_pth(TINY, edit=stray, name="stray.pth")
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(pth, tmp_path / "out", **convert_kwargs(TINY))
    assert str(info.value) == (
        "the temporal layers (aggregate.transformer_enc.layers.N.*) are numbered 0-1, 5: "
        "aggregate.transformer_enc.layers.2.* is missing, so the 1 key(s) past it do not fit a "
        "model of 2 layers: aggregate.transformer_enc.layers.5.linear1.weight. Remove them if "
        "they do not belong (del state_dict[key], then torch.save), or use an undamaged copy of "
        "the file."
    )
    assert not (tmp_path / "out").exists()


def test_flax_to_torch_refuses_params_of_a_larger_variant():
    from convert.mapping import flax_to_torch

    params = random_params(TINY)
    shallower = create_model("stam_tiny", depth=TINY["depth"] - 1)
    with pytest.raises(ConversionError, match=r"hold 12 tensor\(s\) that the model has no place"):
        flax_to_torch(shallower, params, consume=True)
    mean = create_model("stam_tiny", aggregate="mean")
    with pytest.raises(ConversionError, match=r"aggregate/cls_token, aggregate/pos_embed"):
        flax_to_torch(mean, params)
    assert "blocks_1" in params and "aggregate" in params  # nothing consumed


def test_reference_from_config_refuses_a_dict_that_is_not_a_model_config(tmp_path):
    from convert.torch_reference import reference_from_config

    model = create_model("stam_tiny")
    checkpoints.save(tmp_path / "ckpt", model, random_params(TINY))
    config = checkpoints.read_config(tmp_path / "ckpt")
    with pytest.raises(
        ValueError, match=r"config keys \['format', 'metadata', 'model', 'version'\] are not"
    ):
        reference_from_config(config)
    assert reference_from_config(config["model"]).head.out_features == TINY["num_classes"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_to_flax_takes_torch_tensors(dtype):
    reference = randomize_(reference_from_config(TINY))
    as_torch = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    as_numpy = {k: v.float().numpy() for k, v in as_torch.items()}  # exact upcasts
    _, params, report = torch_to_flax(as_torch, **convert_kwargs(TINY))
    _, expected, _ = torch_to_flax(as_numpy, **convert_kwargs(TINY))
    chex.assert_trees_all_equal(params, expected)
    assert report.source_dtypes == [str(dtype).removeprefix("torch.")]
    assert not report.stripped_prefix
    # Saved from DistributedDataParallel: the same params, and the report says so.
    ddp = {f"module.{k}": v for k, v in as_torch.items()}
    _, params, report = torch_to_flax(ddp, **convert_kwargs(TINY))
    chex.assert_trees_all_equal(params, expected)
    assert report.stripped_prefix
    # A model's parameters, which require grad, as well.
    torch_to_flax(dict(reference.named_parameters()), **convert_kwargs(TINY))


def test_flax_to_torch_names_a_variables_dict():
    from convert.mapping import flax_to_torch

    params = random_params(TINY)
    with pytest.raises(ConversionError, match=r"\['params'\]\), not params; pass variables\['p"):
        flax_to_torch(create_model("stam_tiny"), {"params": params})
    # A train state: it failed on a missing .get ("'TrainState' object has no attribute").
    state = TrainState(np.int32(0), params, (), params)
    with pytest.raises(ConversionError, match=r"got a TrainState, not a params tree; pass its "):
        flax_to_torch(create_model("stam_tiny"), state)


def test_flax_to_torch_dtypes_and_frozen_params():
    from flax.core import freeze

    from convert.mapping import flax_to_torch

    model = create_model("stam_tiny")
    params = random_params(TINY)
    want = flax_to_torch(model, params, np.float16)
    for dtype in ("float16", torch.float16, jnp.float16):
        got = flax_to_torch(model, params, dtype)
        assert {v.dtype for v in got.values()} == {np.dtype(np.float16)}
        chex.assert_trees_all_equal(got, want)
    assert {v.dtype.name for v in flax_to_torch(model, params, torch.bfloat16).values()} == {
        "bfloat16"
    }
    for dtype in (np.int8, torch.int8, "fp16", None):
        with pytest.raises(ConversionError, match=r"is not a dtype for weights; use one of \("):
            flax_to_torch(model, params, dtype)
    frozen = freeze(params)
    with pytest.raises(ConversionError, match=r"but params \(a FrozenDict\) cannot be changed"):
        flax_to_torch(model, frozen, consume=True)
    nested = {**params, "head": freeze(params["head"])}
    with pytest.raises(ConversionError, match=r"params\['head'\] \(a FrozenDict\) cannot be"):
        flax_to_torch(model, nested, consume=True)
    assert len(jax.tree.leaves(nested)) == len(jax.tree.leaves(params))  # nothing consumed
    chex.assert_trees_all_equal(flax_to_torch(model, frozen, torch.float16), want)


@pytest.mark.parametrize("container", ["model", "state_dict"])
def test_torch_to_flax_names_a_checkpoint_container(container):
    state_dict = randomize_(reference_from_config(TINY)).state_dict()
    with pytest.raises(
        ConversionError, match=rf"not a state dict; pass checkpoint\['{container}'\]"
    ):
        torch_to_flax({container: state_dict, "epoch": 3}, **convert_kwargs(TINY))


def test_torch_to_flax_refuses_what_is_not_a_state_dict():
    # A torch module itself (not its state_dict()) failed with "'ReferenceSTAM' object is not
    # iterable"; a list of its tensors with "'int' object has no attribute 'startswith'".
    reference = reference_from_config(TINY)
    with pytest.raises(ConversionError, match=r"a ReferenceSTAM, not a mapping .*; pass its st"):
        torch_to_flax(reference, **convert_kwargs(TINY))
    with pytest.raises(ConversionError, match=r"a list, not a mapping .*; pass the checkpoint's"):
        torch_to_flax(list(reference.state_dict().values()), **convert_kwargs(TINY))


def _pickled(obj):
    """`obj` pickled as torch.save writes it, `_Storage(key, numel)` as a FloatStorage id."""
    import io
    import pickle

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


class _Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _View:
    """A tensor of storage `_Storage` with the given offset, shape and strides, pickled as
    torch.save pickles a tensor (torch._utils._rebuild_tensor_v2)."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        from torch._utils import _rebuild_tensor_v2

        return (_rebuild_tensor_v2, (*self.args, False, {}))


def _write_pth(path, data_pkl, storages=None, byteorder=b"little"):
    """A zip-format .pth of the given pickle bytes and float32 storages (key -> values)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        if byteorder is not None:  # torch < 1.10 wrote none
            archive.writestr("archive/byteorder", byteorder)
        for key, values in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", np.asarray(values, np.float32).tobytes())
    return path


def test_tensor_views_are_read_within_their_storage_only(tmp_path):
    # Offsets, sizes and strides come from the file: a view reaching outside its storage read
    # memory beyond the archive's bytes (negative strides went unchecked).
    storage = _Storage("0", 6)
    values = {"0": np.arange(1, 7)}
    good = {
        "tail": ((4, (2,), (1,)), [5, 6]),
        "every_other": ((1, (3,), (2,)), [2, 4, 6]),
        "broadcast": ((5, (2, 2), (0, 0)), [[6, 6], [6, 6]]),
        "empty_at_end": ((6, (0, 3), (3, 1)), np.zeros((0, 3))),
    }
    path = _write_pth(
        tmp_path / "good.pth",
        _pickled({"model": {k: _View(storage, *v) for k, (v, _) in good.items()}}),
        values,
    )
    loaded = load_state_dict(path)
    for key, (_, want) in good.items():
        array = np.asarray(loaded[key])
        np.testing.assert_array_equal(array, np.asarray(want, np.float32), err_msg=key)
        # A fresh array, not a view of the archive's bytes.
        assert array.flags.writeable and array.flags.c_contiguous and array.base is None, key

    outside = {
        "one_past_the_end": (1, (6,), (1,)),
        "past_the_end_by_stride": (0, (4,), (2,)),
        "offset_past_the_end": (7, (0,), (1,)),
    }
    for key, view in outside.items():
        path = _write_pth(
            tmp_path / f"{key}.pth", _pickled({"model": {key: _View(storage, *view)}}), values
        )
        with pytest.raises(
            ConversionError,
            match=rf"{key}\.pth: tensor bytes lie outside storage archive/data/0; the file is "
            r"damaged: download it again \(and compare its size\) or re-save it\.$",
        ):
            np.asarray(load_state_dict(path)[key])
    malformed = {
        "negative_stride": (0, (4,), (-1,)),
        "far_negative_stride": (5, (3,), (-1000,)),
        "negative_offset": (-2, (2,), (1,)),
        "negative_size": (0, (-1,), (1,)),
        "sizes_and_strides_differ": (0, (2, 3), (1,)),
        "float_offset": (1.5, (2,), (1,)),
    }
    for key, view in malformed.items():
        path = _write_pth(
            tmp_path / f"{key}.pth", _pickled({"model": {key: _View(storage, *view)}}), values
        )
        with pytest.raises(ConversionError, match=r"malformed checkpoint: a tensor of offset "):
            load_state_dict(path)


def _op_str(text):
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _op_global(module, name, stacked=True):
    if stacked:  # STACK_GLOBAL, as protocol 4 writes it
        return _op_str(module) + _op_str(name) + b"\x93"
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL, as protocols 0-3 write it


def _op_call(function, *args):
    return function + b"(" + b"".join(args) + b"tR"  # MARK args TUPLE REDUCE


def test_pickles_that_would_run_code_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "code_ran"
    shell = _op_str(f"touch {marker}")
    python = _op_str(f"open({str(marker)!r}, 'w').close()")
    tensor_v2 = _op_global("torch._utils", "_rebuild_tensor_v2")  # allowed
    # getattr reaches everything from an allowed function: its module's globals hold `sys`,
    # and sys.modules holds `os`.
    getattr_ = _op_global("builtins", "getattr")

    def get(mapping, key):
        return _op_call(_op_call(getattr_, mapping, _op_str("get")), _op_str(key))

    module_sys = get(_op_call(getattr_, tensor_v2, _op_str("__globals__")), "sys")
    module_os = get(_op_call(getattr_, module_sys, _op_str("modules")), "os")
    attacks = {
        "posix.system": _op_call(_op_global("posix", "system"), shell),
        "os.system": _op_call(_op_global("os", "system", stacked=False), shell),
        "builtins.eval": _op_call(_op_global("builtins", "eval"), python),
        "builtins.exec": _op_call(_op_global("builtins", "exec", stacked=False), python),
        "builtins.print": _op_call(_op_global("builtins", "print", stacked=False), shell),
        "builtins.getattr": _op_call(
            _op_call(_op_global("builtins", "getattr"), module_os, _op_str("system")), shell
        ),
        # Allowed modules, names outside the allow-list.
        "torch.os.system": _op_call(_op_global("torch", "os.system"), shell),
        "torch._tensor._rebuild_from_type_v2": _op_call(
            _op_global("torch._tensor", "_rebuild_from_type_v2"),
            _op_global("posix", "system"),
            _op_global("builtins", "object"),
            b"(" + shell + b"t",
            b"}",
        ),
        "collections._sys": _op_call(_op_global("collections", "_sys"), b"N"),
        "torch.UntypedStorage": _op_call(_op_global("torch", "UntypedStorage"), b"K\x02"),
        # INST (protocol 0) finds its class as GLOBAL does.
        "subprocess.getoutput": b"(" + shell + b"isubprocess\ngetoutput\n",
    }
    for name, value in attacks.items():
        path = tmp_path / "attack.pth"
        _write_pth(path, b"\x80\x04}" + _op_str("model") + value + b"s.")
        with pytest.raises(UnsafeCheckpointError) as refused:
            load_state_dict(path)
        assert f"(GLOBAL {name}), so loading it could run that code" in str(refused.value), name
        assert not marker.exists(), name
    # The files are attacks: an unpickler without an allow-list runs them.
    import pickle

    pickle.loads(b"\x80\x04}" + _op_str("model") + attacks["builtins.getattr"] + b"s.")
    assert marker.exists()


def test_malformed_archives_and_storages_are_named(tmp_path):
    storage = _Storage("0", 4)
    state = {"model": {"w": _View(storage, 0, (4,), (1,))}}
    cases = {
        # The storage's bytes end before its element count (its zip entry itself intact).
        "short": (
            _write_pth(tmp_path / "short.pth", _pickled(state), {"0": [1, 2, 3]}),
            r"short\.pth: storage archive/data/0 is truncated; the file is damaged: download",
        ),
        "big_endian": (
            _write_pth(tmp_path / "big.pth", _pickled(state), {"0": [1, 2, 3, 4]}, b"big"),
            r"big\.pth was saved on a big-endian machine; re-save it on x86/ARM\.",
        ),
    }
    # A persistent id that is not a storage, and a storage of a type that is none.
    not_a_storage = _pickled(state).replace(
        b"X\x07\x00\x00\x00storage", b"X\x07\x00\x00\x00archive"
    )
    cases["persistent_id"] = (
        _write_pth(tmp_path / "pid.pth", not_a_storage, {"0": [1, 2, 3, 4]}),
        r"pid\.pth: malformed checkpoint: unknown persistent id \('archive', ",
    )
    no_type = _pickled(state).replace(b"ctorch\nFloatStorage\n", b"ccollections\nOrderedDict\n")
    cases["storage_type"] = (
        _write_pth(tmp_path / "type.pth", no_type, {"0": [1, 2, 3, 4]}),
        r"type\.pth: malformed checkpoint: storage type <class 'collections\.OrderedDict'>; the "
        r"file is damaged: download it again",
    )
    for name, (path, message) in cases.items():
        with pytest.raises(ConversionError, match=message) as info:
            np.asarray(load_state_dict(path)["w"])
        assert type(info.value) is ConversionError, name  # damaged, not refused as unsafe
    # Two checkpoints' folders zipped together: which one is meant is not guessed.
    both = tmp_path / "both.zip"
    with zipfile.ZipFile(both, "w") as archive:
        for folder in ("a", "b"):
            archive.writestr(f"{folder}/data.pkl", _pickled(state))
            archive.writestr(f"{folder}/data/0", np.zeros(4, np.float32).tobytes())
    with pytest.raises(ConversionError, match=r"no single data\.pkl inside; it holds a/data\.pkl"):
        load_state_dict(both)
    # An empty dict is no state dict (not one of no tensors).
    torch.save({}, tmp_path / "empty_dict.pth")
    with pytest.raises(ConversionError, match=r"holds no state dict: .* found top-level keys \[\]"):
        load_state_dict(tmp_path / "empty_dict.pth")


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
)
def test_a_tensor_that_is_not_float_is_named_with_its_dtype(dtype, tmp_path):
    path = tmp_path / "ints.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, dtype=dtype)}}, path)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(
        ConversionError, match=rf"'head\.weight' has dtype {name}; expected float32"
    ):
        load_state_dict(path)


def test_legacy_format_half_precision_tensors_keep_their_dtype(tmp_path):
    tensors = {
        "bfloat": torch.randn(3, 2).bfloat16(),
        "half": torch.randn(5).half(),
        "float": torch.randn(2, 2).t(),
    }
    path = tmp_path / "legacy.pth"
    torch.save({"model": tensors}, path, _use_new_zipfile_serialization=False)
    loaded = load_state_dict(path)
    assert loaded["bfloat"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        loaded["bfloat"].astype(np.float32), tensors["bfloat"].float().numpy()
    )
    for key in ("half", "float"):
        assert loaded[key].dtype == tensors[key].numpy().dtype, key
        np.testing.assert_array_equal(loaded[key], tensors[key].numpy(), err_msg=key)


def test_cli_force_replaces_the_output_and_flags_reach_the_conversion(
    official_pth, tmp_path, capsys
):
    first, _ = official_pth(TINY, seed=1, name="first.pth")
    pth, _ = official_pth(TINY)
    out, back = tmp_path / "ckpt", tmp_path / "back.pth"
    assert convert_main([str(first), str(out), *cli_args(TINY)]) == 0
    assert to_torch_main([str(out), str(back)]) == 0
    assert_state_dicts_identical(load_official(first), load_official(back))
    # --force writes what was asked for in place of what was there.
    assert convert_main([str(pth), str(out), "--force", *cli_args(TINY)]) == 0
    assert checkpoints.read_config(out)["metadata"]["source"] == "official.pth"
    assert checkpoints.read_config(out)["model"] == TINY  # its head counts as given
    assert to_torch_main([str(out), str(back), "--force"]) == 0
    assert_state_dicts_identical(load_official(pth), load_official(back))
    assert to_torch_main([str(out), str(tmp_path / "half.pth"), "--dtype", "float16"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'half.pth'} (float16)"
    half, original = load_official(tmp_path / "half.pth"), load_official(pth)
    assert all(torch.equal(half[k], original[k].half()) for k in original)
    # A dangling link is a file already there: replaced only with --force.
    link = tmp_path / "link.pth"
    link.symlink_to(tmp_path / "nowhere")
    assert to_torch_main([str(out), str(link)]) == 2
    assert "link.pth already exists; choose another name or pass --force" in capsys.readouterr().err
    assert link.is_symlink() and not link.exists()
    # A mean-aggregate model's frame count is given on the command line.
    mean = TINY_CONFIGS["mean"]
    mean_pth, _ = official_pth(mean, name="mean.pth")
    assert convert_main([str(mean_pth), str(tmp_path / "mean"), *cli_args(mean)]) == 0
    assert checkpoints.read_config(tmp_path / "mean")["model"] == mean
    # A .pth name is refused whatever its case.
    assert convert_main([str(pth), str(tmp_path / "STAM.PT"), *cli_args(TINY)]) == 2
    assert "STAM.PT names a PyTorch file" in capsys.readouterr().err


def test_a_pickle_cannot_alter_the_reader_for_the_files_after_it(official_pth, tmp_path):
    from convert import torch_io

    # BUILD sets attributes on the object below it: here the allowed tensor rebuilder, whose
    # defaults it replaced for the rest of the process, and OrderedDict, which refuses.
    defaults = b"N}" + _op_str("__defaults__") + b")s\x86b"  # (None, {'__defaults__': ()})
    for name, target in {
        "rebuilder": _op_global("torch._utils", "_rebuild_tensor_v2"),
        "parameter": _op_global("torch._utils", "_rebuild_parameter", stacked=False),
        "ordered_dict": _op_global("collections", "OrderedDict"),
    }.items():
        path = _write_pth(
            tmp_path / f"{name}.pth", b"\x80\x04}" + _op_str("model") + target + defaults + b"s."
        )
        with pytest.raises(ConversionError):
            load_state_dict(path)
    assert torch_io._rebuild_tensor.__defaults__ == (False, None, None)
    assert torch_io._rebuild_parameter.__defaults__ == (False, None, None)
    # Files read after them read as before.
    pth, _ = official_pth(TINY)
    loaded = load_state_dict(pth)
    original = load_official(pth)
    assert all(np.array_equal(np.asarray(loaded[k]), original[k].numpy()) for k in original)


def test_zero_size_tensors_read_and_bool_sizes_are_refused(tmp_path):
    # torch gives a (3, 0) tensor strides (1, 1) and a (2, 0, 4) one (4, 4, 1): their last
    # element would lie past an empty storage, but they have none to read.
    tensors = {"a": torch.empty(3, 0), "b": torch.zeros(2, 0, 4), "c": torch.ones(2)}
    torch.save({"model": tensors}, tmp_path / "empty.pth")
    loaded = load_state_dict(tmp_path / "empty.pth")
    for key, tensor in tensors.items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), tensor.numpy(), err_msg=key)
        assert np.asarray(loaded[key]).shape == tuple(tensor.shape), key
    # A bool is no size, though Python takes True for 1.
    path = _write_pth(
        tmp_path / "bool.pth",
        _pickled({"model": {"w": _View(_Storage("0", 2), 0, (True,), (1,))}}),
        {"0": [1, 2]},
    )
    with pytest.raises(ConversionError, match=r"malformed checkpoint: a tensor of offset 0, sizes"):
        load_state_dict(path)


def test_params_of_mixed_dtypes_are_written_in_one_dtype(official_pth, tmp_path, capsys):
    # A .pth of bfloat16 and float32 tensors has no one dtype to give back: it is written back
    # in float32, which holds both exactly, and the command says so.
    def mix(sd):
        sd.update({k: v.bfloat16() for k, v in sd.items() if k.startswith("blocks.")})

    pth, _ = official_pth(TINY, edit=mix)
    convert_checkpoint(pth, tmp_path / "ckpt", **convert_kwargs(TINY))
    metadata = checkpoints.read_config(tmp_path / "ckpt")["metadata"]
    assert metadata["source_dtypes"] == ["bfloat16", "float32"]
    back = tmp_path / "back.pth"
    assert to_torch_main([str(tmp_path / "ckpt"), str(back)]) == 0
    assert capsys.readouterr().out == f"wrote {back} (float32)\n"
    original, written = load_official(pth), load_official(back)
    assert {k: v.dtype for k, v in written.items()} == dict.fromkeys(original, torch.float32)
    assert all(torch.equal(written[k], original[k].float()) for k in original)

    # Params held in mixed dtypes (saved from Python): float32 by default, else the one asked.
    params = jax.tree.map(np.asarray, random_params(TINY))
    params["head"] = jax.tree.map(lambda v: v.astype(ml_dtypes.bfloat16), params["head"])
    checkpoints.save(tmp_path / "mixed", create_model("stam_tiny"), params)
    expected = {
        "head.weight": np.array(params["head"]["kernel"], np.float32).T,
        "head.bias": np.array(params["head"]["bias"], np.float32),
        "norm.weight": np.array(params["norm"]["scale"], np.float32),
    }
    for dtype, torch_dtype in [(None, torch.float32), ("bfloat16", torch.bfloat16)]:
        out = tmp_path / f"{dtype}.pth"
        path, used, _ = export_checkpoint(tmp_path / "mixed", out, dtype=dtype)
        assert (path, used) == (out, str(torch_dtype).removeprefix("torch."))
        written = load_official(out)
        assert {v.dtype for v in written.values()} == {torch_dtype}
        for key, want in expected.items():
            want = torch.from_numpy(np.ascontiguousarray(want)).to(torch_dtype)
            assert torch.equal(written[key], want), (dtype, key)
    # A dtype the .pth is not written in (float64 would be read back refused) names them.
    with pytest.raises(ConversionError) as info:
        export_checkpoint(tmp_path / "mixed", tmp_path / "f64.pth", dtype="float64")
    assert str(info.value) == "dtype='float64' is not one of ('float32', 'float16', 'bfloat16')."
    assert not (tmp_path / "f64.pth").exists()


def test_the_vit_head_count_note_appears_when_it_is_not_width_over_64():
    from convert.core import official_notes

    def heads_note(width, heads):
        model = {"hidden_size": width, "num_heads": heads, "temporal_heads": 8, "num_frames": 16}
        return official_notes(model)

    # Width 96 has no width/64 head count: whatever the heads, python -m convert needs them.
    for heads in (1, 2, 3, 12):
        assert heads_note(96, heads) == [
            "note: the .pth does not store the ViT head count; read it back with: python -m "
            f"convert FILE.pth OUT_DIR --num-heads {heads}"
        ]
    assert heads_note(128, 2) == []  # width/64: what python -m convert infers
    assert heads_note(128, 4)[0].endswith("OUT_DIR --num-heads 4")
    assert heads_note(768, 12) == []
    assert heads_note(768, 11)[0].endswith("OUT_DIR --num-heads 11")
    assert heads_note(64, 1) == []


def test_legacy_format_parameters_read_as_their_tensors(official_pth, tmp_path):
    # A legacy file saved from named_parameters() holds torch.nn.Parameter values (which
    # require grad): they are read as the same values as plain tensors, in their dtype.
    tensors = {
        "weight": torch.randn(3, 2).t(),
        "bias": torch.randn(4),
        "half": torch.randn(5).half(),
        "bfloat": torch.randn(2, 3).bfloat16(),
    }
    parameters = {k: torch.nn.Parameter(v) for k, v in tensors.items()}
    for name, values in {"plain": tensors, "parameters": parameters}.items():
        torch.save(
            {"model": values}, tmp_path / f"{name}.pth", _use_new_zipfile_serialization=False
        )
    plain = load_state_dict(tmp_path / "plain.pth")
    loaded = load_state_dict(tmp_path / "parameters.pth")
    assert list(loaded) == list(tensors)
    for key, tensor in tensors.items():
        assert type(loaded[key]) is np.ndarray and loaded[key].dtype == plain[key].dtype, key
        assert loaded[key].shape == tuple(tensor.shape), key
        np.testing.assert_array_equal(
            loaded[key].astype(np.float32), tensor.float().numpy(), err_msg=key
        )
    # A whole checkpoint of Parameters converts to the params of its plain-tensor original.
    pth, _ = official_pth(TINY)
    legacy = tmp_path / "legacy_parameters.pth"
    sd = {k: torch.nn.Parameter(v) for k, v in load_official(pth).items()}
    torch.save({"model": sd}, legacy, _use_new_zipfile_serialization=False)
    convert_checkpoint(pth, tmp_path / "a", **convert_kwargs(TINY))
    convert_checkpoint(legacy, tmp_path / "b", **convert_kwargs(TINY))
    chex.assert_trees_all_equal(
        checkpoints.load(tmp_path / "a")[1], checkpoints.load(tmp_path / "b")[1]
    )


def test_cli_streams_and_exit_statuses(official_pth, tmp_path, capsys, monkeypatch):
    # Results go to stdout; warnings, notes and errors to stderr, an error as one line.
    pth, _ = official_pth(TINY)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back.pth"
    assert convert_main([str(pth), str(ckpt), *cli_args(TINY)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    model_line, wrote_line = out.splitlines()
    name, config = model_line.split(" ", 2)[1:]
    config = ast.literal_eval(config)  # the architecture read from the weights and flags
    assert name == "stam_tiny" and config == {k: TINY[k] for k in config}, model_line
    assert len(config) == 13 and config["num_heads"] == 2 and config["temporal_heads"] == 4
    metadata = checkpoints.read_config(ckpt)["metadata"]
    assert metadata["source"] == "official.pth"
    assert metadata["source_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert re.fullmatch(rf"wrote {re.escape(str(ckpt))} in \d+\.\ds", wrote_line), out
    assert to_torch_main([str(ckpt), str(back)]) == 0
    out, err = capsys.readouterr()
    assert out == f"wrote {back} (float32)\n"
    assert err == (
        "note: the .pth does not store the ViT head count or the temporal head count; read it "
        "back with: python -m convert FILE.pth OUT_DIR --num-heads 2 --temporal-heads 4\n"
    )

    # A model of no registered variant is named custom.
    odd, _ = official_pth(TINY_CONFIGS["odd_sizes"], name="odd.pth")
    assert (
        convert_main([str(odd), str(tmp_path / "odd"), *cli_args(TINY_CONFIGS["odd_sizes"])]) == 0
    )
    assert capsys.readouterr().out.startswith("model: custom {")

    # Refused: exit 2, nothing on stdout, one error line naming the file.
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil)
    absent = tmp_path / "absent.pth"
    for args, message in [
        ([str(evil), str(tmp_path / "a")], f"error: {evil} was refused: its pickle calls code"),
        ([str(absent), str(tmp_path / "b")], f"error: {absent}: no such file."),
    ]:
        assert convert_main(args) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith(message), err
    assert to_torch_main([str(tmp_path / "absent"), str(tmp_path / "x.pth")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "x.pth").exists()
    # A write that fails over an existing file (--force) keeps that file as it was.
    before = back.read_bytes()

    def fail_midway(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:1] . strerror: No space left")

    monkeypatch.setattr(torch, "save", fail_midway)
    assert to_torch_main([str(ckpt), str(back), "--force"]) == 2
    assert capsys.readouterr() == ("", f"error: cannot write {back}: No space left\n")
    assert back.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("back")) == ["back.pth"]
    monkeypatch.undo()

    # A bad command line: one error line naming the argument, exit 2 (no usage block).
    bad = {
        (convert_main, str(pth), str(tmp_path / "c"), "--num-heads", "two"): (
            r"error: argument --num-heads: invalid int value: 'two'\n"
        ),
        (convert_main, str(pth)): r"error: the following arguments are required: out_dir\n",
        # (Python 3.12 quotes the choices, 3.13 does not.)
        (to_torch_main, str(ckpt), str(tmp_path / "d.pth"), "--dtype", "float64"): (
            r"error: argument --dtype: invalid choice: 'float64' \(choose from "
            r"'?float32'?, '?float16'?, '?bfloat16'?\)\n"
        ),
    }
    from convert.selfcheck import main as selfcheck_main

    bad[(selfcheck_main, "--model", "stam_17")] = r"error: argument --model: invalid choice: .*\n"
    bad[(selfcheck_main, "--batch", "0")] = (
        r"error: argument --batch: 0 videos; compare at least 1\.\n"
    )
    for (main, *args), message in bad.items():
        with pytest.raises(SystemExit) as end:
            main(args)
        assert end.value.code == 2
        out, err = capsys.readouterr()
        assert out == "" and re.fullmatch(message, err), err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d.pth").exists()


def test_selfcheck_reruns_in_its_workdir_and_touches_no_other_file(tmp_path, capsys):
    from convert.selfcheck import main as selfcheck_main

    # A second run in the same folder stopped with a CheckpointError traceback (its checkpoint
    # already there), and the random weights were saved as stam_16.pth: the real one, in a
    # folder of checkpoints, would have been overwritten.
    # A folder reached by a link, and what a stopped run left beside its outputs, are taken.
    workdir = tmp_path / "check"
    (tmp_path / "link").symlink_to(workdir, target_is_directory=True)
    for folder in (workdir, tmp_path / "link"):
        assert (
            selfcheck_main(["--model", "stam_tiny", "--batch", "1", "--workdir", str(folder)]) == 0
        )
        out = capsys.readouterr().out
        assert "-> OK" in out and out.endswith("all checks passed\n")
        (workdir / "selfcheck_stam_tiny_roundtrip.pth.partial").write_bytes(b"")
    (workdir / "selfcheck_stam_tiny_roundtrip.pth.partial").unlink()
    assert sorted(p.name for p in workdir.iterdir()) == [
        "selfcheck_stam_tiny_ckpt",
        "selfcheck_stam_tiny_random.pth",
        "selfcheck_stam_tiny_roundtrip.pth",
    ]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "stam_16.pth").write_bytes(b"the real weights")
    with pytest.raises(SystemExit) as end:
        selfcheck_main(["--model", "stam_tiny", "--workdir", str(downloads)])
    assert end.value.code == 2
    assert (
        f"error: --workdir {downloads} holds files this selfcheck did not write (stam_16.pth); "
        "give a new or empty folder (nothing was written). An older stam-jax's selfcheck named "
        "its files <model>.pth, ckpt and <model>.roundtrip.pth: delete those if they are its."
        in capsys.readouterr().err
    )
    assert [p.name for p in downloads.iterdir()] == ["stam_16.pth"]
    assert (downloads / "stam_16.pth").read_bytes() == b"the real weights"


def test_archive_layouts_and_damaged_pickles_are_read_or_named(tmp_path):
    storage = _Storage("0", 2)
    state = {"model": {"w": _View(storage, 0, (2,), (1,))}}
    # An archive without a byteorder entry, as PyTorch before 1.10 wrote it, is little-endian.
    old = _write_pth(tmp_path / "old.pth", _pickled(state), {"0": [1, 2]}, byteorder=None)
    np.testing.assert_array_equal(np.asarray(load_state_dict(old)["w"]), [1, 2])

    # A storage id of other than torch.save's five fields.
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", 2) if isinstance(obj, _Storage) else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(state)
    short_id = _write_pth(tmp_path / "short_id.pth", buffer.getvalue(), {"0": [1, 2]})
    message = load_refusal(short_id)
    assert message.startswith(f"{short_id}: malformed checkpoint: unknown persistent id (")
    assert message.endswith(
        ", '0', 2); the file is damaged: download it again (and compare its size) or re-save it."
    ), message
    # A zip of other files lists the first five of them and how many more.
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        for name in "abcdefg":
            archive.writestr(f"{name}.txt", "x")
    with pytest.raises(
        ConversionError,
        match=r"it holds a\.txt, b\.txt, c\.txt, d\.txt, e\.txt "
        r"and 2 more\); python -m convert reads",
    ):
        load_state_dict(other)
    five = tmp_path / "five.zip"
    with zipfile.ZipFile(five, "w") as archive:
        for name in "abcde":
            archive.writestr(f"{name}.txt", "x")
    with pytest.raises(
        ConversionError, match=r"it holds a\.txt, b\.txt, c\.txt, d\.txt, e\.txt\);"
    ):
        load_state_dict(five)
    # Pickles that are not one, in each format: named with the file's size and the reason.
    garbage = _write_pth(tmp_path / "garbage.pth", b"garbage", {"0": [1, 2]})
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(b"\x80\x02garbage-not-a-pickle" * 3)
    # For a legacy file the reason is torch's where it gives one (torch 2.4 and 2.6: "Unsupported
    # operand 103"; newer releases give none, and the message says so itself).
    for path, details in [
        (garbage, ["pickle data was truncated"]),
        (legacy, ["unrecognised pickle content", "Unsupported operand 103"]),
    ]:
        size = path.stat().st_size
        assert load_refusal(path) in [
            f"{path} is not a PyTorch checkpoint ({size} bytes): {detail}." for detail in details
        ]
    # One cut short: it may be a truncated download.
    cut = _write_pth(tmp_path / "cut.pth", _pickled(state)[:20], {"0": [1, 2]})
    assert load_refusal(cut) == (
        f"{cut} could not be read as a PyTorch checkpoint ({cut.stat().st_size} bytes; EOFError: "
        "Ran out of input). It may be truncated or corrupt, or not a .pth at all: download it "
        "again and compare its size."
    )
    # An error without a message (a legacy file cut short) is named once, by its type.
    legacy_cut = tmp_path / "legacy_cut.pth"
    torch.save(
        {"model": {"w": torch.ones(2)}},
        tmp_path / "legacy_whole.pth",
        _use_new_zipfile_serialization=False,
    )
    legacy_cut.write_bytes((tmp_path / "legacy_whole.pth").read_bytes()[:40])
    assert load_refusal(legacy_cut) == (
        f"{legacy_cut} could not be read as a PyTorch checkpoint (40 bytes; EOFError). It may be "
        "truncated or corrupt, or not a .pth at all: download it again and compare its size."
    )
