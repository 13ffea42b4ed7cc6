"""DP-SGD's clipped gradient sum in closed form, for a model whose only trainable layer
is one final Linear layer.

Why: for a single ``nn.Linear`` (logistic or softmax regression: breast_cancer,
symptom), or one after a parameter-free front end (ecg's fixed spectral features),
Opacus's per-step machinery costs many times the step itself: hooks mode
materialises batch x weights per-sample gradients only to take their norms and sum
them again, and ghost clipping backpropagates twice. For ``z_i = W x_i + b`` (``x_i``
the Linear layer's input: the example, or the front end's output for it) the
per-example gradient is the outer product ``g_i = dL_i/dz_i (x) [x_i, 1]``, so

    ||g_i|| = ||dL_i/dz_i|| * sqrt(||x_i||^2 + 1)        (the 1 is the bias)
    sum_i c_i g_i = (c * dL/dz)^T [X, 1],   c_i = min(1, C / (||g_i|| + 1e-6))

from one forward and the gradient of the unreduced loss with respect to the logits:
the same clipped sum Opacus computes (its clip factor, ``1e-6`` included), in
batch x (inputs + outputs) memory and two small matrix products.

Only the clipping moves here. The model, optimizer and data loader are still wrapped
by ``PrivacyEngine.make_private`` in ghost mode, whose optimizer
(``DPOptimizerFastGradientClipping``) takes the clipped sum as it is and adds Opacus's
noise, scales by the expected batch size and steps the accountant exactly as in hooks
mode (same noise multiplier, sample rate and steps; noise drawn from the same
generator in the same parameter order): ``noise_and_account``. Opacus's own hooks on
the wrapped module are removed (``remove_hooks``): nothing here needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.loss import _Loss

# Opacus's flat clipping adds this to every norm before dividing (DPOptimizer and
# GradSampleModuleFastGradientClipping both do); kept so the clip factors are its own.
OPACUS_NORM_EPS = 1e-6


@dataclass(frozen=True)
class LinearHead:
    """A model split as ``features`` (no trainable parameter) then ``linear``."""

    features: nn.Module
    linear: nn.Linear


def split_head(model: nn.Module) -> LinearHead | None:
    """The model as parameter-free modules then one plain ``nn.Linear``; else None.

    Structure only: a plain ``nn.Linear``, or a plain ``nn.Sequential`` whose last
    module is a plain ``nn.Linear`` and whose other modules hold no trainable
    parameter. Subclasses are refused: their forward may do something else, and then
    the closed form would not be the gradient of the model that is trained.
    """
    modules = list(model.children()) if type(model) is nn.Sequential else [model]
    if not modules or type(modules[-1]) is not nn.Linear:
        return None
    *front, linear = modules
    assert isinstance(linear, nn.Linear)
    if any(p.requires_grad for m in front for p in m.parameters()):
        return None
    if any((linear._forward_hooks, linear._forward_pre_hooks, linear._backward_hooks)):
        return None
    return LinearHead(nn.Sequential(*front), linear)


def linear_head(model: nn.Module, input_shape: tuple[int, ...]) -> LinearHead | None:
    """``split_head``, when the Linear layer also sees one vector per example.

    A Linear layer applied to every position of a sequence or image sums per-position
    gradients, which the closed form does not: the front end's output for a batch of
    two zero examples of ``input_shape`` must be [2, in_features].
    """
    head = split_head(model)
    if head is None:
        return None
    weight = head.linear.weight
    with torch.no_grad():
        probe = head.features(torch.zeros((2, *input_shape), dtype=weight.dtype,
                                          device=weight.device))
    return head if tuple(probe.shape) == (2, head.linear.in_features) else None


def clipped_grad_sum(
    head: LinearHead,
    inputs: Tensor,
    targets: Tensor,
    criterion: Callable[[Tensor, Tensor], Any],
    max_grad_norm: float,
) -> tuple[Tensor, Tensor]:
    """Set ``p.grad`` of the Linear layer's trainable parameters to the clipped
    per-example sum (``linear_head`` must have accepted the model).

    Returns the logits and the batch's mean loss (detached) for the caller's
    statistics. An empty batch (Poisson sampling) gives zero gradients, as in Opacus.
    """
    linear = head.linear
    weight, bias = linear.weight, linear.bias
    train_bias = bias is not None and bias.requires_grad
    with torch.no_grad():
        x = head.features(inputs) if len(inputs) else \
            weight.new_zeros((0, linear.in_features))
        logits = F.linear(x, weight, bias)
    dz, loss = _logit_grads(logits, targets, criterion)
    with torch.no_grad():
        # ||g_i|| = ||dz_i|| * sqrt(||x_i||^2 [weight] + 1 [bias]), trainable ones only
        norms = torch.linalg.vector_norm(dz, dim=1)
        if weight.requires_grad and train_bias:
            norms *= torch.hypot(torch.linalg.vector_norm(x, dim=1), x.new_ones(()))
        elif weight.requires_grad:
            norms *= torch.linalg.vector_norm(x, dim=1)
        clip = (max_grad_norm / (norms + OPACUS_NORM_EPS)).clamp_(max=1.0)
        scaled = dz.mul_(clip.unsqueeze(1))
        if weight.requires_grad:
            weight.grad = scaled.T @ x
        if train_bias:
            assert bias is not None
            bias.grad = scaled.sum(dim=0)
    return logits, loss


def _logit_grads(
    logits: Tensor, targets: Tensor, criterion: Callable[[Tensor, Tensor], Any]
) -> tuple[Tensor, Tensor]:
    """(dL_i/dz_i per example, mean loss): analytic for plain cross-entropy, else autograd.

    Plain cross-entropy (no class weights, no label smoothing: what the trainer uses)
    has dL_i/dz_i = softmax(z_i) - onehot(y_i), a handful of small ops. Any other loss
    module is differentiated per example by autograd on the logits, its ``reduction``
    set to "none" for the call and restored, as Opacus's ghost clipping does.
    """
    if (type(criterion) is nn.CrossEntropyLoss and criterion.weight is None
            and criterion.label_smoothing == 0.0 and logits.dim() == 2
            and not targets.is_floating_point()):
        with torch.no_grad():
            log_p = torch.log_softmax(logits, dim=1)
            picked = targets.unsqueeze(1)  # out-of-range labels raise, as in the loss
            loss = -log_p.gather(1, picked).mean()
            minus_one = torch.full(picked.shape, -1.0, dtype=log_p.dtype, device=log_p.device)
            return log_p.exp_().scatter_add_(1, picked, minus_one), loss
    if not isinstance(criterion, _Loss):
        raise TypeError("the closed-form clipping needs a torch loss module (its per-example "
                        f"losses are taken with reduction='none'), got {type(criterion)}")
    z = logits.detach().requires_grad_(True)
    reduction = criterion.reduction
    criterion.reduction = "none"
    try:
        per_example = criterion(z, targets)
    finally:
        criterion.reduction = reduction
    (dz,) = torch.autograd.grad(per_example.sum(), z)
    return dz, per_example.detach().mean()


def noise_and_account(dp_opt: DPOptimizer) -> bool:
    """Opacus's ``pre_step`` for the clipped sum ``clipped_grad_sum`` left in ``p.grad``.

    The same sequence as ``DPOptimizerFastGradientClipping.pre_step`` (add_noise,
    scale_grad, the accountant's step hook) with the clipped sum handed over as
    ``summed_grad`` instead of deep-copied by ``accumulate``: two deep copies cost
    ~0.2 ms here, as much as the whole non-private step of a small Linear model.
    ``add_noise`` replaces ``p.grad``, so nothing aliases afterwards. There is no
    gradient accumulation on this path (no BatchMemoryManager: the closed form holds
    no per-sample gradients), so no step is ever skipped. Returns True, as pre_step
    does for a finished logical batch.
    """
    # scale_grad's accumulated_iterations is 1 only in this class (hooks mode's reads
    # per-sample gradients there are none of)
    if not isinstance(dp_opt, DPOptimizerFastGradientClipping):
        raise TypeError("noise_and_account needs ghost mode's optimizer")
    for p in dp_opt.params:
        p.summed_grad = p.grad
    dp_opt.add_noise()
    dp_opt.scale_grad()
    if dp_opt.step_hook:
        dp_opt.step_hook(dp_opt)
    return True
