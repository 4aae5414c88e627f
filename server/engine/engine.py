"""The engine: one thread that owns every model, cache and tensor.

Requests arrive through `submit` (on the asyncio event loop) and a thread-safe inbox;
outputs go back to each request's asyncio queue with `loop.call_soon_threadsafe`. The
thread's loop reads as three verbs: admit (prefill waiting requests into free slots),
step (one speculative step for every running slot, batched) and emit (detokenize, check
EOS / stop strings / max_tokens, push outputs).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.config import ServerConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.loading import DEMO_DESCRIPTION, DEMO_MODEL_NAME, load_models
from server.engine.prompt import PromptBuilder
from server.engine.speculative import SlotState, SpeculativeDecoder
from server.engine.target import TargetModel
from server.engine.tree_size import CALIBRATION_PROMPT, choose_tree_size
from server.engine.types import (
    FINISH_LENGTH,
    FINISH_STOP,
    EngineError,
    PreparedPrompt,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)

logger = logging.getLogger(__name__)

@dataclass
class _Request:
    request_id: str
    prompt: PreparedPrompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)
    state: SlotState | None = None
    detokenizer: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None
    completion_tokens: int = 0
    last_emit: float | None = None
    spec_steps: int = 0
    spec_accepted: int = 0
    finished: bool = False
    unsent_token_ids: list[int] = field(default_factory=list)  # counted, but their text is held back


class Engine:
    """Serves one target (with an optional draft) to many concurrent requests."""

    def __init__(self, config: ServerConfig, metrics=None):
        self.config = config
        self.metrics = metrics
        self.model_name = config.served_model_name or (DEMO_MODEL_NAME if config.model is None else Path(config.model).name)
        self.model_description = DEMO_DESCRIPTION if config.model is None else "loading"
        self.max_model_len = config.max_model_len or 4096
        self._inbox: queue.Queue[_Request] = queue.Queue()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: dict[int, _Request] = {}  # slot -> request
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self._num_waiting = 0
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._alive = True
        self._closed = False  # set under _lock when the thread stops, after which submit raises
        self._thread: threading.Thread | None = None
        self.load_error: str | None = None
        self.target: TargetModel | None = None
        self.decoder: SpeculativeDecoder | None = None
        self.prompts: PromptBuilder | None = None
        self.tree_size_choice = None

    # ----- lifecycle -------------------------------------------------------------------

    def load(self) -> None:
        """Load target and draft and allocate the caches (blocking)."""
        self.target, draft, self.model_name, self.model_description = load_models(self.config)
        self.max_model_len = min(self.config.max_model_len or self.target.max_position_embeddings,
                                 self.target.max_position_embeddings)
        total_tokens = self.config.tree_total_tokens or 2 * self.config.tree_top_k
        self.decoder = SpeculativeDecoder(
            self.target, draft, self.config.max_num_seqs, self.max_model_len,
            self.config.tree_depth, self.config.tree_top_k, total_tokens,
            compressor_mode=self.config.draft_compressor, visual_budget=self.config.draft_visual_budget,
        )
        self.prompts = PromptBuilder(self.target, self.max_model_len)
        if draft is not None and self.config.tree_total_tokens is None:
            self._choose_tree_size()
        self._detokenizer_tokenizer = copy.deepcopy(self.target.tokenizer)
        if self.decoder.draft is None:
            drafting = "off"
        else:
            drafting = f"on ({self.decoder.total_tokens}-token tree, compressor {self.decoder.compressor_mode})"
        logger.info(
            "engine ready: model %s, draft %s, %d slots of %d tokens, KV cache %.1f MiB",
            self.model_name, drafting, self.config.max_num_seqs,
            self.max_model_len, self.decoder.kv_cache_bytes() / 2**20,
        )

    def _choose_tree_size(self) -> None:
        calibration = self.prompts.build([{"role": "user", "content": CALIBRATION_PROMPT}])
        choice = choose_tree_size(self.decoder, calibration.token_ids)
        for size, verify, committed, rate in choice.table:
            logger.info("tree size %3d: verify %.1f ms, expected %.2f tokens per step, %.1f tokens/s",
                        size, verify * 1000, committed, rate)
        if choice.total_tokens == 1:
            logger.warning("drafting off: on this device the draft's expected gain does not pay for its cost "
                           "(set --tree-total-tokens to force a tree)")
            self.decoder.draft = None
        else:
            logger.info("chose a draft tree of %d tokens (override with --tree-total-tokens)", choice.total_tokens)
            self.decoder.total_tokens = choice.total_tokens
        self.tree_size_choice = choice

    def start(self, load: bool = True) -> None:
        """Start the engine thread; with `load`, the models load on that thread first."""
        # NOTE: CPU decoding was about 5x slower when the process's first parallel torch op
        # ran on a thread other than the main one (torch 2.13, GNU OpenMP, 2 cores). So one
        # small op initialises the thread pool from the calling thread first.
        torch.ones(64, 64) @ torch.ones(64, 64)
        self._thread = threading.Thread(target=self._main, args=(load,), name="specvlm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._alive

    @property
    def alive(self) -> bool:
        return self._alive

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    # ----- client side (event loop and HTTP worker threads) ----------------------------

    def prepare(self, messages: list[dict]) -> PreparedPrompt:
        if self.prompts is None:
            raise EngineError("the model is still loading; retry when /health returns 200")
        return self.prompts.build(messages)

    def submit(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams):
        if not self.ready:
            raise EngineError("the engine is not ready; retry when /health returns 200")
        request = _Request(request_id, prompt, params, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self._closed:
                raise EngineError("the engine has stopped; retry when /health returns 200")
            if self._num_waiting >= self.config.max_waiting_requests:
                raise QueueFullError(
                    f"{self._num_waiting} requests are waiting (--max-waiting-requests "
                    f"{self.config.max_waiting_requests}); retry later"
                )
            self._num_waiting += 1
            # Put under the lock, so that `_fail_remaining` cannot miss it.
            self._inbox.put(request)
        return self._stream(request)

    async def _stream(self, request: _Request):
        try:
            while True:
                output = await request.outputs.get()
                yield output
                if output.finish_reason is not None or output.error is not None:
                    return
        finally:
            if not request.finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    # ----- engine thread ---------------------------------------------------------------

    def _main(self, load: bool) -> None:
        try:
            if load:
                self.load()
            self._ready.set()
            while not self._stopping.is_set():
                self._receive(block=not self._running and not self._waiting)
                self._drop_aborted()
                self._admit()
                if self._running:
                    self._step()
                self._update_gauges()
        except Exception as error:  # noqa: BLE001 - the thread must report any failure
            logger.exception("engine thread failed")
            self.load_error = f"{type(error).__name__}: {error}"
            self._alive = False
            self._fail_remaining("the engine stopped after an internal error")
            self._ready.set()
        else:
            self._fail_remaining("the engine stopped because the server is shutting down")

    def _fail_remaining(self, message: str) -> None:
        """Refuse new requests, then end every request not yet finished with an error output.

        Without this, a client waiting on a request that the stopped thread will never
        serve would wait forever.
        """
        with self._lock:
            self._closed = True
        self._receive(block=False)
        remaining = [request for request in [*self._waiting, *self._running.values()] if not request.finished]
        if remaining:
            logger.warning("ending %d unfinished request(s) with an error: %s", len(remaining), message)
        for request in remaining:
            self._fail(request, message)
        self._waiting.clear()
        self._running.clear()

    def _receive(self, block: bool) -> None:
        try:
            request = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                self._waiting.append(request)
                request = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_aborted(self) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
        if not aborted:
            return
        for request in [r for r in self._waiting if r.request_id in aborted]:
            self._waiting.remove(request)
            self._finish_aborted(request)
            with self._lock:
                self._num_waiting -= 1
        for slot, request in list(self._running.items()):
            if request.request_id in aborted:
                del self._running[slot]
                self._finish_aborted(request)

    def _finish_aborted(self, request: _Request) -> None:
        if request.finished:
            return
        request.finished = True
        logger.info("request %s aborted after %d tokens", request.request_id, request.completion_tokens)
        if self.metrics:
            self.metrics.on_aborted()

    def _free_slots(self) -> list[int]:
        return [slot for slot in range(self.config.max_num_seqs) if slot not in self._running]

    def _admit(self) -> None:
        for slot in self._free_slots():
            if not self._waiting:
                return
            request = self._waiting.popleft()
            with self._lock:
                self._num_waiting -= 1
            try:
                self._prefill(slot, request)
            except Exception:  # noqa: BLE001 - one bad request must not stop the others
                logger.exception("prefill failed for request %s", request.request_id)
                self._fail(request, "prefill failed with an internal error")
                self._running.pop(slot, None)

    def _prefill(self, slot: int, request: _Request) -> None:
        queued = time.monotonic() - request.arrival
        params = request.params
        if not params.greedy:
            request.generator = torch.Generator()
            request.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        request.detokenizer = IncrementalDetokenizer(self._detokenizer_tokenizer, params.stop)
        token_ids = torch.tensor(request.prompt.token_ids, dtype=torch.long)
        request.state = self.decoder.prefill(slot, token_ids, request.prompt.pixel_values, params, request.generator)
        self._running[slot] = request
        choices = request.state.compressor_choices
        if choices:
            logger.debug("request %s: draft visual tokens %s", request.request_id,
                         ", ".join(f"{c.primitive} {c.target_tokens}->{c.draft_tokens}" for c in choices))
        if self.metrics:
            visual = request.prompt.num_visual_tokens
            draft_visual = sum(choice.draft_tokens for choice in choices)
            self.metrics.on_admitted(len(request.prompt.token_ids), visual, draft_visual, queued)
            for choice in choices:
                self.metrics.on_compressor_selected(choice.primitive)
        self._emit(request, [request.state.root_token])

    def _step(self) -> None:
        requests = list(self._running.values())
        try:
            results = self.decoder.step(
                [r.state for r in requests], [r.params for r in requests], [r.generator for r in requests]
            )
        except Exception:  # noqa: BLE001 - fail the batch, keep serving
            logger.exception("decoding step failed for requests %s", [r.request_id for r in requests])
            for request in requests:
                self._running.pop(request.state.slot, None)
                self._fail(request, "decoding failed with an internal error")
            return
        for request, result in zip(requests, results):
            returned = self._emit(request, result.committed)
            if self.decoder.draft is not None:
                accepted = min(len(result.committed) - 1, returned)
                request.spec_steps += 1
                request.spec_accepted += accepted
                if self.metrics:
                    positions = [1] * accepted + [0] * (self.config.tree_depth - accepted)
                    self.metrics.on_spec_step(result.num_draft_tokens, positions)

    def _emit(self, request: _Request, tokens: list[int]) -> int:
        """Push the committed tokens' text; return how many tokens were returned (counted)."""
        text, count, finish = "", 0, None
        eos = self.target.eos_token_ids
        prompt_len = len(request.prompt.token_ids)
        for token in tokens:
            count += 1
            request.completion_tokens += 1
            if token in eos and not request.params.ignore_eos:
                finish = FINISH_STOP
                break
            text += request.detokenizer.add_token(token)
            if request.detokenizer.stopped:
                finish = FINISH_STOP
                break
            if request.completion_tokens >= request.params.max_tokens:
                finish = FINISH_LENGTH
                break
            if prompt_len + request.completion_tokens >= self.max_model_len:
                finish = FINISH_LENGTH
                break
        if finish is not None and not request.detokenizer.stopped:
            text += request.detokenizer.flush()

        now = time.monotonic()
        if self.metrics:
            if request.last_emit is None:
                self.metrics.on_first_token(now - request.arrival)
            self.metrics.on_tokens(count, 0.0 if request.last_emit is None else now - request.last_emit)
        request.last_emit = now
        request.unsent_token_ids.extend(tokens[:count])
        if finish is not None:
            self._finish(request, finish, text, request.unsent_token_ids)
        elif text:
            self._push(request, RequestOutput(request.request_id, text=text, token_ids=request.unsent_token_ids))
            request.unsent_token_ids = []
        return count

    def _finish(self, request: _Request, reason: str, text: str, tokens: list[int]) -> None:
        request.finished = True
        self._running.pop(request.state.slot, None)
        seconds = time.monotonic() - request.arrival
        self._push(request, RequestOutput(
            request.request_id, text=text, token_ids=tokens, finish_reason=reason,
            prompt_tokens=len(request.prompt.token_ids), completion_tokens=request.completion_tokens,
            spec_steps=request.spec_steps, spec_accepted_tokens=request.spec_accepted,
            compressor_choices=[choice.primitive for choice in request.state.compressor_choices],
            draft_visual_tokens=sum(choice.draft_tokens for choice in request.state.compressor_choices),
        ))
        if self.metrics:
            self.metrics.on_finished(reason, seconds)
        logger.debug("request %s finished (%s) after %d tokens", request.request_id, reason, request.completion_tokens)

    def _fail(self, request: _Request, message: str) -> None:
        request.finished = True
        self._push(request, RequestOutput(request.request_id, error=message))

    def _push(self, request: _Request, output: RequestOutput) -> None:
        try:
            request.loop.call_soon_threadsafe(request.outputs.put_nowait, output)
        except RuntimeError:  # the client's event loop is closed, so the output is dropped
            logger.debug("dropping output of request %s: event loop closed", request.request_id)

    def _update_gauges(self) -> None:
        if not self.metrics:
            return
        self.metrics.set_queue(len(self._running), len(self._waiting) + self._inbox.qsize())
        used = sum(r.state.cache_len for r in self._running.values())
        self.metrics.set_kv_cache_usage(used / (self.config.max_num_seqs * self.max_model_len))
