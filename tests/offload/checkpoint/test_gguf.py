"""GGUF files as llama.cpp writes them (tests/gguf_checkpoints.py), read as checkpoints: every family offload maps
gives transformers' tokens on the file's dequantized weights, every ggml type offload reads decodes as ggml-org's own
reference does, and bad files fail in one line naming the file, tensor and type before anything is loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import offload
from offload.checkpoint.plan import plan_checkpoint
from offload.errors import CheckpointError, UnsupportedModelError
from offload.experts.formats.ggml import GGML_TYPES, ggml_type
from offload.experts.layouts import SlotUnion
from tests.gguf_checkpoints import experts_as, random_blocks, write_gguf, write_gguf_and_oracle
from tests.native import assert_native_close_to_exact
from tests.offload.checkpoint.test_families_2026 import _make, _reference
from tests.offload.model.test_forward import _min_gap, _prompts

NEW_TOKENS = 8
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "deepseek_v2", "glm4_moe")
# Qwen2-MoE in GGUF has no dense layers (llama.cpp's qwen2moe has no ffn_gate); gpt-oss's MXFP4 needs 32-wide rows,
# and llama.cpp stores no layer types for it: every other layer slides, from the first, as gpt-oss's release does
CHANGES = {"qwen2_moe": {"mlp_only_layers": []},
           "gpt_oss": {"intermediate_size": 32,
                       "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}}
# K-quants and IQ4_XS need rows of 256: a wider tiny model
WIDE = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=2, head_dim=64)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-src")
    return lambda family, wide=False: _source(root, family, wide)


def _source(root: Path, family: str, wide: bool) -> Path:
    out = root / f"{family}{'-wide' if wide else ''}"
    if not out.exists():
        _make(family, out, **{**CHANGES.get(family, {}), **(WIDE if wide else {})})
    return out


def _check(path: Path, oracle: Path, tiers=(("100%", "disk"),), batches=(1, 3)) -> None:
    for batch in batches:
        ids, mask = _prompts(batch)
        tokens, scores, logits = _reference(oracle, ids, mask)
        assert _min_gap(scores, tokens) > 1e-3  # "same tokens" means something only with separated logits
        for budget, tier in tiers:
            model = offload.from_pretrained(path, device="cpu", dtype="float32", expert_budget=budget, offload_to=tier,
                                            quant_activations="float32")  # exact: Q8_0/Q4_0 slots dequantized
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2, pad_token_id=0)
            assert torch.equal(out, tokens), (budget, tier, batch)
            real = mask.bool()
            # float32 on both sides from the same dequantized values: only the order of summation differs
            torch.testing.assert_close(model(ids, attention_mask=mask)[real], logits[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_in_f32_gives_transformers_tokens(family, sources, tmp_path):
    """llama.cpp's conventions undone: Mixtral's permuted q/k, MLA's split kv_b (DeepSeek-V3; V2 keeps kv_b),
    gpt-oss's split gate/up and sinks, GLM's partial rotary, stacked experts, tied or untied embeddings."""
    path, oracle = write_gguf_and_oracle(sources(family), tmp_path, family, split_kv_b=family != "deepseek_v2")
    _check(path, oracle, tiers=((1, "disk"), ("25%", "ram")), batches=(3,))


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4", "IQ4_NL", "Q4_K",
                                  "Q5_K", "Q6_K", "IQ4_XS"])
def test_every_expert_type_computes_what_transformers_does_on_its_dequantized_weights(kind, sources, tmp_path):
    """Experts in ``kind`` (dense matrices Q8_0): the tiers keep the file's blocks, a slot holds them dequantized."""
    path, oracle = write_gguf_and_oracle(sources("qwen3_moe", wide=True), tmp_path, "qwen3_moe",
                                         types=experts_as(kind, "Q8_0"))
    assert plan_checkpoint(path).expert_format.name == f"gguf (gate {kind}, up {kind}, down {kind})"
    _check(path, oracle, tiers=((1, "disk"), ("50%", "ram")), batches=(3,))


