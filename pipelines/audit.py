"""Gradient-norm audit: does a prompt's preference variance bound its DPO gradient, as the PVar paper states?

    python -m pipelines.audit --config pipelines/configs/audit_demo_cpu.yaml
    prefsift audit --config pipelines/configs/audit_demo_cpu.yaml input.sample=64 model.policy=runs/x/checkpoint

Guo, Li, Qiu, Wu and Wang, "On the Role of Preference Variance in Preference Optimization" (arXiv:2510.13022)
establish "an upper bound on the DPO gradient norm for any given prompt, showing it is controlled by the PVar
of that prompt", so that low-PVar prompts "can only produce small gradient updates". This recipe measures both
sides on a sample of a run's prompts, at a given policy θ against its reference:

- g(x) = ‖∇_θ L_x(θ)‖₂ over every trainable parameter, where L_x is the mean, over the prompt's pairs (w, l)
  in the run's pairs/, of the DPO loss −log σ(β[(log π_θ(w|x) − log π_ref(w|x)) − (log π_θ(l|x) − log π_ref(l|x))])
  (Rafailov et al. 2023, eq. 7; summed completion log-probs, no label smoothing): the gradient of the prompt's
  mean DPO loss, with the tokenization and log-prob code of training (operators.logprobs);
- PVar_θ(x) = mean over ordered pairs i ≠ j of the prompt's distinct responses of (σ(r_i − r_j) − ½)², with
  r = β(log π_θ − log π_ref) the policy-implied rewards (operators.stats.implied_rewards, pvar with τ = 1): the
  paper's PVar, whose p is the DPO preference probability. A prompt whose responses are all the same text has
  PVar 0.
- the reward-model PVar of selection (the pairs' `pvar` column) is set beside it when the pairs carry it.

The bound's constant. The paper's constant depends on bounds of the policy's log-prob gradients, which cannot
be read off a model, and we could not check the exact form of its statement (constant and power of PVar)
when writing this. So the audit fits the constant on the sample: C = median over prompts with PVar > 0 of
g / PVar^a (a = audit.exponent), and flags a prompt when g > audit.flag_factor · C · PVar^a, or when PVar = 0
and g > audit.zero_rtol · median(g) (no bound of this form allows a gradient there). Note that at θ = ref every implied
reward is 0, so PVar_θ is 0 for every prompt while the DPO gradient is not: audit a trained policy.

Writes <output.dir>/grad_audit.png (g against PVar, log scales, flagged prompts marked, with the Spearman rank
correlation) and grad_audit.json (the figures per prompt); output.dir defaults to the run's report/.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipelines.runtime.config import ConfigError, RunCfg, model_path, resolve_path, to_dict


@dataclass(frozen=True)
class AuditInputCfg:
    run: str = ""  # a run folder (its pairs/ is read) or a folder of pairs parquet shards
    sample: int = 32  # prompts, drawn with run.seed
    max_length: int | None = 1024  # as the training config
    max_prompt_length: int | None = None


@dataclass(frozen=True)
class AuditModelCfg:
    policy: str = ""  # the current policy, e.g. a training checkpoint
    reference: str = ""  # the model training started from
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class AuditCfg:
    beta: float = 0.1  # the DPO beta of training: it scales the implied rewards and the loss
    exponent: float = 0.5  # the power a of PVar in the fitted bound g <= C * PVar^a
    flag_factor: float = 3.0  # flag g > flag_factor * C * PVar^a
    # A gradient norm above zero_rtol x the sample's median at PVar 0 is flagged (float32 log-probs leave
    # a rounding residue where the exact gradient is 0).
    zero_rtol: float = 1e-4


@dataclass(frozen=True)
class AuditOutputCfg:
    dir: str = ""  # empty: <input.run>/report


@dataclass(frozen=True)
class AuditConfig:
    run: RunCfg = field(default_factory=RunCfg)
    input: AuditInputCfg = field(default_factory=AuditInputCfg)
    model: AuditModelCfg = field(default_factory=AuditModelCfg)
    audit: AuditCfg = field(default_factory=AuditCfg)
    output: AuditOutputCfg = field(default_factory=AuditOutputCfg)


CONFIG = AuditConfig  # `prefsift audit` parses this (pipelines/tools/cli.py)


def validate(cfg: AuditConfig) -> None:
    checks = [
        ("input.run", bool(cfg.input.run), "is required"),
        ("model.policy", bool(cfg.model.policy), "is required"),
        ("model.reference", bool(cfg.model.reference), "is required (the model training started from)"),
        ("input.sample", cfg.input.sample > 0, "must be > 0"),
        ("audit.beta", cfg.audit.beta > 0, "must be > 0"),
        ("audit.exponent", cfg.audit.exponent > 0, "must be > 0"),
        ("audit.flag_factor", cfg.audit.flag_factor >= 1, "must be >= 1"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key} {why}")


# ----------------------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------------------


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of average ranks; nan when either side is constant or fewer than 3 points."""
    import pandas as pd

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def fit_bound(grad: np.ndarray, pvar: np.ndarray, exponent: float, factor: float,
              zero_rtol: float) -> tuple[float, np.ndarray]:
    """The fitted constant C (median of g / PVar^a over PVar > 0) and the flag per prompt (see the module doc)."""
    pos = pvar > 0
    zero_tol = zero_rtol * float(np.median(grad))
    c = float(np.median(grad[pos] / pvar[pos] ** exponent)) if pos.any() else float("nan")
    flagged = np.where(pos, grad > factor * c * np.where(pos, pvar, 1.0) ** exponent, grad > zero_tol)
    return c, flagged


