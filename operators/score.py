"""Score: reward-model scores for every response of a prompt row, written into each response struct.

A row is one prompt with its `responses` list (DESIGN.md, "Stages and their data"). The scorer flattens
the batch's responses, sorts them by length into micro-batches (padding stays within similar lengths),
scores them, and nests the results back: each struct gains `overall`, `len` and, with aspects,
`scores` {aspect: value}; `problem` is null or why that response has no score.

Models and aspects:
* a model with several outputs scores one aspect per output, named by `RewardModelCfg.aspects` or else by
  its `config.id2label`;
* a 1-output model named with one aspect (`aspects: [helpfulness]`) scores that aspect, so several
  single-aspect models make one multi-aspect scorer;
* a single 1-output model with no aspect name is a scalar reward model: `overall` is its output and there
  is no `scores` struct.
With aspects, `overall` is their mean (`score.overall: mean`) or the one aspect `score.overall` names.

The text a reward model reads is its own chat template applied to [user prompt (or the prompt messages),
assistant response]; a tokenizer without a template reads `prompt + "\\n" + response`. A text longer than
`score.max_length` tokens keeps its *end* (and a leading bos): a sequence classifier reads the last token,
and the end holds the response's last words and the template's closing tokens, which the score is trained
on; cutting the end instead would score an arbitrary point mid-response.

`len` is len(text) in characters, the definition ingested data uses too (operators.ingest).
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.base import QUARANTINE, Operator, Resources, niceness_problem, with_quarantine
from operators.generate import conversation
from operators.responses import one_array


@dataclass(frozen=True)
class RewardModelCfg:
    path: str = ""
    # Names for a multi-head model's outputs; null reads them from config.id2label. A 1-head model with one
    # aspect name scores that aspect (several single-aspect models then make a multi-aspect scorer).
    aspects: list[str] | None = None


@dataclass(frozen=True)
class ScoreCfg:
    models: list[RewardModelCfg] = field(default_factory=list)
    # hf: transformers forward passes over length-sorted micro-batches. vllm: vLLM's pooling runner
    # (classify, raw logits). auto: the faster one measured for the device (resolve_backend).
    backend: Literal["auto", "hf", "vllm"] = "auto"
    # How `reward` is formed from aspects: `mean` of all aspects, or the name of one aspect.
    overall: str = "mean"
    # Python reward callables, "module:function" (operators.reward_functions): a list names each aspect by
    # its function (a lone one without models is a scalar reward), a mapping is {aspect: "module:function"}.
    functions: list[str] | dict[str, str] | None = None
    batch_size: int = 64  # prompt rows per map_batches call, each with its K responses
    micro_batch_size: int = 16  # rows per forward pass, after sorting by length
    max_length: int = 1024
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    concurrency: int = 1
    # map_batches calls in flight per actor (RewardScorer.__call__ is async, so this holds within one input
    # block too): the next call's texts are templated and tokenized in one thread while the models score the
    # current call's in another (the models themselves run one call at a time).
    max_concurrent_batches: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    gpu_memory_utilization: float = 0.3  # vllm backend on a GPU: its KV cache share of the card
    # vllm backend: an explicit KV cache size instead of that share. null: on a GPU the share; on CPU room for
    # 16,384 tokens (or 4 x max_length) of the model, not a share of the machine's memory
    # (operators.vllm_engines.pooling_kv_cache_gib).
    kv_cache_gib: float | None = None
    # vllm backend only, as generate.niceness: the engines' processes (engine core, model worker) run at it,
    # and the actor's own threads (templating, tokenizing, Ray's) go back to Ray's worker niceness, 15, once
    # every engine has started (operators.vllm_engines.engine_first). null leaves all at Ray's 15.
    niceness: int | None = 0
    trust_remote_code: bool = False
    max_restarts: int | None = None


def model_aspects(num_labels: int, cfg_aspects: list[str] | None, id2label: dict[int, str] | None,
                  path: str) -> list[str] | None:
    """Aspect names for one model's outputs; None marks a scalar (1-output, unnamed) reward model."""
    if cfg_aspects:
        if len(cfg_aspects) != num_labels:
            raise ValueError(f"score.models: {path} has {num_labels} output(s) but aspects names "
                             f"{len(cfg_aspects)}: {cfg_aspects}")
        return list(cfg_aspects)
    if num_labels == 1:
        return None
    labels = id2label or {}
    return [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]  # type: ignore[call-overload]


