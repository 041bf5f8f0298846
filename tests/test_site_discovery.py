"""Site discovery propagates shapes on fake tensors, finds exactly what a real forward pass finds, and
falls back to a real run for a tower that reads values."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from clipscope import backends, hooks


@pytest.mark.parametrize("name", ["clipscope-tiny-rn", "clipscope-tiny-vit", "organism"])
def test_fake_tensor_discovery_finds_the_same_sites_as_a_real_forward_pass(name):
    loaded = backends.load(name, None, torch.device("cpu"), torch.float32)
    model = loaded.model.eval()
    fake = hooks.discover_sites(model, loaded.towers)
    real = hooks.discover_sites(model, loaded.towers, fake_tensors=False)
    assert fake == real and len(fake) > 30


def test_discovery_does_no_arithmetic_on_real_tensors():
    loaded = backends.load("clipscope-tiny-vit", None, torch.device("cpu"), torch.float32)
    seen = []
    first_block = loaded.model.visual.transformer.resblocks[0]
    handle = first_block.register_forward_pre_hook(lambda _m, inp: seen.append(type(inp[0])))
    try:
        hooks.discover_sites(loaded.model.eval(), loaded.towers)
    finally:
        handle.remove()
    assert seen == [FakeTensor]


class _ReadsValues(nn.Module):
    """A model whose forward depends on a tensor's value (a data-dependent length), as a text tower that
    cuts at its last token does: fake tensors cannot run it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = int(x.abs().sum() >= 0) + 1  # always 2, but only known from the values
        return self.proj(x)[:, :keep]


def test_a_tower_that_reads_values_is_discovered_by_a_real_run():
    model = _ReadsValues()
    tower = hooks.Tower("visual", {"proj": "visual.proj"}, lambda b: model(torch.zeros(b, 4)))
    sites = hooks.discover_sites(model, [tower])
    assert sites["visual.proj"].shape == (6,) and sites["visual.proj"].layout == "vector"
    assert sites == hooks.discover_sites(model, [tower], fake_tensors=False)