def _down_q6_k_in_layer_0(name: str, array) -> str:
    """Q4_K_M's kind of mix: experts Q4_K, but the first layer's down projections Q6_K; dense matrices Q8_0."""
    if "ffn_down_exps" in name and name.startswith("blk.0."):
        return "Q6_K"
    return "Q4_K" if "_exps." in name else "Q8_0"


# case -> (family, wide, types): every type with a kernel, a Q4_K_M-like mix, and gpt-oss's MXFP4 experts with biases
NATIVE_CASES = {kind: ("qwen3_moe", True, experts_as(kind, "Q8_0")) for kind in ("Q8_0", "Q4_0", "Q4_K", "Q6_K",
                                                                                   "MXFP4")}
NATIVE_CASES["Q4_K + Q6_K"] = ("qwen3_moe", True, _down_q6_k_in_layer_0)
NATIVE_CASES["MXFP4 gpt-oss"] = ("gpt_oss", False, experts_as("MXFP4", "F32"))
# the same with its expert biases in F16 (a disk miss then casts them into the slot's float32 biases)
NATIVE_CASES["MXFP4 gpt-oss, F16 biases"] = ("gpt_oss", False, lambda name, a: "F16" if name.endswith(".bias") else
                                             experts_as("MXFP4", "F32")(name, a))


@pytest.mark.parametrize("case", NATIVE_CASES)
def test_native_types_compute_from_the_files_blocks(case, sources, tmp_path):
    """With int8 activations (the default) Q8_0 / Q4_0 / Q4_K / Q6_K / MXFP4 experts stay in the file's blocks from
    disk to slot (a slot is the blocks' bytes, not a dequantized matrix; layers of different types share slots sized
    for the largest, and a disk miss still reads straight into the slot) and compute with the block kernels. Against the
    exact path (float32 activations, dequantized slots) as tests/native.py states."""
    family, wide, types = NATIVE_CASES[case]
    path, oracle = write_gguf_and_oracle(sources(family, wide=wide), tmp_path, family, types=types,
                                         typed_biases="biases" in case)
    if "biases" in case:  # the exact path still gives transformers' tokens on the dequantized (f16-rounded) values
        _check(path, oracle, tiers=((1, "disk"), ("50%", "ram")), batches=(3,))
    exact = offload.from_pretrained(path, device="cpu", dtype="float32", quant_activations="float32")
    native = offload.from_pretrained(path, device="cpu", dtype="float32")
    inter, hidden = native.spec.expert_intermediate_size, native.spec.hidden_size
    layers = native.plan.expert_format.layers
    largest = max(sum(out * ggml_type(t).row_nbytes(inn) for t, (out, inn) in
                      zip(types, ((inter, hidden), (inter, hidden), (hidden, inter)), strict=True))
                  for _, types in layers)
    slot = native.cache.mover.slot_layout  # (a slot's memory may be larger: a disk read's 4 KiB-aligned span)
    assert largest <= slot.nbytes < 3 * inter * hidden * 2 and native.cache.slot_nbytes >= slot.nbytes  # not float
    assert isinstance(native.cache.mover.slot_layout, SlotUnion) == (len({t for _, t in layers}) > 1)
    assert native.cache.mover.direct == ("biases" not in case)  # disk reads land in the slot unless cast
    for exact_mode in (exact, offload.from_pretrained(path, device="cpu", dtype="float32", quant_activations="int16")):
        assert exact_mode.cache.slot_nbytes >= 3 * inter * hidden * 4  # no block kernel: dequantized float32 slots
    assert_native_close_to_exact(path, native, exact, [layer for layer, _ in layers], dtype="float32")


