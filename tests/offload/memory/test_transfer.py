"""Disk reads: every I/O mode returns the checkpoint's exact bytes; experts land in aligned slots."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import offload
from offload.memory.transfer import ALIGN, DirectReader, DiskExpertStore, aligned_empty


@pytest.mark.parametrize("mode", ["auto", "fadvise", "plain"])
def test_disk_store_reads_exact_expert_bytes(tiny_dir, mode):
    plan = offload.plan_checkpoint(tiny_dir("qwen2_moe", sharded=True))
    store = DiskExpertStore(plan.experts, DirectReader(mode), plan.source_layout)
    scratch = aligned_empty(store.raw_nbytes)
    assert scratch.data_ptr() % ALIGN == 0
    for key, infos in list(plan.experts.items())[:6]:
        buf, layout = store.fetch(key, scratch)
        expert = layout.bind(buf)
        for view, info in zip((expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight), infos):
            with safe_open(str(info.path), "pt") as f:
                assert torch.equal(view, f.get_tensor(info.name))


def test_direct_io_is_used_where_the_filesystem_allows(tiny_dir):
    plan = offload.plan_checkpoint(tiny_dir("mixtral"))
    reader = DirectReader()
    mode = reader.mode_of(plan.path / "model.safetensors")
    assert mode in ("direct", "fadvise")  # never the plain fallback on Linux


@pytest.mark.gpu
@pytest.mark.parametrize("offload_to", ["disk", "ram"])
def test_cuda_path_matches_cpu(tiny_dir, offload_to):
    """Pinned staging, copy stream and events give the same tokens as the CPU path."""
    path = tiny_dir("mixtral")
    prompt = torch.tensor([[5, 17, 33, 60, 8]])
    cpu = offload.from_pretrained(path, device="cpu").generate(prompt, max_new_tokens=10)
    gpu = offload.from_pretrained(path, device="cuda", expert_budget=2, offload_to=offload_to)
    assert torch.equal(gpu.generate(prompt, max_new_tokens=10).cpu(), cpu)
    assert gpu.stats.total.misses > 0