def combine_aspects(per_model: list[list[str] | None], paths: list[str], overall: str) -> list[str]:
    """All aspect names, in model order; checks that they are unique and that `overall` can be formed."""
    if len(per_model) == 1 and per_model[0] is None:
        if overall != "mean":
            raise ValueError(f"score.overall: {overall!r} names an aspect, but {paths[0]} is a scalar reward "
                             "model with no aspects; use overall: mean")
        return []
    names: list[str] = []
    for aspects, path in zip(per_model, paths, strict=True):
        if aspects is None:
            raise ValueError(f"score.models: {path} has one output and no aspect name; with several reward "
                             "models, name each model's aspects (e.g. aspects: [helpfulness])")
        for a in aspects:
            if a in names:
                raise ValueError(f"score.models: aspect {a!r} is scored by more than one model")
            names.append(a)
    if overall != "mean" and overall not in names:
        raise ValueError(f"score.overall: {overall!r} is not an aspect; choose mean or one of {names}")
    return names


def overall_reward(aspect_values: np.ndarray, aspects: list[str], overall: str) -> np.ndarray:
    """(rows, aspects) -> rows. A NaN in any aspect makes the mean NaN, which quarantines the row."""
    if overall == "mean":
        return aspect_values.mean(axis=1)
    return aspect_values[:, aspects.index(overall)]


def truncate_keep_end(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and max_length > 1:
        return [ids[0]] + ids[len(ids) - max_length + 1:]
    return ids[len(ids) - max_length:]


def length_buckets(lengths: list[int], micro_batch_size: int) -> list[list[int]]:
    """Row indices sorted by length (stable), cut into micro-batches: padding stays within similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


@dataclass
class _Model:
    path: str
    model: Any  # a transformers sequence classifier, or (vllm backend) operators.vllm_engines.PoolingEngine
    tokenizer: Any
    aspects: list[str] | None
    pad_id: int
    num_labels: int

    def encode_many(self, convs: list[list[dict[str, str]]], prompts: list[str], responses: list[str],
                    max_length: int) -> list[list[int]]:
        """Each response's token ids, templated and tokenized as one batch (one call into the fast
        tokenizer, not one per text)."""
        if not responses:
            return []
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            texts = tok.apply_chat_template([c + [{"role": "assistant", "content": r}]
                                             for c, r in zip(convs, responses, strict=True)], tokenize=False)
            ids = tok(texts, add_special_tokens=False)["input_ids"]  # the template writes its own specials
        else:
            ids = tok([p + "\n" + r for p, r in zip(prompts, responses, strict=True)],
                      add_special_tokens=True)["input_ids"]
        return [truncate_keep_end(list(x), max_length, tok.bos_token_id) for x in ids]

    def score(self, encoded: list[list[int]], micro_batch_size: int) -> np.ndarray:
        """(rows, outputs) float64, in input order. Right padding: positions stay 0..L-1 as in an unpadded
        forward, and the model finds each row's last real token through its pad_token_id."""
        if not hasattr(self.model, "parameters"):
            return self.model.classify(encoded)
        import torch

        device = next(self.model.parameters()).device
        out = np.empty((len(encoded), self.num_labels), dtype=np.float64)
        with torch.inference_mode():
            for rows in length_buckets([len(e) for e in encoded], micro_batch_size):
                width = max(len(encoded[i]) for i in rows)
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, i in enumerate(rows):
                    ids[j, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[j, : len(encoded[i])] = 1
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                out[rows] = logits.float().cpu().numpy()
        return out


# What score.backend=auto picks on CPU, from the side-by-side measurement (README, Performance: scoring).
AUTO_CPU_BACKEND = "vllm"


def resolve_backend(cfg: ScoreCfg, cuda: bool) -> str:
    """`score.backend`, with auto resolved to the faster backend measured on this kind of device (README,
    Performance: scoring); hf when vLLM is not installed."""
    if cfg.backend != "auto":
        return cfg.backend
    if importlib.util.find_spec("vllm") is None:
        return "hf"
    return "vllm" if cuda else AUTO_CPU_BACKEND


def _load(path: str, cfg_aspects: list[str] | None, cfg: ScoreCfg) -> _Model:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    cuda = cfg.num_gpus > 0 and torch.cuda.is_available()
    # auto: bf16 on GPU (throughput, and what RMs are trained in); fp32 on CPU, exact for the test models.
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cuda else "float32")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    pad = config.pad_token_id
    if pad is None:
        # Batched sequence classification needs a pad id to find the last token; many RMs ship without one.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"score.models: {path} has no pad_token_id, pad token or eos token to pad with")
    aspects = model_aspects(config.num_labels, cfg_aspects, config.id2label, path)
    if resolve_backend(cfg, cuda) == "vllm":
        from operators.vllm_engines import PoolingEngine

        model: Any = PoolingEngine(path, dtype, cfg.max_length, cfg.gpu_memory_utilization, cuda,
                                   cfg.trust_remote_code, cfg.kv_cache_gib)
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=cfg.trust_remote_code
        ).to("cuda" if cuda else "cpu").eval()
        model.config.pad_token_id = pad
    return _Model(path, model, tokenizer, aspects, int(pad), int(config.num_labels))


