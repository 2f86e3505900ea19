"""Preference losses: one registry, one signature, pure torch.

    loss(policy_logps, reference_logps, batch, **params) -> (per_example_loss, metrics)

`policy_logps` / `reference_logps` are `Logps`: summed completion log-probs of the chosen and rejected
responses and their completion token counts (the mean token log-prob is `sum / tokens`). `reference_logps`
is None for a loss with `needs_reference = False`, so the loop can skip it. `batch["is_sft"]` (a bool
tensor, from the pairs' `route` column) drives MixDPO. `metrics` maps names to per-example detached
tensors, so the training loop can average them over micro-batches and ranks with the right weights.

Every loss takes the same keyword parameters (`beta`, `label_smoothing`) and ignores the ones it does not use,
so that weighted combinations can pass one set to all parts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from operators.logprobs import Logps

Metrics = dict[str, Tensor]
LossOut = tuple[Tensor, Metrics]


@dataclass(frozen=True)
class LossFn:
    name: str
    fn: Callable[..., LossOut]
    needs_reference: bool

    def __call__(self, policy: Logps, reference: Logps | None, batch: Mapping[str, Any], **params: Any) -> LossOut:
        if self.needs_reference and reference is None:
            raise ValueError(f"loss {self.name!r} needs reference log-probs")
        return self.fn(policy, reference, batch, **params)


def _reward_metrics(policy: Logps, reference: Logps, beta: float) -> Metrics:
    # DPO's implicit reward r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, eq. 5).
    chosen = (beta * (policy.chosen - reference.chosen)).detach()
    rejected = (beta * (policy.rejected - reference.rejected)).detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracy": (chosen > rejected).float(),
        "rewards/margin": chosen - rejected,
    }


def _policy_metrics(policy: Logps) -> Metrics:
    return {"logps/chosen": policy.chosen.detach(), "logps/rejected": policy.rejected.detach()}


def _dpo_logits(policy: Logps, reference: Logps) -> Tensor:
    return (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)


def sigmoid_loss(policy: Logps, reference: Logps, batch: Mapping[str, Any], *, beta: float = 0.1,
                 label_smoothing: float = 0.0, **_: Any) -> LossOut:
    """DPO (Rafailov et al. 2023, eq. 7); label_smoothing > 0 is conservative DPO (Mitchell 2023, cDPO).

    The smoothed form is the one TRL's `sigmoid` loss used up to 0.2x; TRL 1.16 dropped label smoothing from
    `sigmoid` (it lives in `robust`/`exo_pair` now), so the TRL cross-check runs with label_smoothing = 0.
    """
    z = beta * _dpo_logits(policy, reference)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    metrics = {**_reward_metrics(policy, reference, beta), **_policy_metrics(policy),
               "sft_fraction": torch.zeros_like(loss).detach()}
    return loss, metrics


def ipo_loss(policy: Logps, reference: Logps, batch: Mapping[str, Any], *, beta: float = 0.1, **_: Any) -> LossOut:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2, beta being the paper's tau.

    As TRL 1.16 does, h uses log-ratios averaged per completion token rather than summed, so beta and the loss
    do not scale with response length (TRL notes the IPO authors confirmed this normalisation).
    """
    h = (policy.chosen - reference.chosen) / policy.chosen_tokens.clamp(min=1) \
        - (policy.rejected - reference.rejected) / policy.rejected_tokens.clamp(min=1)
    loss = (h - 1 / (2 * beta)) ** 2
    metrics = {**_reward_metrics(policy, reference, beta), **_policy_metrics(policy),
               "sft_fraction": torch.zeros_like(loss).detach()}
    return loss, metrics


def sft_loss(policy: Logps, reference: Logps | None, batch: Mapping[str, Any], *, beta: float = 0.1,
             **_: Any) -> LossOut:
    """Negative mean token log-likelihood of the chosen response, per example.

    TRL's `sft` term averages over all chosen tokens of the batch instead (long responses weigh more); the
    per-example mean keeps MixDPO's per-row switch meaningful, since each row then contributes one unit.
    """
    loss = -policy.chosen_mean
    metrics = {**_policy_metrics(policy), "sft_fraction": torch.ones_like(loss).detach()}
    if reference is not None:
        metrics.update(_reward_metrics(policy, reference, beta))
    return loss, metrics