def test_layers_of_different_types_and_a_tied_embedding(sources, tmp_path):
    """A K-quant mix (down projections Q6_K in one layer, Q4_K in the other; attention Q5_K; embeddings tied):
    each layer's experts are read in their own type, by both tiers."""
    def types(name, array):
        if "ffn_down_exps" in name:
            return "Q6_K" if name.startswith("blk.0.") else "Q4_K"
        return "Q4_K" if "_exps." in name else "Q5_K"

    src = _make("mixtral", tmp_path / "src", hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                tie_word_embeddings=True)
    path, oracle = write_gguf_and_oracle(src, tmp_path, "mixtral", types=types)
    plan = plan_checkpoint(path)
    assert plan.spec.tie_word_embeddings and "output.weight" not in gguf.GGUFReader(path).fields
    assert plan.expert_format.name == "gguf (gate Q4_K, up Q4_K, down Q6_K x1 / Q4_K x1)"
    _check(path, oracle, tiers=((1, "disk"), ("50%", "ram")), batches=(3,))


@pytest.mark.parametrize("kind", sorted(GGML_TYPES))
def test_the_type_table_decodes_as_ggml_org_does(kind):
    row, rng = GGML_TYPES[kind], np.random.default_rng(0)
    cols = row.block_size * 2 if row.quantized else 64
    if row.quantized and kind in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"):
        raw = random_blocks(kind, 3, cols, rng)
    elif row.quantized:
        raw = gguf.quants.quantize(rng.standard_normal((3, cols)).astype(np.float32), gguf.GGMLQuantizationType[kind])
    else:
        raw = rng.standard_normal((3, cols)).astype(np.float32).astype(np.float16 if kind == "F16" else np.float32)
        raw = raw.view(np.uint8) if kind != "BF16" else gguf.quants.quantize(raw, gguf.GGMLQuantizationType.BF16)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(3, cols)
    got = row.dequantize(torch.from_numpy(np.ascontiguousarray(raw)).view(torch.uint8), (3, cols))
    np.testing.assert_array_equal(got.numpy(), want)


