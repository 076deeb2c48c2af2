"""The optimizer of the UNet-sized networks a run trains: the student and DMD's fake score.

AdamW keeps two fp32 moments per parameter, 8 bytes: 20.6 GB for SDXL's 2.57 B-parameter UNet,
more than the bf16 teacher and the fp32 student together. bitsandbytes' AdamW8bit stores each
moment as 8-bit codes with one fp32 scale per block of 256 values (block-wise dynamic
quantisation, Dettmers et al. 2022): about 2 bytes per parameter, 5.2 GB at SDXL size. Tensors
under 4,096 values keep fp32 moments (bitsandbytes' own threshold). The discriminator heads are
small and stay on AdamW.

On CUDA, AdamW runs torch's fused kernel (`optim.fused`): one pass over the tensors. Torch's
default there, the foreach kernels, computes sqrt(v) into a new list of tensors as large as
the parameters at every step: 10.3 GB more at SDXL size, at the moment the gradients and the
moments are all alive. CPU runs keep torch's default, so the embedded world's documented
results stay reproducible to the bit.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch

from nitrofusion.errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit")
EIGHT_BIT_HINT = "optim.optimizer=adamw8bit needs bitsandbytes: pip install 'nitrofusion[8bit]'"


def check_available(name: str) -> None:
    """Raise a UserError, before anything is loaded, if `name` needs a package that is not installed."""
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(EIGHT_BIT_HINT)


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) with fp32 moments ("adamw") or 8-bit ones ("adamw8bit");
    `fused`: torch's fused AdamW kernel where every parameter is on a CUDA device."""
    if name == "adamw":
        params = list(params)
        fused = fused and bool(params) and all(p.device.type == "cuda" for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        check_available(name)
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS)}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """The bytes an optimizer's state holds (bitsandbytes nests its quantised moments one level down)."""
    total = 0
    for state in opt.state.values():
        for value in state.values():
            for t in value.values() if isinstance(value, dict) else [value]:
                if torch.is_tensor(t):
                    total += t.numel() * t.element_size()
    return total
