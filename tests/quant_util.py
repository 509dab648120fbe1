"""A float model that computes what a model with 8-bit layers computes, in PyTorch's ops.

A q8 QLinear rounds its input to Q8_0 (`quant.round_q8`, as llama.cpp does) before the product with
its weights; `RoundedLinear` is nn.Linear doing the same, and `round_inputs_like(ref, model)` turns
each layer of `ref` that is a q8 QLinear in `model` into one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modernlm import quant


class RoundedLinear(nn.Linear):
    """F.linear of round_q8(x): what a q8 QLinear computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quant.round_q8(x), self.weight)


def round_inputs_like(ref: nn.Module, model: nn.Module) -> nn.Module:
    """`ref` (a float model of `model`'s weights), its layers rounding their inputs where `model`'s are q8."""
    for name, layer in model.named_modules():
        if isinstance(layer, quant.QLinear) and layer.kind == "q8" and not name.startswith("tok_emb."):  # not a table
            target = ref.get_submodule(name)
            assert type(target) in (nn.Linear, quant.FastLinear), (name, type(target))
            target.__class__ = RoundedLinear
    return ref
