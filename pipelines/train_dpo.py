"""Train a policy on curated pairs with DPO, IPO, SFT or MixDPO on Ray Train.

    python -m pipelines.train_dpo --config pipelines/configs/train_demo_cpu.yaml
    python -m pipelines.train_dpo --config pipelines/configs/train_demo_cpu.yaml loss.name=mixdpo optim.max_steps=40

setup (read pairs, reference log-probs once into <output.dir>/pairs_ref/) -> train loop on Ray Train workers
(our own loop: TRL cannot route rows between SFT and DPO) -> HF checkpoints via ray.train.report -> summary
in <output.dir>/manifest.json. Rerunning with the same run.name and output.dir resumes from the last
checkpoint; the step counter continues (and so does the cosine schedule, rebuilt for the new max_steps).
Steps run after the last checkpoint of a killed run are logged again to metrics.jsonl; the later line wins.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.runtime.config import (
    ConfigError,
    RayCfg,
    RunCfg,
    check_choice,
    fingerprint,
    model_path,
    resolve_path,
    to_dict,
)
from pipelines.training.losses import LOSSES, get_loss


@dataclass(frozen=True)
class TrainInputCfg:
    path: str = ""  # a curation run folder (its pairs/ is read) or a folder of pairs parquet shards
    max_length: int | None = 1024  # prompt + completion tokens; longer sequences lose their end (TRL keep_start)
    # Prompt tokens kept, from the prompt's END (the MixDPO authors: 512 of max_length 1024); null keeps the
    # whole prompt, and a pair whose prompt alone fills max_length is quarantined by the reference stage.
    max_prompt_length: int | None = None


@dataclass(frozen=True)
class TrainOutputCfg:
    dir: str = "runs/train"
    log_batches: bool = False  # every rank logs each micro-batch's pair ids to train/batches/ (curriculum checks)


@dataclass(frozen=True)
class ModelCfg:
    policy: str = ""
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ReferenceCfg:
    model: str = ""  # empty: the policy's starting weights
    batch_size: int = 64  # rows per map_batches call
    micro_batch_size: int = 8  # pairs per forward pass (2x sequences), longest first
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class LossCfg:
    name: str = "sigmoid"  # sigmoid | ipo | sft | mixdpo
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (sigmoid, mixdpo)
    weights: dict[str, float] | None = None  # a weighted combination, e.g. {sigmoid: 1.0, sft: 0.1}; overrides name


@dataclass(frozen=True)
class OptimCfg:
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # a fraction of the total steps, rounded up (HF's warmup_ratio); with warmup_steps 0
    max_steps: int | None = None  # null: `epochs` passes over the pairs
    epochs: float = 1.0
    per_device_batch_size: int = 4
    # Keep the last partial global batch (false, as the MixDPO authors' HF dataloader): with a curriculum it
    # holds the hardest pairs. Ranks pad it with zero-weight rows, so all run the same steps.
    drop_last: bool = False
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = False  # bf16 autocast over fp32 weights (GPU)


@dataclass(frozen=True)
class ScalingCfg:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP, for models that do not fit one device


@dataclass(frozen=True)
class FailureCfg:
    max_failures: int = 0  # worker-group restarts, each resuming from the last checkpoint


@dataclass(frozen=True)
class CheckpointCfg:
    every_n_steps: int = 100  # 0: only at the end
    keep: int | None = 2  # checkpoints kept in <output.dir>/train/<run.name>/; null keeps all


@dataclass(frozen=True)
class TrainConfig:
    run: RunCfg = field(default_factory=RunCfg)
    input: TrainInputCfg = field(default_factory=TrainInputCfg)
    output: TrainOutputCfg = field(default_factory=TrainOutputCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    reference: ReferenceCfg = field(default_factory=ReferenceCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    scaling: ScalingCfg = field(default_factory=ScalingCfg)
    ray: RayCfg = field(default_factory=RayCfg)
    failure: FailureCfg = field(default_factory=FailureCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)


def validate(cfg: TrainConfig) -> None:
    checks = [
        ("input.path", bool(cfg.input.path), "is required"),
        ("model.policy", bool(cfg.model.policy), "is required"),
        ("loss.beta", cfg.loss.beta > 0, "must be > 0"),
        ("loss.label_smoothing", 0 <= cfg.loss.label_smoothing < 0.5, "must be in [0, 0.5)"),
        ("input.max_length", cfg.input.max_length is None or cfg.input.max_length > 1, "must be > 1 or null"),
        ("input.max_prompt_length", cfg.input.max_prompt_length is None or cfg.input.max_prompt_length > 0,
         "must be > 0 or null"),
        ("input.max_prompt_length",
         None in (cfg.input.max_length, cfg.input.max_prompt_length)
         or cfg.input.max_prompt_length < cfg.input.max_length,
         "must be below input.max_length, so that every pair keeps completion tokens"),
        ("optim.lr", cfg.optim.lr > 0, "must be > 0"),
        ("optim.max_steps", cfg.optim.max_steps is None or cfg.optim.max_steps > 0, "must be > 0 or null"),
        ("optim.epochs", cfg.optim.epochs > 0, "must be > 0"),
        ("optim.per_device_batch_size", cfg.optim.per_device_batch_size > 0, "must be > 0"),
        ("optim.grad_accum", cfg.optim.grad_accum > 0, "must be > 0"),
        ("optim.warmup_steps", cfg.optim.warmup_steps >= 0, "must be >= 0"),
        ("optim.warmup_ratio", 0 <= cfg.optim.warmup_ratio < 1, "must be in [0, 1)"),
        ("optim.warmup_ratio", not (cfg.optim.warmup_ratio and cfg.optim.warmup_steps),
         "and optim.warmup_steps cannot both be set"),
        ("scaling.num_workers", cfg.scaling.num_workers > 0, "must be > 0"),
        ("scaling.cpus_per_worker", cfg.scaling.cpus_per_worker > 0, "must be > 0"),
        ("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps >= 0, "must be >= 0"),
        ("checkpoint.keep", cfg.checkpoint.keep is None or cfg.checkpoint.keep > 0, "must be > 0 or null"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key} {why}")
    check_choice("loss.name", cfg.loss.name, LOSSES)
    for name, w in (cfg.loss.weights or {}).items():
        check_choice(f"loss.weights.{name}", name, LOSSES)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"loss.weights.{name}: expected a number, got {w!r}")


def main(cfg: TrainConfig) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from operators.base import Resources, apply, check_columns
    from operators.read import read_parquet_files
    from operators.reflogp import ReferenceLogProbs
    from pipelines.runtime.console import say
    from pipelines.runtime.manifest import RunDir
    from pipelines.runtime.ray_start import init_ray
    from pipelines.runtime.stages import read_stage, run_stage
    from pipelines.training.batches import steps_per_epoch as steps_in_epoch
    from pipelines.training.placement import input_stamp, locate_pairs, order_values, require_sft_routes

    # --- setup: validate, start Ray, read the pairs -----------------------------------------------------
    validate(cfg)
    loss_fn = get_loss(cfg.loss.name, cfg.loss.weights)
    out_dir = resolve_path(cfg.output.dir)
    # Checked before Ray starts; local model folders become absolute (workers may run elsewhere).
    policy = model_path(cfg.model.policy, "model.policy")
    ref_model = model_path(cfg.reference.model, "reference.model") if cfg.reference.model else policy
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_gb, cfg.ray.progress)
    run = RunDir(out_dir)
    run.start("train", to_dict(cfg))
    pairs = locate_pairs(resolve_path(cfg.input.path))
    ds = read_parquet_files(pairs, file_extensions=["parquet"])
    check_columns(ReferenceLogProbs, ds.schema().names, where=f"pairs at {pairs}")
    if loss_fn.name == "mixdpo" or "mixdpo" in (cfg.loss.weights or {}):
        say(f"mixdpo: {require_sft_routes(ds, pairs)} pairs route to sft")

    # --- reference log-probs, once: a Ray Data stage written to pairs_ref/ ------------------------------
    have_ref = {"ref_chosen_logp", "ref_rejected_logp"} <= set(ds.schema().names)
    if loss_fn.needs_reference and not have_ref:
        rc = cfg.reference
        # max_prompt_length joins the fingerprint only when set, so existing pairs_ref/ folders stay valid.
        lengths = [cfg.input.max_length] + ([cfg.input.max_prompt_length] if cfg.input.max_prompt_length else [])
        fp = fingerprint(rc, ref_model, *lengths, input_stamp(pairs))
        res = Resources(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, concurrency=rc.concurrency,
                        batch_size=rc.batch_size)
        run_stage(run, "pairs_ref", fp, lambda: apply(
            ds, ReferenceLogProbs, res, model=ref_model, max_length=cfg.input.max_length,
            max_prompt_length=cfg.input.max_prompt_length,
            micro_batch_size=rc.micro_batch_size, dtype=rc.dtype,
            trust_remote_code=cfg.model.trust_remote_code), rows_in=None)
        ds = read_stage(run, "pairs_ref")
    elif have_ref:
        say("reference log-probs: already in the input, not recomputed")

    # --- schedule: global batch, steps, curriculum ------------------------------------------------------
    # Materialized once: the workers then stream blocks from the object store instead of each re-running
    # the read (with a curriculum every worker reads everything; on 2 cores re-reading cost ~15 s).
    ds = ds.materialize()
    # Ray Train splits it in its SplitCoordinator actor, whose progress bars reach the driver's log as terminal
    # escapes, line by line; the rank-0 train lines show training's progress.
    ds.context.enable_progress_bars = False
    n_pairs = ds.count()
    positions = order_values(ds)
    world = cfg.scaling.num_workers
    global_batch = world * cfg.optim.per_device_batch_size * cfg.optim.grad_accum
    steps_per_epoch = steps_in_epoch(n_pairs, global_batch, cfg.optim.drop_last)
    if steps_per_epoch == 0 or n_pairs < world:
        raise ValueError(f"{n_pairs} pairs are fewer than one global batch of {global_batch} "
                         f"(scaling.num_workers x optim.per_device_batch_size x optim.grad_accum) with "
                         f"optim.drop_last, or fewer than one per worker")
    total_steps = cfg.optim.max_steps or max(1, round(cfg.optim.epochs * steps_per_epoch))
    say(f"train: {n_pairs} pairs, global batch {global_batch}, {total_steps} steps "
        f"({total_steps / steps_per_epoch:.2f} epochs), {'curriculum by order' if positions is not None else 'shuffled'}")

    # --- train on Ray Train -----------------------------------------------------------------------------
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg, "policy": policy, "total_steps": total_steps, "n_pairs": n_pairs,
            # metrics.jsonl and the batch logs go where the checkpoints go, through the same filesystem.
            "run_fs": run.fs, "train_dir": run.path("train"),
            "steps_per_epoch": steps_per_epoch,
            "positions": ray.put(positions) if positions is not None else None,
            # A live bar (tqdm_ray) only for a terminal; into a log (`ray job logs`, CI) Ray's bar manager
            # redraws a closed bar before every later driver line, so rank 0 prints progress lines there.
            "progress": "bar" if cfg.ray.progress and sys.stderr.isatty() else "lines",
        },
        scaling_config=ScalingConfig(num_workers=world, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            # The run folder's filesystem object, not a URI for Ray to resolve again: it carries a custom
            # endpoint (MinIO, AWS_ENDPOINT_URL) to every worker. Ray Train copies each checkpoint there
            # from the worker's local folder, and a rerun with the same name resumes from the last one.
            name=cfg.run.name, storage_path=run.path("train"), storage_filesystem=run.fs,
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            # Ray Train logs each report's whole metrics dict from every rank at INFO; our rank-0 train
            # lines carry the step, loss and checkpoint. Its warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": ds},
        # A curriculum needs every row in every worker (see pipelines/training/); otherwise split.
        dataset_config=DataConfig(datasets_to_split=[] if positions is not None else "all"),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0

    # --- record -----------------------------------------------------------------------------------------
    if result.checkpoint is None:
        raise RuntimeError(f"training under {run.uri_of('train', cfg.run.name)} reported no checkpoint")
    summary = {
        "checkpoint": run.uri_at(result.checkpoint.path), "steps": total_steps, "pairs": n_pairs,
        "global_batch": global_batch, "curriculum": positions is not None, "loss": loss_fn.name,
        "seconds": round(seconds, 1), "metrics_file": run.uri_of("train", "metrics.jsonl"),
        "final_metrics": dict(result.metrics or {}),
    }
    run.set("train", summary)
    say(f"train: done in {seconds:.0f}s; final checkpoint {summary['checkpoint']}")
    return summary


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import contextlib
    import math
    import tempfile

    import ray
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from operators.logprobs import pad_token_id, pair_logps
    from pipelines.training.batches import LocalData, LocalSchedule, global_rows
    from pipelines.training.checkpoint import (
        TRAINER_STATE,
        fast_forward,
        full_state,
        load_optimizer_state,
        local_folder,
        write_checkpoint,
    )
    from pipelines.training.losses import Logps
    from pipelines.training.metrics import JsonlLog, StepMetrics
    from pipelines.training.model import disable_dropout, param_digest, wrap_model
    from pipelines.training.placement import local_rows

    # --- setup: model (from the last checkpoint when resuming), optimizer, this rank's rows ---------------
    cfg: TrainConfig = config["cfg"]
    oc, total_steps = cfg.optim, int(config["total_steps"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    loss_fn = get_loss(cfg.loss.name, cfg.loss.weights)
    tokenizer = AutoTokenizer.from_pretrained(config["policy"], trust_remote_code=cfg.model.trust_remote_code)

    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] | None = None
    source = (local_folder(checkpoint, ctx.get_local_rank(), world) if checkpoint  # once per node
              else contextlib.nullcontext(config["policy"]))
    with source as src:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                     trust_remote_code=cfg.model.trust_remote_code)
        if checkpoint:
            # weights_only: a checkpoint folder on shared storage may be writable by others, and a pickle
            # there would run code in every worker; the state is tensors and plain containers.
            state = torch.load(os.path.join(src, TRAINER_STATE), map_location="cpu", weights_only=True)
    disable_dropout(model)
    if oc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_model(model, fsdp=cfg.scaling.fsdp, device=device, world=world)
    # No weight decay on biases and norm weights (1-d), as HF Trainer.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": oc.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=oc.lr)
    warmup = oc.warmup_steps or math.ceil(oc.warmup_ratio * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    start_step = 0
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
        start_step = int(state["step"])
        # The schedule is rebuilt, not restored: a resumed run may have a new max_steps, and the lr must
        # follow the new cosine from the step reached (a restored scheduler would keep the old lr).
        fast_forward(scheduler, start_step)

    curriculum = config["positions"] is not None
    global_batch = world * oc.per_device_batch_size * oc.grad_accum
    batches = ray.train.get_dataset_shard("train").iter_batches(batch_format="pyarrow", batch_size=4096)
    rows = local_rows(batches, ray.get(config["positions"]) if curriculum else None, rank, world, global_batch,
                      oc.drop_last)
    data = LocalData.build(rows, tokenizer, cfg.input.max_length, cfg.input.max_prompt_length)
    sched = LocalSchedule(data.n_rows, oc.per_device_batch_size, oc.grad_accum, curriculum,
                          seed=cfg.run.seed, rank=rank, steps_per_epoch=config["steps_per_epoch"])
    if data.n_rows == 0 or (curriculum and oc.drop_last and data.n_rows < sched.rows_per_step):
        raise ValueError(f"rank {rank} holds {data.n_rows} pairs, fewer than one step's "
                         f"{sched.rows_per_step}")
    pad = pad_token_id(tokenizer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=oc.bf16)
    fs, train_dir = config["run_fs"], config["train_dir"]
    metrics_log = JsonlLog(fs, f"{train_dir}/metrics.jsonl") if rank == 0 else None
    batch_log = JsonlLog(fs, f"{train_dir}/batches/rank{rank}.jsonl") if cfg.output.log_batches else None
    bar = None
    if rank == 0 and config.get("progress") == "bar":
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=total_steps, desc="train", unit="step")
        bar.update(start_step)
    line_every = max(1, (total_steps - start_step) // 10)  # about ten progress lines a run

    # --- train loop ---------------------------------------------------------------------------------------
    model.train()
    last: dict[str, Any] = {}
    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        acc = StepMetrics()
        lr = scheduler.get_last_lr()[0]
        # The loss is the mean over the step's real rows of all ranks; DDP/FSDP average gradients over ranks.
        scale = world / global_rows(step, config["n_pairs"], global_batch, oc.drop_last, curriculum)
        for micro in range(oc.grad_accum):
            idx = sched.indices(step, micro)
            weight = torch.as_tensor(sched.weights(step, micro), dtype=torch.float32, device=device)
            last_micro = micro == oc.grad_accum - 1
            if cfg.scaling.fsdp:
                model.set_requires_gradient_sync(last_micro)
            # DDP: all-reduce gradients only on the last micro-batch of the step.
            sync = model.no_sync() if world > 1 and not cfg.scaling.fsdp and not last_micro \
                else contextlib.nullcontext()
            with sync:
                with autocast:
                    pol = pair_logps(model, [data.examples[i] for i in idx], pad, cfg.input.max_length)
                pol = Logps(*(t.float() for t in pol))
                ref = Logps(data.ref_chosen[idx].to(device), data.ref_rejected[idx].to(device),
                            pol.chosen_tokens, pol.rejected_tokens) if data.ref_chosen is not None else None
                loss, metrics = loss_fn(pol, ref, {"is_sft": data.is_sft[idx]}, beta=cfg.loss.beta,
                                        label_smoothing=cfg.loss.label_smoothing)
                ((loss * weight).sum() * scale).backward()
            acc.add(loss, metrics, int(((pol.chosen_tokens + pol.rejected_tokens) * weight).sum().item()), weight)
            if batch_log is not None:
                real = [i for i, w in zip(idx, weight.tolist(), strict=True) if w > 0]
                batch_log.append({"step": step + 1, "micro": micro, "rank": rank,
                                  "ids": [data.ids[i] for i in real], "pos": [data.pos[i] for i in real],
                                  "padded": len(idx) - len(real)})
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), oc.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        means, n_rows, n_tokens = acc.reduce(device)
        dt = time.perf_counter() - t_step
        done = step + 1
        last = {"step": done, **means, "grad_norm": float(grad_norm), "lr": lr, "pairs": n_rows,
                "pairs_per_s": n_rows / dt, "tokens_per_s": n_tokens / dt,
                "epoch": done / config["steps_per_epoch"]}
        if rank == 0:
            metrics_log.append({**last, "time": time.time()})
            progress = f"train loss {means['loss']:.4f} {last['pairs_per_s']:.1f} pairs/s"
            if bar is not None:
                bar.set_description(progress)
                bar.update(1)
            elif (done - start_step) % line_every == 0 or done == total_steps:
                # Not print(): Ray Train patches it into its logger, which echoes each line twice here.
                sys.stderr.write(f"[prefsift] {progress}, step {done}/{total_steps}\n")
                sys.stderr.flush()

        # --- checkpoint: every N steps and at the end ---------------------------------------------------
        every = cfg.checkpoint.every_n_steps
        if done == total_steps or (every and done % every == 0):
            if done == total_steps:
                # The trained weights' digest goes beside the checkpoint that must hold them (tests load the
                # checkpoint and compare). FSDP ranks hash the same gathered weights: in sync by design.
                digests: list[Any] = [param_digest(model)] * world
                if not cfg.scaling.fsdp:
                    if world > 1:
                        torch.distributed.all_gather_object(digests, digests[0])
                    last["params_in_sync"] = len(set(digests)) == 1
                last["param_digest"] = digests[0]
            for log in (metrics_log, batch_log):
                if log is not None:
                    log.flush()  # on an object store, the lines so far, up to this checkpoint
            model_state, optim_state = full_state(model, optimizer)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    write_checkpoint(tmp, model, model_state, tokenizer,
                                        {"step": done, "optimizer": optim_state},
                                        {"step": done, "total_steps": total_steps, "metrics": last})
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(last, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{done:06d}")

    # --- cleanup --------------------------------------------------------------------------------------------
    if bar is not None:
        bar.close()


def cli(argv: list[str] | None = None) -> int:
    """The same path as `prefsift train`: the same checks before Ray and the same one-line errors."""
    from pipelines.tools.cli import main as prefsift

    return prefsift(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(cli())
