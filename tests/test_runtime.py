"""runtime helpers: eval_mode, resolve_device."""

from __future__ import annotations

import pytest
import torch

from modernlm.errors import UserError
from modernlm.runtime import eval_mode, resolve_device


def test_eval_mode_restores_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    with eval_mode(model) as m:
        assert m is model and not model.training and not model[1].training
    assert model.training and model[1].training

    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training and model[1].training  # restored on an exception too

    model.eval()
    with eval_mode(model):
        assert not model.training
    assert not model.training  # a model that was in eval mode stays in it


def test_eval_mode_nests():
    model = torch.nn.Linear(2, 2)
    with eval_mode(model):
        with eval_mode(model):
            assert not model.training
        assert not model.training  # the inner block restores the outer block's (eval) mode
    assert model.training


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(UserError, match="device"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