def flatten_responses(responses: pa.Array) -> tuple[pa.StructArray, np.ndarray, np.ndarray]:
    """A list<struct> column -> (every response struct, its row, list offsets from 0); null lists hold none."""
    lengths = np.asarray(pc.fill_null(pc.list_value_length(responses), 0), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = pc.list_flatten(responses)  # skips null lists, respects slicing
    rows = np.repeat(np.arange(len(responses)), lengths)
    return flat, rows, offsets


def nest_responses(responses: pa.Array, flat: pa.StructArray, offsets: np.ndarray) -> pa.Array:
    """The inverse of flatten_responses with new structs: same lists, same nulls."""
    mask = responses.is_null() if responses.null_count else None
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), flat, mask=mask)


@dataclass
class ToScore:
    """What every scorer reads first from a batch: its responses flattened, which prompt rows cannot be
    scored and why, and which responses to score."""

    responses: pa.Array  # the batch's `responses` column, one chunk
    flat: pa.StructArray  # every response struct, row-major
    names: list[str]  # the structs' field names
    rows: np.ndarray  # each response's prompt row
    offsets: np.ndarray
    texts: list[str | None]
    problems: list[str | None]  # per response: null, or why it is not scored (one found upstream stays)
    convs: list[list[dict[str, str]] | None]  # per row: the prompt as a chat; None for a row not scored
    prompt_text: list[str | None]  # per row: the prompt as one text (the turns joined for messages)
    row_reasons: list[str | None]  # per row: why it is quarantined here (upstream reasons are kept apart)
    todo: list[int]  # flat indices of the responses to score


def to_score(batch: pa.Table) -> ToScore:
    n = batch.num_rows
    prompts = batch.column("prompt").to_pylist() if "prompt" in batch.column_names else [None] * n
    messages = batch.column("messages").to_pylist() if "messages" in batch.column_names else [None] * n
    upstream = batch.column(QUARANTINE).to_pylist() if QUARANTINE in batch.column_names else [None] * n
    responses = one_array(batch.column("responses"))
    flat, rows, offsets = flatten_responses(responses)
    names = [t.name for t in flat.type]
    texts = flat.field("text").to_pylist()
    # A problem found upstream (the JSONL reader's wrong-typed response) stays, and is not scored.
    problems = flat.field("problem").to_pylist() if "problem" in names else [None] * len(texts)
    out = ToScore(responses, flat, names, rows, offsets, texts, problems, [None] * n, [None] * n, [None] * n, [])
    for i in range(n):
        if upstream[i] is not None:
            continue  # set aside upstream: keeps its reason, costs no scoring
        conv = conversation(prompts[i], messages[i])
        if conv is None:
            out.row_reasons[i] = "missing_prompt"
        elif offsets[i] == offsets[i + 1]:
            out.row_reasons[i] = "no_responses"  # a null or empty list: nothing to score or compare
        else:
            out.convs[i] = conv
            out.prompt_text[i] = prompts[i] if prompts[i] is not None else "\n".join(c["content"] for c in conv)
    for f, (row, text) in enumerate(zip(rows, texts, strict=True)):
        if out.convs[row] is None or problems[f] is not None:
            continue  # a quarantined row's responses are left unscored
        if text is None:
            problems[f] = "missing_response"
        else:
            out.todo.append(f)
    return out


SCORE_FIELDS = ("overall", "len", "scores", "problem")