def prompt_gradient(model: Any, examples: list[dict[str, list[int]]], ref_chosen: Any, ref_rejected: Any,
                    pad_id: int, max_length: int | None, beta: float) -> tuple[float, Any, float]:
    """g(x) for one prompt's pairs: (gradient norm, the policy's Logps, the loss). Leaves the gradient in
    the parameters' .grad (for a finite-difference check)."""
    from operators.logprobs import Logps, pair_logps
    from pipelines.training.losses import LOSSES

    model.zero_grad(set_to_none=True)
    pol = pair_logps(model, examples, pad_id, max_length)
    ref = Logps(ref_chosen.to(pol.chosen), ref_rejected.to(pol.chosen), pol.chosen_tokens, pol.rejected_tokens)
    loss, _ = LOSSES["sigmoid"](pol, ref, {}, beta=beta, label_smoothing=0.0)
    loss = loss.mean()
    loss.backward()
    sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    return math.sqrt(sq), Logps(*(t.detach() for t in pol)), float(loss.detach())


def response_rewards(pairs: list[dict[str, Any]], pol: Any, ref_chosen: Any, ref_rejected: Any,
                     beta: float) -> list[float]:
    """Implied reward per distinct response text of a prompt (first occurrence), at least two values."""
    from operators.stats import implied_rewards

    rewards: dict[str, float] = {}
    for k, p in enumerate(pairs):
        for side, lp, ref in (("chosen", pol.chosen, ref_chosen), ("rejected", pol.rejected, ref_rejected)):
            text = json.dumps(p[side]) if not isinstance(p[side], str) else p[side]
            rewards.setdefault(text, float(implied_rewards(float(lp[k]), float(ref[k]), beta)))
    values = list(rewards.values())
    return values * 2 if len(values) == 1 else values  # one distinct text: all rewards equal, PVar 0


# ----------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------


