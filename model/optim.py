"""The optimizers training builds (``build_optimizer``): AdamW for every parameter, or Muon for the
hidden weight matrices and AdamW for the rest, stepped together as one optimizer.

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
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .block import Block

OPTIMIZERS = ("adamw", "muon")


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


def hidden_matrices(module: nn.Module) -> list[nn.Parameter]:
    """The weight matrices inside the transformer blocks (attention and MLP projections): Muon's.
    Not the embeddings and the LM head, which map tokens, not features."""
    in_blocks = {id(m.weight) for block in module.modules() if isinstance(block, Block)
                 for m in block.modules() if isinstance(m, nn.Linear)}
    return [p for p in module.parameters() if id(p) in in_blocks]


def param_groups(module: nn.Module, weight_decay: float, decay_embeddings: bool = False,
                 exclude: Sequence[nn.Parameter] = (), embedding_lr: float | None = None
                 ) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only, not on biases, norms or embeddings
    (``decay_embeddings``: on embeddings too, as nanoGPT does). ``exclude``: parameters another
    optimizer trains. ``embedding_lr``: the embedding tables in a third group of their own, at that
    learning rate (a table's row moves only when its token is in the batch, so it can take a
    larger step than the weights every token trains); None: in the other two, at the optimizer's."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    excluded = {id(p) for p in exclude}
    params = [p for p in module.parameters() if id(p) not in excluded]  # tied weights appear once
    table_lr = embedding_lr is not None

    def group(p: nn.Parameter) -> int:  # 0: decayed, 1: not decayed, 2: the tables at their rate
        if table_lr and id(p) in embeddings:
            return 2
        return 0 if p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings) else 1

    groups = [{"params": [p for p in params if group(p) == 0], "weight_decay": weight_decay},
              {"params": [p for p in params if group(p) == 1], "weight_decay": 0.0}]
    if table_lr:
        groups.append({"params": [p for p in params if group(p) == 2], "lr": embedding_lr,
                       "weight_decay": weight_decay if decay_embeddings else 0.0})
    return groups


def build_optimizer(module: nn.Module, optimizer: str, *, lr: float, betas: Sequence[float],
                    weight_decay: float, decay_embeddings: bool = False, muon_lr: float = 0.02,
                    muon_momentum: float = 0.95, muon_ns_steps: int = 5,
                    ns_dtype: torch.dtype = torch.bfloat16, fused: bool = False,
                    embedding_lr: float | None = None) -> Optimizer:
    """``adamw``: AdamW for every parameter (``param_groups``; ``embedding_lr``: the embedding
    tables' own). ``muon``: Muon for the blocks' weight matrices (``hidden_matrices``), its
    Newton-Schulz iterations in ``ns_dtype``, and AdamW for the rest, stepped as one
    ``CombinedOptimizer`` whose groups are named adamw, adamw_no_decay, (with ``embedding_lr``)
    embeddings, and muon. ``fused``: AdamW's one-kernel step (else its multi-tensor one)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is unknown; choose one of {list(OPTIMIZERS)}")
    if muon_ns_steps < 1:
        raise ValueError(f"muon_ns_steps must be 1 or more (Muon's Newton-Schulz iterations; "
                         f"PyTorch's default is 5), got {muon_ns_steps}")
    muon_params = hidden_matrices(module) if optimizer == "muon" else []
    adamw = torch.optim.AdamW(param_groups(module, weight_decay, decay_embeddings, muon_params,
                                           embedding_lr),
                              lr=lr, betas=tuple(betas), fused=fused, foreach=not fused)
    if not muon_params:
        return adamw
    muon = Muon(muon_params, lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay,
                ns_steps=muon_ns_steps, ns_dtype=ns_dtype)
    # named groups: the learning-rate monitor logs lr-CombinedOptimizer/{adamw,muon,...}
    names = ("adamw", "adamw_no_decay") + (("embeddings",) if embedding_lr is not None else ())
    for group, name in zip(adamw.param_groups + muon.param_groups, names + ("muon",),
                           strict=True):
        group["name"] = name
    return CombinedOptimizer(adamw, muon)
