"""The gradient-norm audit (pipelines/audit.py) on a tiny run folder: a real run with tiny models, the math by
hand (a prompt whose responses are the same text has zero gradient and zero PVar; PVar from the implied
rewards; the gradient norm against a finite difference along the gradient)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.audit import AuditConfig, fit_bound, main, prompt_gradient, spearman, validate
from pipelines.runtime.config import ConfigError, from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
TOPICS = ["gravity", "rain", "prime numbers", "binary search", "the water cycle", "a haiku", "python", "France"]


def write_run(folder: Path) -> pa.Table:
    n = len(TOPICS)
    t = pa.table({
        "prompt_id": [f"p{i}" for i in range(n)] + ["same"],
        "prompt": [f"Tell me about {x}" for x in TOPICS] + ["Say hello"],
        "chosen": [f"Here is a clear answer about {x}." * (1 + i % 3) for i, x in enumerate(TOPICS)] + ["Hello!"],
        "rejected": [f"No {i}." for i in range(n)] + ["Hello!"],  # `same`: one response twice
        "pvar": [0.01 * (i + 1) for i in range(n)] + [0.0],
        "route": ["dpo"] * (n + 1),
    })
    (folder / "pairs").mkdir(parents=True)
    pq.write_table(t, folder / "pairs" / "part-0.parquet")
    return t


@pytest.fixture(scope="module")
def perturbed_policy(tiny_models, tmp_path_factory) -> str:
    """The tiny policy moved off its reference by seeded noise, as a few training steps would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("audit_policy")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_models["policy"]).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def audit(tiny_models, perturbed_policy, tmp_path_factory):
    run = tmp_path_factory.mktemp("audit_run")
    write_run(run)
    cfg = from_dict(AuditConfig, {"input": {"run": str(run), "sample": 50, "max_length": 64},
                                  "model": {"policy": perturbed_policy, "reference": tiny_models["policy"]},
                                  "audit": {"beta": 0.5}})
    return {"summary": main(cfg), "run": run}


def test_writes_the_plot_and_a_finite_correlation(audit):
    s, report = audit["summary"], audit["run"] / "report"
    assert (report / "grad_audit.png").stat().st_size > 5000
    saved = json.loads((report / "grad_audit.json").read_text())
    assert saved["prompts"] == s["prompts"] == 9  # every prompt: the sample is larger than the run
    assert math.isfinite(s["spearman"]) and -1 <= s["spearman"] <= 1
    assert math.isfinite(s["spearman_rm"])  # against the pairs' reward-model pvar column
    assert math.isfinite(s["constant"]) and s["constant"] > 0


def test_same_response_twice_has_zero_gradient_and_zero_pvar(audit):
    rows = {r["prompt_id"]: r for r in audit["summary"]["rows"]}
    same = rows.pop("same")
    # chosen == rejected: the DPO logit is 0 whatever theta, and its gradient cancels exactly (up to float32
    # rounding in the log-probs, many orders below the other prompts').
    smallest = min(r["grad_norm"] for r in rows.values())
    assert same["grad_norm"] < 1e-6 * smallest and same["pvar"] == 0.0 and not same["flagged"]
    assert same["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for r in rows.values():
        assert r["grad_norm"] > 1e-4
        rc, rr = r["implied_rewards"]  # two distinct responses: PVar = (sigmoid(r_c - r_r) - 1/2)^2
        assert r["pvar"] == pytest.approx((1 / (1 + math.exp(-(rc - rr))) - 0.5) ** 2, rel=1e-9)
        assert r["pvar"] > 0  # the perturbed policy is off its reference


def test_gradient_norm_matches_a_finite_difference(tiny_models, perturbed_policy):
    """Along u = g/|g| the loss changes at rate |g|: (L(θ + εu) - L(θ - εu)) / 2ε = |g| + O(ε²)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from operators.logprobs import encode_pairs, pad_token_id, pair_logps

    tok = AutoTokenizer.from_pretrained(perturbed_policy)
    model = AutoModelForCausalLM.from_pretrained(perturbed_policy, dtype=torch.float64).eval()
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float64).eval()
    ex = encode_pairs(tok, ["Tell me about rain"], ["Rain is water falling from clouds."], ["No."])
    pad = pad_token_id(tok)
    with torch.no_grad():
        ref = pair_logps(ref_model, ex, pad, 64)
    g, _, _ = prompt_gradient(model, ex, ref.chosen, ref.rejected, pad, 64, beta=0.5)
    params = [p for p in model.parameters() if p.grad is not None]
    u = [p.grad.detach().clone() / g for p in params]
    eps, losses = 1e-3, []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, u, strict=True):
                p.add_(sign * eps * d)
            losses.append(_loss(model, ex, ref, pad))
            for p, d in zip(params, u, strict=True):
                p.sub_(sign * eps * d)
    assert (losses[0] - losses[1]) / (2 * eps) == pytest.approx(g, rel=1e-3)


def _loss(model, ex, ref, pad) -> float:
    """The prompt's DPO loss written out again (beta 0.5), independently of pipelines.training.losses."""
    import torch.nn.functional as F

    from operators.logprobs import pair_logps

    pol = pair_logps(model, ex, pad, 64)
    z = 0.5 * ((pol.chosen - ref.chosen) - (pol.rejected - ref.rejected))
    return float(-F.logsigmoid(z).mean())


def test_pure_math_by_hand():
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 40, 30.0])) == pytest.approx(0.8)
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([-1, -2, -3, -4.0])) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.array([1, 2, 3.0]), np.zeros(3)))  # every PVar 0: no correlation
    grad = np.array([1.0, 2.0, 30.0, 0.5, 1e-6])
    pv = np.array([0.01, 0.04, 0.04, 0.0, 0.0])
    c, flagged = fit_bound(grad, pv, exponent=0.5, factor=3.0, zero_rtol=1e-4)
    # g / sqrt(pvar) = 10, 10, 150 -> median 10; 30 > 3 * 10 * 0.2 = 6; at PVar 0, g = 0.5 exceeds any bound
    # while 1e-6 is below 1e-4 x median(g) = 1e-4: rounding, not a gradient.
    assert c == pytest.approx(10.0)
    assert flagged.tolist() == [False, False, True, True, False]


def test_demo_config_parses_and_errors_name_the_key(capsys):
    from pipelines.tools import cli

    cfg = load_config(AuditConfig, CONFIGS / "audit_demo_cpu.yaml")
    validate(cfg)
    assert (CONFIGS / "audit_demo_cpu.yaml").read_text().startswith("#")
    with pytest.raises(ConfigError, match="model.reference"):
        validate(load_config(AuditConfig, CONFIGS / "audit_demo_cpu.yaml", ["model.reference="]))
    with pytest.raises(ConfigError, match="audit.exponnt"):
        load_config(AuditConfig, None, ["audit.exponnt=1"])
    # `prefsift audit` reaches the recipe: a config mistake is one line and exit code 2.
    assert cli.main(["audit", "--config", str(CONFIGS / "audit_demo_cpu.yaml"), "input.sample=0"]) == 2
    assert "input.sample must be > 0" in capsys.readouterr().err
