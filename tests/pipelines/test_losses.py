"""Losses against hand-computed values, MixDPO's hard switch, and TRL 1.16's DPO loss on a real tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.training.losses import LOSSES, Logps, combine, get_loss, route_mask


def softplus(x: float) -> float:  # -logsigmoid(-x)
    return math.log1p(math.exp(x))


def logps(chosen, rejected, chosen_tokens=(1.0,), rejected_tokens=(1.0,), grad=False) -> Logps:
    c = torch.tensor(chosen, dtype=torch.float64, requires_grad=grad)
    r = torch.tensor(rejected, dtype=torch.float64, requires_grad=grad)
    return Logps(c, r, torch.tensor(chosen_tokens, dtype=torch.float64),
                 torch.tensor(rejected_tokens, dtype=torch.float64))


# policy - reference: chosen +0.5, rejected -0.5, so the DPO logit is 1.0 (row 0); row 1 is the mirror image.
POLICY = ([-1.0, -2.0], [-2.0, -1.0], [2.0, 4.0], [4.0, 2.0])
REFERENCE = ([-1.5, -1.5], [-1.5, -1.5], [2.0, 4.0], [4.0, 2.0])


def test_sigmoid_hand_computed():
    loss, m = LOSSES["sigmoid"](logps(*POLICY[:2], *POLICY[2:]), logps(*REFERENCE[:2], *REFERENCE[2:]), {},
                                beta=0.5)
    # -logsigmoid(beta * logit) = softplus(-beta * logit): logits +1 and -1.
    assert loss.tolist() == pytest.approx([softplus(-0.5), softplus(0.5)], abs=1e-12)
    assert m["rewards/chosen"].tolist() == pytest.approx([0.25, -0.25])
    assert m["rewards/rejected"].tolist() == pytest.approx([-0.25, 0.25])
    assert m["rewards/margin"].tolist() == pytest.approx([0.5, -0.5])
    assert m["rewards/accuracy"].tolist() == [1.0, 0.0]
    assert m["sft_fraction"].tolist() == [0.0, 0.0]


def test_sigmoid_label_smoothing_is_conservative_dpo():
    loss, _ = LOSSES["sigmoid"](logps([-1.0], [-2.0]), logps([-1.5], [-1.5]), {}, beta=0.5, label_smoothing=0.2)
    # cDPO: -(1 - ls) logsigmoid(z) - ls logsigmoid(-z), z = 0.5
    assert loss.item() == pytest.approx(0.8 * softplus(-0.5) + 0.2 * softplus(0.5), abs=1e-12)


def test_ipo_is_length_normalised_like_trl():
    loss, m = LOSSES["ipo"](logps(*POLICY[:2], *POLICY[2:]), logps(*REFERENCE[:2], *REFERENCE[2:]), {}, beta=0.5)
    # h = 0.5 / 2 tokens - (-0.5) / 4 tokens = 0.375 (row 0); row 1: -0.5/4 - 0.5/2 = -0.375. 1/(2 beta) = 1.
    assert loss.tolist() == pytest.approx([(0.375 - 1) ** 2, (-0.375 - 1) ** 2], abs=1e-12)
    assert m["rewards/chosen"].tolist() == pytest.approx([0.25, -0.25])  # rewards stay summed, as TRL logs


def test_sft_is_mean_token_nll_of_chosen_and_needs_no_reference():
    assert LOSSES["sft"].needs_reference is False
    loss, m = LOSSES["sft"](logps([-6.0, -1.0], [-9.0, -9.0], [3.0, 4.0], [1.0, 1.0]), None, {})
    assert loss.tolist() == pytest.approx([2.0, 0.25])
    assert m["sft_fraction"].tolist() == [1.0, 1.0]
    assert "rewards/chosen" not in m


def test_mixdpo_routes_rows_with_a_hard_switch():
    policy = logps(*POLICY[:2], *POLICY[2:], grad=True)
    reference = logps(*REFERENCE[:2], *REFERENCE[2:])
    batch = {"is_sft": route_mask(["sft", "dpo"])}
    loss, m = LOSSES["mixdpo"](policy, reference, batch, beta=0.5)
    # row 0 -> SFT: -(-1.0) / 2 tokens; row 1 -> DPO sigmoid with logit -1.
    assert loss.tolist() == pytest.approx([0.5, softplus(0.5)], abs=1e-12)
    assert m["sft_fraction"].tolist() == [1.0, 0.0]
    loss.sum().backward()
    # The SFT row's rejected response gets exactly zero gradient; its chosen gets d(-c/n)/dc = -1/n.
    assert policy.rejected.grad[0].item() == 0.0
    assert policy.chosen.grad[0].item() == pytest.approx(-0.5)
    # The DPO row: d softplus(-beta*(dc - dr))/dc = -beta * sigmoid(-z), z = -0.5; rejected is the negative.
    g = 0.5 / (1 + math.exp(-0.5))
    assert policy.chosen.grad[1].item() == pytest.approx(-g)
    assert policy.rejected.grad[1].item() == pytest.approx(g)


def test_mixdpo_all_dpo_equals_sigmoid():
    p, r = logps(*POLICY[:2], *POLICY[2:]), logps(*REFERENCE[:2], *REFERENCE[2:])
    mix, _ = LOSSES["mixdpo"](p, r, {"is_sft": torch.tensor([False, False])}, beta=0.3, label_smoothing=0.1)
    sig, _ = LOSSES["sigmoid"](p, r, {}, beta=0.3, label_smoothing=0.1)
    assert torch.equal(mix, sig)


def test_weighted_combination():
    p, r = logps(*POLICY[:2], *POLICY[2:]), logps(*REFERENCE[:2], *REFERENCE[2:])
    fn = combine({"sigmoid": 1.0, "sft": 0.1})
    assert fn.needs_reference
    loss, m = fn(p, r, {}, beta=0.5)
    sig, _ = LOSSES["sigmoid"](p, r, {}, beta=0.5)
    sft, _ = LOSSES["sft"](p, None, {})
    assert torch.allclose(loss, sig + 0.1 * sft)
    assert torch.allclose(m["loss/sft"], sft) and torch.allclose(m["loss/sigmoid"], sig)
    assert m["sft_fraction"].tolist() == pytest.approx([0.1 / 1.1] * 2)
    assert get_loss("ipo", {"sft": 1.0}).needs_reference is False  # weights override the name


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown loss 'dpo'"):
        get_loss("dpo")
    with pytest.raises(ValueError, match="unknown loss"):
        combine({"sigmoid": 1.0, "hinge": 1.0})
    with pytest.raises(ValueError, match="route"):
        route_mask(["dpo", "SFT"])
    with pytest.raises(ValueError, match="needs reference"):
        LOSSES["sigmoid"](logps([-1.0], [-2.0]), None, {})


# ----------------------------------------------------------------------------------------------------------
# TRL cross-check: the same tiny model, batch and tokenization through TRL's own DPOTrainer loss code
# ----------------------------------------------------------------------------------------------------------

PROMPTS = ["What is gravity?", "Write a haiku about rain", "How do I sort a list in python?",
           "Tell me about prime numbers and why they matter"]
CHOSEN = ["Gravity pulls things down.", "Rain falls softly on the roof.", "Use sorted().",
          "Primes have exactly two divisors."]
REJECTED = ["I do not know.", "Sun.", "You cannot sort lists, sorry about that.", "Numbers."]


@pytest.fixture(scope="module")
def policy_and_reference(tiny_models, tmp_path_factory):
    """The policy, and a reference that differs from it (perturbed weights), so the DPO logits are not 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ref_dir = tmp_path_factory.mktemp("perturbed_reference")
    ref.save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    return tiny_models["policy"], str(ref_dir)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_matches_trl_dpo_loss(policy_and_reference, tmp_path, loss_type):
    import pyarrow as pa
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from operators.logprobs import encode_pairs, pad_token_id, pair_logps, render_prompts
    from operators.reflogp import ReferenceLogProbs

    policy_path, ref_path = policy_and_reference
    tok = AutoTokenizer.from_pretrained(policy_path)
    max_length, beta = 26, 0.3  # 26 tokens truncates some completions, so the token counts matter (IPO)
    # TRL's non-conversational path gets our rendered prompt string and adds the eos to the completions.
    train = Dataset.from_dict({"prompt": render_prompts(tok, PROMPTS), "chosen": CHOSEN, "rejected": REJECTED})
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[loss_type], max_length=max_length,
                     per_device_train_batch_size=4, report_to=[], bf16=False, use_cpu=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32),
                         ref_model=AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32),
                         args=args, train_dataset=train, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PROMPTS))])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()

    ours_ids = encode_pairs(tok, PROMPTS, CHOSEN, REJECTED)
    assert [e["prompt_ids"] + e["chosen_ids"] for e in ours_ids] == \
        [p + c for p, c in zip(trainer.train_dataset["prompt_ids"], trainer.train_dataset["chosen_ids"], strict=True)]
    ref = ReferenceLogProbs(ref_path, max_length=max_length, micro_batch_size=3)(
        pa.table({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED}))
    with torch.no_grad():
        pol = pair_logps(trainer.model, ours_ids, pad_token_id(tok), max_length)
    reference = Logps(torch.tensor(ref.column("ref_chosen_logp").to_pylist()),
                      torch.tensor(ref.column("ref_rejected_logp").to_pylist()),
                      pol.chosen_tokens, pol.rejected_tokens)
    assert pol.chosen_tokens.tolist() == ref.column("chosen_tokens").to_pylist()
    full = [len(e["chosen_ids"]) for e in ours_ids] + [len(e["rejected_ids"]) for e in ours_ids]
    kept = pol.chosen_tokens.tolist() + pol.rejected_tokens.tolist()
    assert any(k < f for k, f in zip(kept, full, strict=True)), "the batch should include a truncated completion"
    ours, _ = LOSSES[loss_type](pol, reference, {}, beta=beta)
    assert ours.mean().item() == pytest.approx(trl_loss, abs=1e-5)
    assert abs(trl_loss - math.log(2)) > 1e-2  # not the trivial policy == reference value