def mixdpo_loss(policy: Logps, reference: Logps, batch: Mapping[str, Any], *, beta: float = 0.1,
                label_smoothing: float = 0.0, **_: Any) -> LossOut:
    """MixDPO: each row trains with SFT on its chosen response (route = sft, the hard pairs whose margin is
    below tau) or with DPO (route = dpo). A hard switch with no mixing weight, as in the paper's code.

    `torch.where` makes the switch exact: an sft row's loss does not depend on its rejected response, so the
    gradient through the rejected log-probs is exactly zero for it.
    """
    is_sft = torch.as_tensor(batch["is_sft"], dtype=torch.bool, device=policy.chosen.device)
    dpo, metrics = sigmoid_loss(policy, reference, batch, beta=beta, label_smoothing=label_smoothing)
    sft, _ = sft_loss(policy, None, batch)
    loss = torch.where(is_sft, sft, dpo)
    metrics["sft_fraction"] = is_sft.float()
    return loss, metrics


LOSSES: dict[str, LossFn] = {
    "sigmoid": LossFn("sigmoid", sigmoid_loss, needs_reference=True),
    "ipo": LossFn("ipo", ipo_loss, needs_reference=True),
    "sft": LossFn("sft", sft_loss, needs_reference=False),
    "mixdpo": LossFn("mixdpo", mixdpo_loss, needs_reference=True),
}


def combine(weights: Mapping[str, float]) -> LossFn:
    """A weighted sum of registered losses, e.g. combine({"sigmoid": 1.0, "sft": 0.1}) (DPO + NLL, RPO-style).

    Metrics are the union of the parts' (the first part wins a shared name), plus `loss/<part>` for each part;
    `sft_fraction` becomes the weight share of the per-example loss that is SFT.
    """
    if not weights:
        raise ValueError("combine() needs at least one loss")
    unknown = [n for n in weights if n not in LOSSES]
    if unknown:
        raise ValueError(f"unknown loss(es) {unknown}; choose from {sorted(LOSSES)}")
    parts = [(LOSSES[n], float(w)) for n, w in weights.items()]
    total_w = sum(abs(w) for _, w in parts) or 1.0

    def fn(policy: Logps, reference: Logps | None, batch: Mapping[str, Any], **params: Any) -> LossOut:
        loss: Tensor | None = None
        metrics: Metrics = {}
        sft_share: Tensor | None = None
        for part, w in parts:
            part_loss, part_metrics = part(policy, reference, batch, **params)
            loss = w * part_loss if loss is None else loss + w * part_loss
            share = abs(w) / total_w * part_metrics["sft_fraction"]
            sft_share = share if sft_share is None else sft_share + share
            metrics[f"loss/{part.name}"] = part_loss.detach()
            for k, v in part_metrics.items():
                metrics.setdefault(k, v)
        assert loss is not None and sft_share is not None
        metrics["sft_fraction"] = sft_share
        return loss, metrics

    name = "+".join(f"{w:g}*{n}" for n, w in weights.items())
    return LossFn(name, fn, needs_reference=any(p.needs_reference for p, _ in parts))


def get_loss(name: str, weights: Mapping[str, float] | None = None) -> LossFn:
    """`weights` (non-empty) selects a combination and overrides `name`."""
    if weights:
        return combine(weights)
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name]


def route_mask(routes: list[str | None]) -> Tensor:
    """`route` column -> bool tensor (True = sft). Null counts as dpo; anything else is an error."""
    bad = sorted({r for r in routes if r not in (None, "dpo", "sft")}, key=str)
    if bad:
        raise ValueError(f"column 'route' must be 'dpo' or 'sft', got {bad}")
    return torch.tensor([r == "sft" for r in routes], dtype=torch.bool)
