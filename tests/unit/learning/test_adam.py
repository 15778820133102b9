"""CpuAdam: torch.optim.Adam's numbers and state dict, without torch._dynamo."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.config import ModelSettings, TrainSettings
from pipeline.learning.adam import CpuAdam
from pipeline.learning.model import StreamNet
from pipeline.learning.step import make_state, match_optimizer_device

MODEL = ModelSettings(input_dim=8, hidden_dim=32, embed_dim=16, proj_dim=16, max_classes=5)


def _grads(model: torch.nn.Module, step: int) -> list[torch.Tensor | None]:
    """Deterministic gradients per step; the last parameter gets none on odd steps."""
    g = torch.Generator().manual_seed(100 + step)
    params = list(model.parameters())
    out: list[torch.Tensor | None] = [torch.randn(p.shape, generator=g) for p in params]
    if step % 2:
        out[-1] = None
    return out


def _run(model: torch.nn.Module, opt: torch.optim.Optimizer | CpuAdam, steps: range) -> None:
    for step in steps:
        for p, grad in zip(model.parameters(), _grads(model, step), strict=True):
            p.grad = grad
        opt.step()
        opt.zero_grad()


def _torch_adam(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, fused=False)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_same_weights_as_torch_adam_bit_for_bit(weight_decay: float) -> None:
    torch.manual_seed(0)
    a = StreamNet(MODEL)
    b = copy.deepcopy(a)
    _run(a, _torch_adam(a, 2.5e-3, weight_decay), range(12))
    _run(b, CpuAdam(b.parameters(), lr=2.5e-3, weight_decay=weight_decay), range(12))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_a_step_moves_the_weights_and_counts() -> None:
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = CpuAdam(model.parameters(), lr=0.1)
    _run(model, opt, range(2))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.state[model.weight]["step"].item() == 2.0
    assert opt.state[model.bias]["step"].item() == 1.0  # no gradient on the odd step


@pytest.mark.parametrize("direction", ["torch_to_cpu_adam", "cpu_adam_to_torch"])
def test_state_dict_continues_in_the_other_implementation(direction: str) -> None:
    """A checkpoint of either optimizer continues in the other with the same numbers."""
    torch.manual_seed(1)
    reference = StreamNet(MODEL)
    ref_opt = _torch_adam(reference, 1e-3, 1e-4)
    _run(reference, ref_opt, range(5))
    saved_model = copy.deepcopy(reference)
    saved = copy.deepcopy(ref_opt.state_dict())
    if direction == "cpu_adam_to_torch":  # replay the first five steps with CpuAdam instead
        saved_model = copy.deepcopy(reference)
        torch.manual_seed(1)
        first = StreamNet(MODEL)
        first_opt = CpuAdam(first.parameters(), lr=1e-3, weight_decay=1e-4)
        _run(first, first_opt, range(5))
        saved_model, saved = first, copy.deepcopy(first_opt.state_dict())
    _run(reference, ref_opt, range(5, 10))

    resumed = copy.deepcopy(saved_model)
    opt: torch.optim.Optimizer | CpuAdam
    if direction == "torch_to_cpu_adam":
        opt = CpuAdam(resumed.parameters(), lr=0.5)  # the saved lr wins, as in torch
    else:
        opt = _torch_adam(resumed, 0.5, 0.0)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 1e-3
    _run(resumed, opt, range(5, 10))
    for pa, pb in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_state_dict_has_torch_adams_layout() -> None:
    model = torch.nn.Linear(3, 2)
    ours, theirs = CpuAdam(model.parameters(), lr=0.1), _torch_adam(model, 0.1, 0.0)
    for opt in (ours, theirs):
        _run(model, opt, range(1))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["param_groups"][0].keys() == b["param_groups"][0].keys()
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        assert a["state"][i]["step"].dtype == b["state"][i]["step"].dtype


def test_loading_refuses_what_it_cannot_continue() -> None:
    model = torch.nn.Linear(3, 2)
    amsgrad = torch.optim.Adam(model.parameters(), lr=0.1, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        CpuAdam(model.parameters(), lr=0.1).load_state_dict(amsgrad.state_dict())
    other = torch.nn.Linear(4, 2)
    other_opt = CpuAdam(other.parameters(), lr=0.1)
    _run(other, other_opt, range(1))
    with pytest.raises(ValueError, match="shape"):
        CpuAdam(model.parameters(), lr=0.1).load_state_dict(other_opt.state_dict())
    with pytest.raises(ValueError, match="parameters"):
        CpuAdam([model.weight], lr=0.1).load_state_dict(other_opt.state_dict())
    with pytest.raises(ValueError, match="runs on the CPU"):
        CpuAdam([torch.nn.Parameter(torch.ones(2, device="meta"))], lr=0.1)


def test_make_state_on_cpu_uses_cpu_adam_and_fused_keeps_torch() -> None:
    cfg = TrainSettings()
    assert isinstance(make_state(StreamNet(MODEL), cfg).optimizer, CpuAdam)
    assert isinstance(make_state(StreamNet(MODEL), cfg, fused=True).optimizer, torch.optim.Adam)


def test_a_cpu_learners_train_steps_never_import_torch_dynamo() -> None:
    """The point of CpuAdam: the restart's first trained batch does not wait for dynamo."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        from pipeline.config import ModelSettings, TrainSettings
        from pipeline.learning.model import StreamNet
        from pipeline.learning.step import StepInputs, make_state, train_step
        model = ModelSettings(input_dim=8, hidden_dim=32, embed_dim=16, proj_dim=16, max_classes=5)
        cfg = TrainSettings()
        state = make_state(StreamNet(model), cfg)
        x, y = torch.randn(8, 8), torch.tensor([0, 1] * 4)
        seen = torch.zeros(5, dtype=torch.bool)
        seen[:2] = True
        for _ in range(2):
            result = train_step(state, StepInputs(x, y, x[:4], y[:4], seen), cfg)
        state.optimizer.load_state_dict(state.optimizer.state_dict())
        assert result.loss is not None and state.step == 2
        print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "no dynamo"


def test_a_cuda_learners_checkpoint_continues_on_cpu_adam_after_matching() -> None:
    """A CUDA learner writes fused / capturable flags; the CPU learner's match clears them."""
    model = torch.nn.Linear(3, 2)
    saved = _torch_adam(model, 0.1, 0.0)
    _run(model, saved, range(1))
    state = copy.deepcopy(saved.state_dict())
    state["param_groups"][0]["capturable"] = True
    state["param_groups"][0]["fused"] = True
    restored = CpuAdam(model.parameters(), lr=0.1)
    restored.load_state_dict(state)
    match_optimizer_device(restored, torch.device("cpu"))
    assert restored.param_groups[0]["capturable"] is False
    assert restored.param_groups[0]["fused"] is False
    before = model.weight.detach().clone()
    _run(model, restored, range(1, 2))
    assert not torch.equal(model.weight, before)
    assert restored.state[model.weight]["step"].item() == 2.0