class RewardScorer(Operator):
    """One prompt row in, one out: every response struct gets `overall`, `len`, `scores` (with aspects) and
    `problem` (null, or why it could not be scored). A row without a usable prompt is quarantined whole."""

    name = "score"
    requires = ("responses",)
    requires_any = (("prompt", "messages"),)
    adds = ("responses",)  # fields inside each response struct

    def __init__(self, cfg: ScoreCfg):
        if not cfg.models:
            raise ValueError("score.models is empty: give at least one reward model path")
        if cfg.micro_batch_size < 1 or cfg.max_length < 2 or cfg.max_concurrent_batches < 1:
            raise ValueError("score.micro_batch_size and score.max_concurrent_batches must be >= 1 and "
                             "score.max_length >= 2")
        check_niceness(cfg)
        self.cfg = cfg
        self.models = [_load(m.path, m.aspects, cfg) for m in cfg.models]
        if any(not hasattr(m.model, "parameters") for m in self.models):  # vLLM engines
            from operators.vllm_engines import engine_first

            engine_first(cfg.niceness)  # after the last engine: each forked at the actor's score.niceness
        # Calls run in threads (max_concurrent_batches): one call tokenizes while another runs the models.
        # Each side takes one call at a time; a fast tokenizer used from two threads at once can fail
        # ("Already borrowed").
        self._models_busy = threading.Lock()
        self._tokenizers_busy = threading.Lock()
        self._slots: asyncio.Semaphore | None = None
        self.aspects = combine_aspects([m.aspects for m in self.models], [m.path for m in self.models],
                                       cfg.overall)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """Async, so that Ray Data runs `max_concurrent_batches` calls at once on this actor even when they
        come from one input block: a task carries every batch of its block, and a synchronous operator's
        batches of one task run one after another (Ray Data overlaps only an async operator's). One call's
        templating and tokenizing then run in a thread while another call's texts are in the models, and
        the models never wait for the tokenizer between calls."""
        # Ray Data runs up to max(4, the largest max_concurrency of the run's operators) batches of one task
        # at once (operators.base._allow_async_calls_per_task): the scorer holds itself to its own number.
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.max_concurrent_batches)  # on the loop that runs the calls
        async with self._slots:
            b, encoded = await asyncio.to_thread(self.encode, batch)
            values = await asyncio.to_thread(self.run_models, encoded)
            return await asyncio.to_thread(self.assemble, batch, b, values)

    def encode(self, batch: pa.Table) -> tuple[ToScore, list[list[list[int]]]]:
        """The batch's responses to score, and each model's token ids for them (one list per model)."""
        b = to_score(batch)
        with self._tokenizers_busy:
            encoded = [m.encode_many([b.convs[b.rows[f]] for f in b.todo],
                                     [b.prompt_text[b.rows[f]] for f in b.todo],
                                     [b.texts[f] for f in b.todo], self.cfg.max_length) for m in self.models]
        return b, encoded

    def run_models(self, encoded: list[list[list[int]]]) -> np.ndarray:
        """(responses, outputs of every model side by side) float64: a scalar model gives column 0."""
        if not encoded[0]:
            return np.empty((0, sum(m.num_labels for m in self.models)))
        with self._models_busy:
            cols = [m.score(enc, self.cfg.micro_batch_size) for m, enc in zip(self.models, encoded, strict=True)]
        return np.concatenate(cols, axis=1)

    def assemble(self, batch: pa.Table, b: ToScore, values: np.ndarray) -> pa.Table:
        flat, names, texts, problems, todo = b.flat, b.names, b.texts, b.problems, b.todo
        m = len(texts)
        all_values = np.full((m, values.shape[1]), np.nan)
        all_values[todo] = values
        scored = np.zeros(m, dtype=bool)
        scored[todo] = True
        overall = all_values[:, 0] if not self.aspects else overall_reward(all_values, self.aspects,
                                                                          self.cfg.overall)
        finite = np.isfinite(all_values).all(axis=1) & np.isfinite(overall)
        for f in np.flatnonzero(scored & ~finite):
            problems[f] = "non_finite_reward"

        fields = {name: flat.field(name) for name in names if name not in SCORE_FIELDS}
        fields["overall"] = pa.array(overall, type=pa.float64(), mask=~scored)
        # Characters, not tokens: the definition the ingest path uses, so length statistics compare.
        fields["len"] = pc.fill_null(pc.utf8_length(flat.field("text").cast(pa.string())), 0).cast(pa.int64())
        if self.aspects:
            fields["scores"] = pa.StructArray.from_arrays(
                [pa.array(all_values[:, j], type=pa.float64(), mask=~scored) for j in range(len(self.aspects))],
                names=self.aspects)
        fields["problem"] = pa.array(problems, type=pa.string())
        new_flat = pa.StructArray.from_arrays(list(fields.values()), names=list(fields))
        out = batch.set_column(batch.column_names.index("responses"), "responses",
                               nest_responses(b.responses, new_flat, b.offsets))
        return with_quarantine(out, b.row_reasons)

    def close(self) -> None:
        for m in self.models:
            if hasattr(m.model, "close"):
                m.model.close()


def check_niceness(cfg: ScoreCfg) -> None:
    if problem := niceness_problem("score.niceness", cfg.niceness):
        raise ValueError(problem)


def scorer_resources(cfg: ScoreCfg) -> Resources:
    # auto resolves alike on CPU and GPU while vLLM is installed (resolve_backend), so the driver can tell.
    check_niceness(cfg)
    vllm = resolve_backend(cfg, cuda=False) == "vllm"
    return Resources(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, concurrency=cfg.concurrency,
                     batch_size=cfg.batch_size, max_concurrency=cfg.max_concurrent_batches,
                     max_restarts=cfg.max_restarts, niceness=cfg.niceness if vllm else None, closes_children=vllm)

