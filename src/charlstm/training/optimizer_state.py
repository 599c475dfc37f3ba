"""Adam's state in a checkpoint: tensors for safetensors, the rest as JSON, checked on reading."""

from __future__ import annotations

from typing import Any

import torch


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split Adam's state into tensors (for safetensors) and a JSON-able remainder."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    # The hyperparameters come from the run's configuration (which --resume may override, e.g.
    # --weight-decay), not from the file: only Adam's moments and step counts are state. The stored
    # groups must still describe the same parameters.
    groups = opt.state_dict()["param_groups"]
    stored = info["param_groups"]
    if [len(g["params"]) for g in stored] != [len(g["params"]) for g in groups]:
        raise ValueError("the optimizer state is for a different set of weights")
    opt.load_state_dict({"state": state, "param_groups": groups})
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                ok = (
                    torch.is_tensor(value)
                    and value.numel() == 1
                    and bool(torch.isfinite(value).all())
                    if key == "step"
                    else key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                    and torch.is_tensor(value)
                    and value.shape == p.shape
                    and bool(torch.isfinite(value).all())
                )
                if not ok:
                    raise ValueError(
                        f"Adam's {key!r} does not fit a weight of shape {tuple(p.shape)}"
                    )
