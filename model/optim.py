"""Optimizers the training module builds (train.py): Muon for the hidden weight matrices, AdamW for
the rest, stepped together as one optimizer.

Muon (Keller Jordan, 2024) keeps SGD momentum per matrix, and before stepping replaces the momentum
M = U S V^T by something close to U V^T: the same directions, every singular value about 1. Rare
directions in the gradient then move as much as the dominant ones. A few Newton-Schulz iterations
of an odd polynomial compute it with matrix products alone (no SVD). It only suits matrices that
multiply activations: embeddings (looked up rows), the LM head (logits, not features), gains and
biases train with AdamW beside it.

``torch.optim.Muon`` runs those iterations in bf16. On a CPU without native bf16 (AVX2 only) every
bf16 product is emulated; ``Muon`` here is PyTorch's with the iterations in a dtype of the caller's
choice (train.py: bf16 where the device computes in it, fp32 elsewhere), and otherwise the same
update and the same state, so checkpoints move between machines.
"""

import math

import torch
from torch import Tensor
from torch.optim import Optimizer


def orthogonalize(G: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> Tensor:
    """About U V^T of G = U S V^T (singular values brought near 1, within ~0.7..1.2), in ``dtype``:
    the quintic Newton-Schulz iteration of ``torch.optim.Muon``."""
    a, b, c = coefficients
    X = G.to(dtype)
    wide = X.size(0) <= X.size(1)
    if not wide:  # iterate on the wide side: X @ X.T is then the smaller Gram matrix
        X = X.T
    X = X / X.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: singular values now <= 1
    for _ in range(steps):
        # X <- a X + (b A + c A^2) X with A = X X^T: each singular value s becomes
        # a s + b s^3 + c s^5, a polynomial that pushes every s in (0, 1] towards 1
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return (X if wide else X.T).to(G.dtype)


def lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """What ``torch.optim.Muon`` multiplies its lr by for a (rows, cols) matrix: sqrt(rows / cols)
    for a tall one (``original``), or 0.2 * sqrt(max(rows, cols)) (``match_rms_adamw``: the
    update's RMS then matches AdamW's, so AdamW's learning rates carry over)."""
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with the Newton-Schulz iterations in ``ns_dtype`` (PyTorch's: bf16).
    With ``ns_dtype=torch.bfloat16`` this is PyTorch's own step."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)  # the momentum: an average of recent gradients
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"],
                                       group["eps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, as AdamW's
                p.add_(update, alpha=-lr * lr_scale(group["adjust_lr_fn"], p.shape))
        return loss


class CombinedOptimizer(Optimizer):
    """Several optimizers stepped as one, for a training loop that takes one (Lightning's automatic
    optimization): a step, zero_grad, state_dict and load_state_dict act on them all, and
    ``param_groups`` holds all their groups, the same dicts, so that a learning-rate scheduler,
    gradient clipping and AMP's loss scaler see every parameter."""

    def __init__(self, *optimizers: Optimizer):
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = optimizers
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [group for o in optimizers for group in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # evaluated once, then each optimizer steps on its gradients
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("optimizers")
        if states is None or len(states) != len(self.optimizers):
            raise ValueError(f"this optimizer state holds {len(states or [])} optimizers' states, "
                             f"not {len(self.optimizers)}: it was saved with another optimizer "
                             f"(--model.optimizer)")
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)
        # load_state_dict replaced each optimizer's group dicts: share the new ones
        self.param_groups = [group for o in self.optimizers for group in o.param_groups]
