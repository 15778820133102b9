"""Adam for the CPU learner, outside ``torch.optim``.

``torch.optim.Optimizer`` imports ``torch._dynamo`` the first time a parameter group is added
and again on the first ``step`` (its methods are wrapped to keep the compiler out). The
learner never compiles, but the import is on the path from process start to the first trained
batch, on one core, under the GIL the group join and the bank read share (figures in
docs/performance.md, Restart). :class:`CpuAdam` is that same
optimizer without the wrapper:

* the arithmetic of ``torch.optim.Adam``'s single-tensor path, operation for operation (L2
  weight decay added to the gradient, ``lerp_`` for the first moment, the bias corrections in
  Python floats from a float32 step counter), so a run gives the same weights bit for bit;
* the same ``state_dict`` layout (state by parameter index, ``step`` / ``exp_avg`` /
  ``exp_avg_sq``; the group with every key ``torch.optim.Adam`` writes), so a checkpoint
  written by a CPU learner loads into the fused Adam of a CUDA learner and back.

CUDA learners keep ``torch.optim.Adam`` (fused, capturable: one kernel per step and the
non-finite skip on the device); see :func:`pipeline.learning.step.make_state`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# The group keys torch.optim.Adam writes; the ones the arithmetic below does not implement
# must hold these values in a state dict that is loaded.
_FIXED = {"amsgrad": False, "maximize": False, "differentiable": False}
_GROUP_DEFAULTS: dict[str, Any] = {
    **_FIXED,
    "foreach": None,
    "capturable": False,
    "fused": False,
    "decoupled_weight_decay": False,
}


class CpuAdam:
    """Adam with L2 weight decay (``torch.optim.Adam`` with its defaults otherwise), CPU only.

    One parameter group. ``state`` maps a parameter to its ``step`` (float32 0-d tensor),
    ``exp_avg`` and ``exp_avg_sq``, created on the parameter's first step, as in torch.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        group_params = list(params)
        if not group_params:
            raise ValueError("CpuAdam got an empty parameter list")
        for p in group_params:
            if p.device.type != "cpu":
                raise ValueError(f"CpuAdam runs on the CPU; a parameter is on {p.device}")
        self.param_groups: list[dict[str, Any]] = [
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                **_GROUP_DEFAULTS,
                "params": group_params,
            }
        ]
        self.state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("CpuAdam does not support sparse gradients")
            st = self.state.get(p)
            if st is None:
                st = self.state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
            grad = p.grad
            st["step"] += 1
            if weight_decay != 0:
                grad = grad.add(p, alpha=weight_decay)
            st["exp_avg"].lerp_(grad, 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = st["step"].item()
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            denom = (st["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-(lr / bias_correction1))

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Adam``'s layout: parameters by index, tensors not copied (as torch)."""
        group = self.param_groups[0]
        index = {id(p): i for i, p in enumerate(group["params"])}
        return {
            "state": {index[id(p)]: dict(st) for p, st in self.state.items()},
            "param_groups": [
                {
                    **{k: v for k, v in group.items() if k != "params"},
                    "params": list(range(len(index))),
                }
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.Adam`` (one group, same sizes).

        Saved ``capturable`` / ``fused`` flags are taken as written (as torch does);
        :func:`pipeline.learning.step.match_optimizer_device` fits them to the device.
        """
        groups = state_dict.get("param_groups", [])
        if len(groups) != 1:
            raise ValueError(f"expected one parameter group, the state dict has {len(groups)}")
        saved = groups[0]
        for key, value in _FIXED.items():
            if saved.get(key, value) != value:
                raise ValueError(f"CpuAdam cannot continue an Adam with {key}={saved[key]!r}")
        if saved.get("decoupled_weight_decay", False) and saved.get("weight_decay", 0.0):
            raise ValueError("CpuAdam cannot continue an AdamW (decoupled weight decay)")
        params = self.param_groups[0]["params"]
        if len(saved["params"]) != len(params):
            raise ValueError(
                f"the state dict has {len(saved['params'])} parameters, this model {len(params)}"
            )
        by_index = dict(zip(saved["params"], params, strict=True))
        state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
        for i, saved_state in state_dict.get("state", {}).items():
            p = by_index[int(i)]
            for key in ("exp_avg", "exp_avg_sq"):
                if saved_state[key].shape != p.shape:
                    raise ValueError(
                        f"state {key} of parameter {i} has shape "
                        f"{tuple(saved_state[key].shape)}, the parameter {tuple(p.shape)}"
                    )
            state[p] = {
                # torch keeps a non-capturable step as a float32 CPU scalar; moments follow
                # the parameter's dtype and device.
                "step": torch.as_tensor(saved_state["step"]).detach().to("cpu", torch.float32),
                "exp_avg": saved_state["exp_avg"].detach().to(p.device, p.dtype).clone(),
                "exp_avg_sq": saved_state["exp_avg_sq"].detach().to(p.device, p.dtype).clone(),
            }
        self.state = state
        self.param_groups[0] = {
            **_GROUP_DEFAULTS,
            **{k: v for k, v in saved.items() if k != "params"},
            "params": params,
        }