def read_sample(path: str, sample: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The pairs of `sample` prompts drawn with `seed`, grouped by prompt_id (sorted, so runs agree)."""
    import pyarrow.dataset as pads

    from pipelines.training.placement import locate_pairs

    ds = pads.dataset(locate_pairs(path), format="parquet")
    names = ds.schema.names
    missing = [c for c in ("prompt_id", "prompt", "chosen", "rejected") if c not in names]
    if missing:
        raise ValueError(f"pairs at {path} lack the column(s) {missing}")
    ids = sorted(set(ds.to_table(columns=["prompt_id"]).column("prompt_id").to_pylist()) - {None})
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(ids), size=min(sample, len(ids)), replace=False).tolist())
    chosen_ids = [ids[i] for i in keep]
    cols = ["prompt_id", "prompt", "chosen", "rejected"] + (["pvar"] if "pvar" in names else [])
    table = ds.to_table(columns=cols, filter=pads.field("prompt_id").isin(chosen_ids))
    groups: dict[str, list[dict[str, Any]]] = {i: [] for i in chosen_ids}
    for row in table.to_pylist():
        groups[row["prompt_id"]].append(row)
    return groups


def main(cfg: AuditConfig) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from operators.logprobs import encode_pairs, pad_token_id, pair_logps
    from operators.stats import pvar
    from pipelines.runtime.console import say
    from pipelines.training.model import disable_dropout

    # --- setup: models, the sample of prompts ---------------------------------------------------------------
    validate(cfg)
    policy = model_path(cfg.model.policy, "model.policy")
    reference = model_path(cfg.model.reference, "model.reference")
    run_dir = resolve_path(cfg.input.run)
    out_dir = resolve_path(cfg.output.dir) if cfg.output.dir else os.path.join(run_dir, "report")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.model.dtype)
    rc = cfg.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=rc)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=dtype, trust_remote_code=rc).to(device)
    ref_model = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype, trust_remote_code=rc).to(device).eval()
    disable_dropout(model)
    model.eval()  # no dropout; gradients still flow
    pad = pad_token_id(tokenizer)
    groups = read_sample(run_dir, cfg.input.sample, cfg.run.seed)
    say(f"audit: {len(groups)} prompts from {run_dir}")

    # --- per prompt: reference log-probs, then the policy's loss, gradient norm and implied PVar ------------
    ac, rows = cfg.audit, []
    for prompt_id, pairs in groups.items():
        examples = encode_pairs(tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                                [p["rejected"] for p in pairs], max_prompt_length=cfg.input.max_prompt_length)
        with torch.inference_mode():
            ref = pair_logps(ref_model, examples, pad, cfg.input.max_length)
        if min(min(ref.chosen_tokens), min(ref.rejected_tokens)) == 0:
            raise ValueError(f"prompt {prompt_id!r}: a pair has no completion token within input.max_length; "
                             "set input.max_prompt_length below it")
        ref_c, ref_r = ref.chosen.clone().double(), ref.rejected.clone().double()
        g, pol, loss = prompt_gradient(model, examples, ref_c, ref_r, pad, cfg.input.max_length, ac.beta)
        rewards = response_rewards(pairs, pol, ref_c, ref_r, ac.beta)
        rm = [p["pvar"] for p in pairs if p.get("pvar") is not None]
        rows.append({"prompt_id": prompt_id, "pairs": len(pairs), "grad_norm": g, "loss": loss,
                     "pvar": pvar(rewards), "implied_rewards": rewards, "pvar_rm": rm[0] if rm else None})

    # --- the bound, the correlation, the plot -----------------------------------------------------------------
    grad = np.array([r["grad_norm"] for r in rows])
    pv = np.array([r["pvar"] for r in rows])
    c, flagged = fit_bound(grad, pv, ac.exponent, ac.flag_factor, ac.zero_rtol)
    for r, f in zip(rows, flagged, strict=True):
        r["flagged"] = bool(f)
    rm_rows = [r for r in rows if r["pvar_rm"] is not None]
    summary = {
        "prompts": len(rows), "spearman": spearman(grad, pv),
        "spearman_rm": spearman(np.array([r["grad_norm"] for r in rm_rows]),
                                np.array([r["pvar_rm"] for r in rm_rows])) if rm_rows else None,
        "constant": c, "exponent": ac.exponent, "flag_factor": ac.flag_factor,
        "flagged": [r["prompt_id"] for r in rows if r["flagged"]],
        "policy": policy, "reference": reference, "beta": ac.beta, "config": to_dict(cfg), "rows": rows,
    }
    os.makedirs(out_dir, exist_ok=True)
    summary["plot"] = plot(rows, summary, out_dir)
    path = os.path.join(out_dir, "grad_audit.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=float)
    say(f"audit: Spearman(grad norm, PVar) = {summary['spearman']:.3f}; {len(summary['flagged'])} of "
        f"{len(rows)} prompts above {ac.flag_factor:g} x the fitted bound; {summary['plot']}")
    return summary


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], out_dir: str) -> str:
    from matplotlib.figure import Figure  # the OO API, as pipelines/reporting/report.py: no pyplot state

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    pv = np.array([r["pvar"] for r in rows])
    g = np.array([r["grad_norm"] for r in rows])
    flag = np.array([r["flagged"] for r in rows], dtype=bool)
    floor = pv[pv > 0].min() / 10 if (pv > 0).any() else 1e-12  # PVar 0 drawn at the left edge
    x = np.where(pv > 0, pv, floor)
    ax.scatter(x[~flag], np.maximum(g[~flag], 1e-12), s=18, label="prompt")
    if flag.any():
        ax.scatter(x[flag], np.maximum(g[flag], 1e-12), s=40, marker="x", color="C3", label="flagged")
    if np.isfinite(summary["constant"]) and (pv > 0).any():
        xs = np.geomspace(pv[pv > 0].min(), pv.max(), 50)
        a, k = summary["exponent"], summary["flag_factor"]
        ax.plot(xs, summary["constant"] * xs ** a, "k--", lw=1, label=f"fitted C·PVar^{a:g}")
        ax.plot(xs, k * summary["constant"] * xs ** a, "k:", lw=1, label=f"{k:g}× fitted (flag line)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("PVar of the policy-implied rewards")
    ax.set_ylabel("‖∇θ DPO loss‖ on the prompt")
    ax.set_title(f"{summary['prompts']} prompts, Spearman ρ = {summary['spearman']:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "grad_audit.png")
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    # The same path as `prefsift audit`: the same checks before Ray, the same one-line errors.
    from pipelines.tools.cli import main as prefsift

    sys.exit(prefsift(["audit", *sys.argv[1:]]))