def test_a_split_set_a_folder_and_any_part_resolve_to_one_checkpoint(sources, tmp_path):
    src = sources("olmoe")
    out = tmp_path / "split"
    out.mkdir()
    state = write_gguf(src, out / "olmoe.gguf", "olmoe", split_max_tensors=12)
    parts = sorted(out.glob("*.gguf"))
    assert len(parts) > 2 and parts[0].name.endswith("-00001-of-" + f"{len(parts):05d}.gguf")
    for given in (out, parts[-1], parts[0]):
        assert plan_checkpoint(given).path == parts[0]
    from tests.quant_checkpoints import write_dequantized
    _check(parts[0], write_dequantized(src, tmp_path / "deq", state), batches=(3,))
    parts[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing part.*{parts[1].name}"):
        plan_checkpoint(parts[0])


# -- bad files: one line naming the file, the tensor and the type, before anything is loaded --------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory, sources):
    out = tmp_path_factory.mktemp("good") / "m.gguf"
    write_gguf(sources("olmoe"), out, "olmoe", types=experts_as("Q8_0"))
    return out


def test_a_truncated_file(good, tmp_path):
    bad = tmp_path / "cut.gguf"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf is truncated: tensor '.*' \(.*\) ends at byte"):
        plan_checkpoint(bad)
    bad.write_bytes(data[:100])  # inside the header
    with pytest.raises(CheckpointError, match=r"cut\.gguf is not a readable GGUF file"):
        plan_checkpoint(bad)


def test_an_offset_beyond_the_end(good, tmp_path):
    reader = gguf.GGUFReader(good)
    last = reader.tensors[-1]
    bad = tmp_path / "far.gguf"
    shutil.copy(good, bad)
    data = np.memmap(bad, mode="r+")
    where = last.field.offset + sum(int(p.nbytes) for p in last.field.parts[:-1])  # the tensor's offset field
    data[where:where + 8] = np.array([2**40], dtype=np.uint64).view(np.uint8)
    data.flush()
    del data
    with pytest.raises(CheckpointError, match=f"far.gguf is truncated: tensor '{last.name}'"):
        plan_checkpoint(bad)


def test_an_unknown_architecture_and_an_unsupported_type(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "a.gguf", "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedModelError, match="unknown GGUF architecture in a.gguf 'mamba'.*qwen3moe"):
        plan_checkpoint(tmp_path / "a.gguf")
    w = gguf.GGUFWriter(tmp_path / "b.gguf", "qwen3moe")
    size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ2_XXS][1]
    w.add_tensor("blk.0.ffn_down_exps.weight", np.zeros((4, size), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedModelError, match=r"b.gguf: tensor 'blk.0.ffn_down_exps.weight' is stored as "
                                                    r"IQ2_XXS.*offload reads F32, F16"):
        plan_checkpoint(tmp_path / "b.gguf")


def test_an_expert_bias_in_a_block_type_is_refused_by_name(sources, tmp_path):
    """llama.cpp never quantizes a bias; a file that does (gpt-oss's expert biases in MXFP4) fails by tensor and type
    rather than having its bias bytes read as float32."""
    path = tmp_path / "b.gguf"
    write_gguf(sources("gpt_oss"), path, "gpt_oss", types=experts_as("MXFP4"), typed_biases=True)
    with pytest.raises(UnsupportedModelError, match=r"b.gguf: expert bias 'blk.0.ffn_\w+_exps.bias' is stored as "
                                                    r"MXFP4.*F32, F16 or BF16"):
        plan_checkpoint(path)


def test_a_missing_tensor_is_named_as_the_file_would_hold_it(sources, tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(sources("qwen3_moe"), path, "qwen3_moe", types=lambda name, a: "F32")
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(tmp_path / "less.gguf", "qwen3moe")
    for name, field in reader.fields.items():
        if not name.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(name, field.contents(), field.types[0],
                            sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name != "blk.1.attn_k_norm.weight":
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match=r"less.gguf: tensor 'blk.1.attn_k_norm.weight' is missing"):
        plan_checkpoint(tmp_path / "less.gguf")


def test_a_miss_is_one_read_per_stacked_tensor_of_the_files_own_bytes(sources, tmp_path):
    """An expert is slice e of each stacked tensor: the disk tier reads exactly those bytes, one read each (O_DIRECT
    widens each to 4 KiB alignment), and the RAM tier holds the same blocks."""
    from offload.checkpoint.tensors import read_runs
    from offload.memory.transfer import DirectReader, DiskExpertStore, RamExpertStore, aligned_empty

    path = tmp_path / "m.gguf"
    write_gguf(sources("qwen3_moe", wide=True), path, "qwen3_moe", types=experts_as("Q4_K"))
    plan = plan_checkpoint(path)
    store = DiskExpertStore(plan.experts, DirectReader(), plan.source_layout)
    per_expert = 3 * 256 * 256 // 256 * 144  # three 256x256 matrices of Q4_K: 144 bytes per 256 weights
    for infos in plan.experts.values():
        runs = read_runs(infos)
        assert len(runs) == 3 and sum(r.end - r.start for r in runs) == per_expert == sum(i.nbytes for i in infos)
    assert plan.reads_per_expert() == 3  # what the performance model charges a disk miss of this file
    ram = RamExpertStore(store, list(plan.experts), plan.host_layout(torch.float32, torch.device("cpu"),
                                                                      torch.float32), pin=False)
    scratch = aligned_empty(store.raw_nbytes)
    for key in list(plan.experts)[:4]:
        disk_buf, disk_layout = store.fetch(key, scratch)
        ram_buf, ram_layout = ram.fetch(key, None)
        for a, b in zip(disk_layout.parts, ram_layout.parts, strict=True):
            assert torch.equal(a.view(disk_buf), b.view(ram_buf))
