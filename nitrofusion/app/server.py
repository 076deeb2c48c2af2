"""The app's HTTP server: warm models, "latest request wins" scheduling and a JSON API.

API (JSON in, JSON or PNG out; every error is JSON ``{"error": "<one line>"}``, never a traceback):

``POST /api/generate`` with a JSON object::

    {"prompt": str,                  required, not blank
     "steps": int,                   one of the model's steps (GET /api/models); default: its default_steps
     "seed": int >= 0 | null | "random",   default null = a fresh random seed
     "width": int, "height": int,    default: the model's size; multiples of its size_multiple, <= max_size
     "model": str,                   a name from GET /api/models; default: the first model
     "client": str,                  optional: requests with the same client id supersede each other
     "request_id": int}              optional: per-client counter; a lower id than one already seen is stale

  200 ``image/png`` (prompt, seed, steps, model... as PNG text chunks) with headers ``X-Seed``, ``X-Steps``,
  ``X-Width``, ``X-Height``, ``X-Model``, ``X-Elapsed-Ms`` (generation time), ``X-Queue-Ms`` (time waiting for
  the model), ``X-Prompt-Truncated`` (``true``/``false``), ``X-Prompt-Tokens``, ``X-Token-Limit``, and
  ``X-Request-Id`` when one was sent, and ``X-Superseded: true`` on an image whose client sent a newer request
  while it was drawn (delivered: the compute is spent, and the page shows it if nothing newer is on screen).
  400 bad input (blank prompt, bad size, malformed JSON); 422 wrong types or steps the model does not offer;
  404 unknown model; 409 superseded (``{"error": ..., "superseded": true}``): a newer request of the same client
  arrived before this one was drawn, so it is not rendered; 503 the model's queue is full (``{"error": ...,
  "busy": true}``, ``Retry-After: 1``: the one 503 to retry), out of memory ("try a smaller size"), or the
  server is shutting down (``AppServer``: waiting requests are answered then, not drawn);
  413 body too large; 499 (empty, never read) the client closed its connection while the request waited.

``GET /api/models``: ``{"default": name, "models": [{name, source, sampler, default_size, size_multiple,
max_size, sizes, steps, default_steps, token_limit}, ...]}``: a distilled model's steps are 1-4 (default 1); a
multi-step teacher's run up to its own step count (its default), to set beside a student at the same prompt.

``GET /api/health``: ``{"status": "ok", "models": {name: {"running": bool, "waiting": int, "completed": int,
"superseded": int, "stale": int, "busy": int, "failed": int, "abandoned": int}}}``: ``superseded`` counts every
409 (replaced while waiting, stale on arrival), ``stale`` the images delivered with ``X-Superseded: true``,
``abandoned`` the requests whose client closed its connection while they waited (their place is freed at once).

Scheduling: each model has one worker thread (one generation at a time, the event loop stays free) and a
bounded line of waiting requests holding at most one request per client. A client's new request takes the
place in line of its older waiting one, which is answered 409 at once, so a typing user is never starved by
the line and stale keystrokes are dropped, not queued. A request is rendered only if it is still its client's
newest when it starts (otherwise 409); one superseded while drawn is delivered, marked.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from nitrofusion.app import ModelSpec
from nitrofusion.errors import Interrupted, UserError, is_out_of_memory

__all__ = [
    "AppServer",
    "ClientSlots",
    "LoadedModel",
    "ModelSpec",
    "ModelWorker",
    "ServerThread",
    "create_app",
    "load_models",
]

log = logging.getLogger("nitrofusion.app")

STUDENT_STEPS = (1, 2, 3, 4)  # a distilled model: NitroFusion's shift-LCM range
TEACHER_STEPS = (1, 2, 4, 8, 16)  # a multi-step teacher: these up to its own count, and that count
MAX_REQUEST_STEPS = 1000  # the type's bound; a model's own steps are checked per request
DEFAULT_MAX_SIZE = 1024
DEFAULT_QUEUE_SIZE = 32
MAX_BODY_BYTES = 64 * 1024
SHUTTING_DOWN = "the app is shutting down; this image was not drawn"  # 503, waiting or drawing
MAX_PROMPT_CHARS = 4000  # far beyond any tokenizer limit; only stops absurd payloads
CLIENT_MEMORY = 4096  # clients whose newest request id is remembered (least recently seen forgotten first)

# The page only talks to this server: no CDN, no external request is even allowed.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob:; "
    "connect-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The names a browser uses for this machine. A request naming another host is refused: a web page
# whose domain is re-pointed at 127.0.0.1 (DNS rebinding) would otherwise reach the app as same-origin.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


# --- models -------------------------------------------------------------------------------------


def prompt_reading(pipe: Any) -> tuple[list[Any], int]:
    """The tokenizers a prompt is counted with, and how many of its tokens the model reads (0: no limit known).

    CLIP's encoders read 77 tokens. SD3 with its T5 encoder reads further: T5 takes the pipeline's
    `max_sequence_length` tokens (256 unless the call says otherwise, and ours does not), so a prompt past
    77 CLIP tokens still reaches the transformer; it is counted, and called truncated, by T5's tokenizer."""
    from nitrofusion.pipelines.generation import call_default

    t5 = getattr(pipe, "tokenizer_3", None)
    if t5 is not None and getattr(pipe, "text_encoder_3", None) is not None:
        length = call_default(pipe, "max_sequence_length")
        if isinstance(length, int):
            return [t5], length
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t]
    # Tokenizers without a real limit report a huge model_max_length; CLIP's is 77.
    limits = [int(t.model_max_length) for t in tokenizers if int(t.model_max_length) < 100_000]
    return tokenizers, min(limits) if limits else 0


@dataclass
class Rendered:
    png: bytes
    seed: int
    elapsed_s: float
    tokens: int = 0  # prompt length in tokens, before the text encoders truncate it


@dataclass
class LoadedModel:
    """A pipeline loaded once at start-up, with what the API needs to validate requests for it."""

    name: str
    source: str
    pipe: Any
    sampler: str
    default_size: int
    size_multiple: int
    token_limit: int
    largest_side: int = 8192  # generation.largest_side: an SD3 transformer's position embedding's reach
    tokenizers: Sequence[Any] = ()
    guidance_scale: float = 0.0  # the model's CFG scale: its --guidance-scale or the sampler's default
    # Compiled on a GPU (--compile): only the size compiled at start-up is served; any other would
    # compile again (minutes) inside a request.
    compiled_size: int | None = None
    steps: tuple[int, ...] = STUDENT_STEPS  # the step counts served (422 for any other)
    default_steps: int = 1

    @classmethod
    def from_pipeline(
        cls,
        name: str,
        source: str,
        pipe: Any,
        compiled: bool = False,
        guidance_scale: float | None = None,
        steps: int | None = None,
    ) -> LoadedModel:
        """`steps`: the count it samples at unless a request says otherwise (its --steps; None: its
        own, `default_steps`)."""
        from nitrofusion.pipelines.generation import (
            check_distinct_timesteps,
            default_guidance,
            default_size,
            default_steps,
            is_distilled,
            largest_side,
            sampler_of,
            size_multiple,
        )

        tokenizers, token_limit = prompt_reading(pipe)
        own = default_steps(pipe) if steps is None else steps
        distilled = is_distilled(pipe)
        if own < 1 or (distilled and own not in STUDENT_STEPS):
            offered = f"{STUDENT_STEPS[0]} to {STUDENT_STEPS[-1]}" if distilled else "a positive count"
            raise UserError(f"--steps for model '{name}' must be {offered}, got {own}")
        steps = STUDENT_STEPS if distilled else tuple(sorted({*TEACHER_STEPS, own}))
        if sampler_of(pipe) == "shift-lcm":  # a small --shift puts 3 or 4 steps on repeated timesteps: not offered

            def distinct(n: int) -> bool:
                try:
                    check_distinct_timesteps(pipe, n)
                except UserError:
                    return False
                return True

            steps = tuple(filter(distinct, steps))
            if own not in steps:
                raise UserError(f"--steps {own}: model '{name}' samples at {', '.join(map(str, steps))} steps only")
        return cls(
            name=name,
            source=source,
            pipe=pipe,
            sampler=sampler_of(pipe),
            guidance_scale=default_guidance(sampler_of(pipe), pipe) if guidance_scale is None else guidance_scale,
            default_size=default_size(pipe),
            size_multiple=size_multiple(pipe),
            largest_side=largest_side(pipe),
            token_limit=token_limit,
            tokenizers=tokenizers,
            compiled_size=default_size(pipe) if compiled else None,
            steps=tuple(n for n in steps if n <= max(own, STUDENT_STEPS[-1])),
            default_steps=own,
        )

    def count_tokens(self, prompt: str) -> int:
        """Tokens the text encoders would see before truncation (special tokens included).

        Call it only on the model's worker thread: a fast tokenizer's truncation and padding settings are
        shared state, and counting without truncation while the pipeline encodes with padding breaks the
        pipeline's call."""
        if not self.tokenizers:
            return 0
        # verbose=False: counting a long prompt must not log the tokenizer's "too long" warning.
        return max(len(t(prompt, truncation=False, verbose=False).input_ids) for t in self.tokenizers)

    def max_size(self, server_max: int | None) -> int:
        """The largest side served: the server's --max-size; without one, four times the model's own
        size up to DEFAULT_MAX_SIZE (its own where larger): a 32-px CPU model asked for 1024 px drew
        for minutes (its teacher for hours), and a started image cannot be stopped. Never past what
        the model can sample."""
        if server_max is None:
            server_max = max(self.default_size, min(4 * self.default_size, DEFAULT_MAX_SIZE))
        return min(server_max, self.largest_side)

    def sizes(self, max_size: int | None) -> list[int]:
        """Square sizes the page offers: around the model's own size, on its size grid."""
        max_size = self.max_size(max_size)
        if self.compiled_size is not None:
            return [self.compiled_size] if self.compiled_size <= max_size else []
        m = self.size_multiple
        wanted = {round(self.default_size * f / m) * m for f in (0.5, 0.75, 1, 1.5, 2)}
        return sorted(s for s in wanted if m <= s <= max_size) or [self.default_size]

    def describe(self, max_size: int | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "sampler": self.sampler,
            "guidance_scale": self.guidance_scale,
            "default_size": self.default_size,
            "size_multiple": self.size_multiple,
            "max_size": self.max_size(max_size),
            "sizes": self.sizes(max_size),
            "steps": list(self.steps),
            "default_steps": self.default_steps,
            "token_limit": self.token_limit,
        }

    def render(
        self, prompt: str, steps: int, seed: int, width: int, height: int, interrupt: Callable[[], bool] | None = None
    ) -> Rendered:
        """Sample one image (runs in the model's worker thread) and encode it as a PNG with provenance.
        `interrupt`: `generate`'s; once it returns True the image stops at its next step (`Interrupted`)."""
        from PIL.PngImagePlugin import PngInfo

        from nitrofusion.pipelines import generate

        tokens = self.count_tokens(prompt)
        t0 = time.perf_counter()
        (result,) = generate(
            self.pipe,
            [prompt],
            steps=steps,
            seed=seed,
            height=height,
            width=width,
            batch_size=1,
            guidance_scale=self.guidance_scale,
            progress=False,
            interrupt=interrupt,
        )
        elapsed = time.perf_counter() - t0
        info = PngInfo()
        # The name clients know the model by: never the server's paths (the pipeline's or a student file's).
        metadata = {k: v for k, v in result.metadata.items() if k not in ("unet", "lora")}
        for key, value in {**metadata, "model": self.name}.items():
            info.add_text(key, value)
        buf = io.BytesIO()
        result.image.save(buf, format="PNG", pnginfo=info)
        return Rendered(buf.getvalue(), seed, elapsed, tokens)


def model_name(spec: ModelSpec) -> str:
    """The name a client picks a model by: given, the embedded name, the student file or the directory."""
    from nitrofusion.world.spec import EMBEDDED_NAMES

    if spec.name:
        return spec.name
    if spec.lora is not None:  # the file that makes the model what it is
        from nitrofusion.pipelines.adapters import read_lora_file

        return read_lora_file(spec.lora).name
    if spec.model is None:
        return "embedded" if spec.unet is None else Path(spec.unet).stem
    if spec.model in EMBEDDED_NAMES and spec.unet is None:
        return spec.model
    if spec.unet:
        return Path(spec.unet).stem
    return Path(spec.model.rstrip("/")).name or spec.model


def load_models(
    specs: Sequence[ModelSpec],
    device: str | None = None,
    dtype: str | None = "auto",
    warmup: bool = True,
    compile: bool = False,
    safety_checker: bool = True,
    max_size: int | None = None,
) -> list[LoadedModel]:
    """Load every model once (safetensors only, no remote code: `load_pipeline`'s guarantees) and
    optionally sample one image each, so the first user request does not pay for lazy initialisation.
    `max_size`: the server's --max-size, checked against each model's own size before any loads."""
    from nitrofusion.pipelines import generate, load_pipeline
    from nitrofusion.pipelines.adapters import check_lora_option
    from nitrofusion.pipelines.generation import check_guidance_scale, default_size_of_folder
    from nitrofusion.world.spec import choose_model

    specs = list(specs) or [ModelSpec()]
    names = [model_name(spec) for spec in specs]
    # Check every name before loading anything: loading can take minutes.
    for i, name in enumerate(names):
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            raise UserError(f"model name '{name}' may only use letters, digits, '.', '-' and '_'; use NAME=PATH")
        if name in names[:i]:
            raise UserError(f"two models are named '{name}'; name them with --model NAME=PATH")
        check_guidance_scale(specs[i].guidance_scale)
        check_lora_option(specs[i].lora, specs[i].unet)
    choices = [choose_model(spec.model, spec.unet, spec.shift, lora=spec.lora) for spec in specs]
    for spec, name, choice in zip(specs, names, choices):
        # As far as the options tell: a student UNet or a shift is a distilled model (1-4 steps);
        # `LoadedModel.from_pipeline` checks again on the loaded pipeline.
        few_step = choice.unet is not None or choice.shift is not None
        if spec.steps is not None and (spec.steps < 1 or (few_step and spec.steps not in STUDENT_STEPS)):
            offered = f"{STUDENT_STEPS[0]} to {STUDENT_STEPS[-1]}" if few_step else "a positive count"
            raise UserError(f"--steps for model '{name}' must be {offered}, got {spec.steps}")
        own_size = default_size_of_folder(choice.model) if max_size is not None else None
        if own_size is not None:  # a local folder (an embedded one too); create_app checks every model again
            check_max_size(max_size, name, own_size)
    models: list[LoadedModel] = []
    for spec, name, choice in zip(specs, names, choices):
        pipe = load_pipeline(
            choice.model,
            lora=spec.lora,
            unet=choice.unet,
            shift=choice.shift,
            device=device,
            dtype=dtype,
            compile=compile,
            safety_checker=safety_checker,
        )
        compiled = compile and str(pipe.device).startswith("cuda")  # compile_pipeline leaves CPU alone
        source = spec.model or ("embedded-teacher" if spec.lora else "embedded")
        local = Path(source).expanduser()
        if local.exists():  # a local folder: its name, never the server's path (as in PNGs)
            source = local.resolve().name
        loaded = LoadedModel.from_pipeline(name, source, pipe, compiled, spec.guidance_scale, spec.steps)
        if warmup:
            # A compiled sampler captures one CUDA graph per step count: capture them all now.
            for steps in loaded.steps if compiled else (1,):
                guidance = loaded.guidance_scale
                generate(pipe, ["warm-up"], steps=steps, seed=0, batch_size=1, guidance_scale=guidance, progress=False)
        models.append(loaded)
    return models


# --- scheduling ---------------------------------------------------------------------------------


class Superseded(Exception):
    """A newer request of the same client exists: this one is not rendered."""


class Busy(Exception):
    """The model's line of waiting requests is full."""


class Abandoned(Exception):
    """The client closed its connection while its request waited: nobody would see the image."""


class ShuttingDown(Exception):
    """The server is stopping: a request that waits, or arrives, is not drawn."""


@dataclass(frozen=True)
class Ticket:
    client: str | None  # None: a request without a client id, superseded by nothing
    seq: int

    @property
    def key(self) -> str | Ticket:
        """Where the request waits: one place per client, or its own place."""
        return self if self.client is None else self.client


class ClientSlots:
    """Each client's newest request. Only the holder of a client's newest ticket gets an image."""

    def __init__(self, capacity: int = CLIENT_MEMORY) -> None:
        self._capacity = capacity
        self._latest: OrderedDict[str, tuple[int, int | None]] = OrderedDict()  # client -> (seq, request_id)
        self._seq = itertools.count(1)

    def claim(self, client: str | None, request_id: int | None = None) -> Ticket | None:
        """Make this request the client's newest, or return None if a higher request id was already seen
        (requests can arrive out of order over separate connections). Without a client id a request
        stands alone: nothing supersedes it and nothing is remembered."""
        if client is None:
            seq = next(self._seq)
            return Ticket(None, seq)
        prev = self._latest.get(client)
        prev_id = prev[1] if prev else None
        if request_id is not None and prev_id is not None and request_id < prev_id:
            return None
        seq = next(self._seq)
        self._latest[client] = (seq, request_id if request_id is not None else prev_id)
        self._latest.move_to_end(client)
        while len(self._latest) > self._capacity:  # bounded memory whatever the number of clients
            self._latest.popitem(last=False)
        return Ticket(client, seq)

    def is_current(self, ticket: Ticket) -> bool:
        newest = self._latest.get(ticket.client) if ticket.client is not None else None
        return newest is None or newest[0] == ticket.seq  # a forgotten client cannot be stale


@dataclass(eq=False)
class _Job:
    ticket: Ticket
    work: Callable[[], Any]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0


class ModelWorker:
    """One generation at a time for one model, in its own thread; a bounded line of waiting requests
    with at most one per client. All bookkeeping happens on the event loop, so it needs no lock."""

    def __init__(self, name: str, slots: ClientSlots, capacity: int = DEFAULT_QUEUE_SIZE) -> None:
        self.name = name
        self.capacity = capacity
        self._slots = slots
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nitrofusion-{name}")
        self._waiting: OrderedDict[str | Ticket, _Job] = OrderedDict()  # client -> job, in arrival order
        self._running: _Job | None = None
        self._task: asyncio.Task | None = None
        # Set once, when the server starts shutting down; the image being drawn reads it between its steps.
        self.stopping = threading.Event()
        # superseded: every 409 (replaced while waiting, stale on arrival); stale: images that finished after
        # a newer request of their client arrived (delivered all the same, marked: see `_run`).
        # abandoned: requests whose client hung up while they waited (a script's timeout, a closed tab).
        self.stats = {"completed": 0, "superseded": 0, "stale": 0, "busy": 0, "failed": 0, "abandoned": 0}

    def state(self) -> dict[str, Any]:
        return {"running": self._running is not None, "waiting": len(self._waiting), **self.stats}

    def check_room(self, client: str | None) -> None:
        """Raise Busy unless a request of `client` finds a place in line now: its waiting request's, or
        a free one. Asked before the request becomes its client's newest, so that a request refused as
        busy supersedes nothing (it would otherwise cost its client the image being generated)."""
        if (client is None or client not in self._waiting) and len(self._waiting) >= self.capacity:
            self.stats["busy"] += 1
            raise Busy(f"model '{self.name}' is busy: {len(self._waiting)} requests are waiting; try again shortly")

    async def submit(
        self, ticket: Ticket, work: Callable[[], Any], hung_up: Callable[[], Awaitable[Any]] | None = None
    ) -> tuple[Any, float, bool]:
        """Run `work` in the worker thread when the model is free; returns (result, seconds waited,
        whether a newer request of the client arrived while it ran). Raises Superseded or Busy, or
        Abandoned when `hung_up` (returns once the client's connection is gone) returns first while
        the request still waits: its place in line is freed then, not when it reaches the model."""
        if self.stopping.is_set():
            raise ShuttingDown()
        self.check_room(ticket.client)
        job = _Job(ticket, work, asyncio.get_running_loop().create_future())
        older = self._waiting.get(ticket.key)
        # Same client, not started yet: the new request takes its place in line (assigning an existing
        # key keeps its position), so a user who keeps typing still reaches the model.
        self._waiting[ticket.key] = job
        if older is not None:
            self._fail(older, Superseded())
        self._pump()
        if hung_up is not None:
            watch = asyncio.ensure_future(hung_up())
            try:
                await asyncio.wait({job.future, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
            # Only a watch that saw the hang-up counts: one that failed says nothing about the client.
            gone = watch.done() and not watch.cancelled() and watch.exception() is None
            # One already drawing is left to finish (a thread cannot be stopped mid-step); its image is dropped.
            if gone and not job.future.done() and self._waiting.get(ticket.key) is job:
                del self._waiting[ticket.key]
                self.stats["abandoned"] += 1
                job.future.cancel()
                raise Abandoned()
        result, stale = await job.future
        return result, job.started_at - job.queued_at, stale

    def drop_waiting(self, client: str) -> None:
        """A newer request of `client` went to another model: its place in this line is freed now
        (answered 409), not when it would have reached the model."""
        job = self._waiting.pop(client, None)
        if job is not None:
            self._fail(job, Superseded())

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if isinstance(exc, Superseded):
            self.stats["superseded"] += 1
        if not job.future.done():
            job.future.set_exception(exc)

    def _pump(self) -> None:
        if self._running is not None or not self._waiting:
            return
        _, job = self._waiting.popitem(last=False)
        self._running = job
        # Keep a reference: the event loop holds tasks only weakly.
        self._task = asyncio.get_running_loop().create_task(self._run(job))

    async def _run(self, job: _Job) -> None:
        try:
            job.started_at = time.perf_counter()
            if job.future.done() or not self._slots.is_current(job.ticket):
                raise Superseded()
            result = await asyncio.get_running_loop().run_in_executor(self._executor, job.work)
            # A newer request arrived while this one ran. Its image is delivered all the same, marked
            # stale: a user typing faster than the model draws then sees the picture follow, an image a
            # generation, instead of nothing until a pause (the page shows it only if nothing newer is shown).
            stale = not self._slots.is_current(job.ticket)
            self.stats["stale" if stale else "completed"] += 1
            if not job.future.done():
                job.future.set_result((result, stale))
        except Superseded as exc:
            self._fail(job, exc)
        except Exception as exc:  # the generation failed: answer this request, keep serving the others
            if not isinstance(exc, Interrupted):  # stopped by `stop`: nothing failed
                self.stats["failed"] += 1
            self._fail(job, exc)
        finally:
            self._running = None
            self._pump()

    def stop(self) -> tuple[int, int]:
        """Start shutting down: every waiting request is answered (ShuttingDown) now, not drawn first,
        and the image being drawn stops at its next step where its sampler allows. Returns how many
        were drawing and waiting."""
        self.stopping.set()
        waiting = list(self._waiting.values())
        self._waiting.clear()
        for job in waiting:
            self._fail(job, ShuttingDown())
        return int(self._running is not None), len(waiting)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- HTTP ---------------------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(max_length=MAX_PROMPT_CHARS)
    steps: StrictInt | None = Field(None, ge=1, le=MAX_REQUEST_STEPS)
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | Literal["random"] | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    model: StrictStr | None = None
    client: StrictStr | None = Field(None, min_length=1, max_length=128)
    request_id: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# Fields whose type is a union: pydantic reports one error per alternative; say it once, plainly.
_FIELD_HINTS = {
    "seed": 'must be a whole number from 0 to 2**63-1, null or "random"',
    "request_id": "must be a whole number from 0 to 2**63-1, or null",
}


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON"
    parts: dict[str, str] = {}
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if not loc:
            return 422, "the request body must be a JSON object"
        parts.setdefault(loc[0], _FIELD_HINTS.get(loc[0], str(e.get("msg", "invalid"))))
    return 422, "; ".join(f"{k}: {v}" for k, v in list(parts.items())[:3])


class _BodyLimit:
    """Refuse request bodies over `limit` bytes, declared or streamed, before anything parses them."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body must be at most {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _error(413, message)(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:  # a chunked body with no declared length
                raise StarletteHTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)


class _HostCheck:
    """Refuse requests whose Host header names another machine than this one (`allowed`; "*": any)."""

    def __init__(self, app: Any, allowed: Sequence[str]) -> None:
        self.app, self.allowed = app, {h.lower().strip("[]") for h in allowed}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or "*" in self.allowed:
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        # "name:port", "1.2.3.4:port" or "[::1]:port"
        name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
        if name not in self.allowed:
            message = (
                f"this app answers to {', '.join(sorted(self.allowed))} only, not to Host '{host[:100]}' "
                "(start it with --host to serve another name)"
            )
            return await _error(400, message)(scope, receive, send)
        await self.app(scope, receive, send)


def _page() -> str:
    return (resources.files("nitrofusion.app") / "page.html").read_text(encoding="utf-8")


def check_max_size(max_size: int | None, name: str, own_size: int) -> None:
    """A --max-size below a model's own size would refuse its requests without a size (the page's first)."""
    if max_size is not None and own_size > max_size:
        raise UserError(
            f"--max-size {max_size} is below model '{name}''s own size {own_size}: give --max-size {own_size} or more"
        )


def create_app(
    models: Sequence[LoadedModel],
    max_size: int | None = None,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    hosts: Sequence[str] = LOOPBACK_HOSTS,
) -> FastAPI:
    """The app for these (already loaded) models; the first one is the default. `hosts`: the names
    it answers to in the Host header ("*": any, for a server exposed with --host on purpose).
    `max_size`: the largest side any model serves; None: each model's own (`LoadedModel.max_size`)."""
    if not models:
        raise UserError("the app needs at least one model")
    if (max_size is not None and max_size < 1) or queue_size < 1:
        raise UserError("--max-size and --queue-size must be at least 1")
    for m in models:
        check_max_size(max_size, m.name, m.default_size)
    by_name = {m.name: m for m in models}
    slots = ClientSlots()
    workers = {m.name: ModelWorker(m.name, slots, queue_size) for m in models}

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        yield
        for w in workers.values():
            w.close()

    # No /docs or /redoc: FastAPI's UI pages load scripts from a CDN. The schema stays at /api/openapi.json.
    app = FastAPI(
        title="nitrofusion app", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json", lifespan=lifespan
    )
    app.state.models = by_name
    app.state.workers = workers

    def stop_work() -> tuple[int, int]:
        """Begin shutting down (`ModelWorker.stop` for every model); (images drawing, requests waiting)."""
        counts = [w.stop() for w in workers.values()]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    app.state.stop_work = stop_work

    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(_HostCheck, allowed=hosts)  # added last: runs first

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and kind != "application/json":  # e.g. curl -d without -H
            return _error(415, f"Content-Type must be application/json, got '{kind[:100] or 'none'}'")
        return _error(*_validation_message(exc))

    @app.exception_handler(UserError)
    async def user_error(_: Request, exc: UserError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page(), headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": {name: w.state() for name, w in workers.items()}}

    @app.get("/api/models")
    async def list_models() -> dict[str, Any]:
        return {"default": models[0].name, "models": [m.describe(max_size) for m in models]}

    @app.post("/api/generate", response_model=None)
    async def generate(req: GenerateRequest, request: Request) -> Response:
        prompt = req.prompt.strip()
        if not prompt:
            return _error(400, "the prompt is empty")
        # Only names the server was started with: a path or hub id from a client is never loaded.
        model = by_name.get(req.model or models[0].name)
        if model is None:
            return _error(404, f"unknown model '{req.model}'; this server has: {', '.join(by_name)}")
        width = model.default_size if req.width is None else req.width
        height = model.default_size if req.height is None else req.height
        if model.compiled_size is not None and (width, height) != (model.compiled_size,) * 2:
            size = model.compiled_size
            return _error(
                400,
                f"model '{model.name}' was compiled for {size}x{size} (--compile); got {width}x{height} "
                "(restart without --compile for other sizes)",
            )
        largest = model.max_size(max_size)
        for what, v in (("width", width), ("height", height)):
            if v < model.size_multiple or v % model.size_multiple or v > largest:
                return _error(
                    400,
                    f"{what} must be a multiple of {model.size_multiple} from {model.size_multiple} to {largest} "
                    f"for model '{model.name}', got {v}",
                )
        steps = model.default_steps if req.steps is None else req.steps
        if steps not in model.steps:
            offered = ", ".join(map(str, model.steps))
            return _error(422, f"steps: model '{model.name}' samples at {offered} steps, got {steps}")
        seed = secrets.randbelow(2**32) if req.seed is None or req.seed == "random" else req.seed

        worker = workers[model.name]
        try:
            worker.check_room(req.client)  # before the claim: a refused request supersedes nothing
        except Busy as exc:  # marked, so that a page retries this 503 and no other
            return _error(503, str(exc), headers={"Retry-After": "1"}, busy=True)
        ticket = slots.claim(req.client, req.request_id)
        if ticket is None:
            worker.stats["superseded"] += 1
            return _error(409, "superseded: a newer request of this client was already received", superseded=True)
        if req.client is not None:  # the client switched models: its request waiting for another one is stale
            for other in workers.values():
                if other is not worker:
                    other.drop_waiting(req.client)

        def work() -> Rendered:
            return model.render(prompt, steps, seed, width, height, interrupt=worker.stopping.is_set)

        async def hung_up() -> None:
            # The body is read: under uvicorn the next message for this request is its disconnect.
            # A server that sends anything else instead is not watched (never a busy loop).
            if (await request.receive())["type"] != "http.disconnect":
                await asyncio.Event().wait()

        try:
            rendered, waited, stale = await worker.submit(ticket, work, hung_up)
        except Abandoned:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        except Superseded:
            return _error(409, "superseded by a newer request of this client", superseded=True)
        except Busy as exc:  # marked, so that a page retries this 503 and no other
            return _error(503, str(exc), headers={"Retry-After": "1"}, busy=True)
        except (ShuttingDown, Interrupted):
            return _error(503, SHUTTING_DOWN)
        except asyncio.CancelledError:
            if not worker.stopping.is_set():
                raise
            # A second Ctrl-C (uvicorn's forced exit) cancels the request whose image is still being drawn:
            # an answer, where the cancellation printed a traceback.
            return _error(503, SHUTTING_DOWN)
        except UserError as exc:
            return _error(400, str(exc))
        except Exception as exc:
            if is_out_of_memory(exc):  # a GPU's, or the CPU allocator's (a plain RuntimeError)
                # No Retry-After: the same request would run out again (the page retried it forever).
                return _error(503, "out of memory for this request; try a smaller size")
            log.exception("generation failed")
            return _error(500, f"generation failed ({type(exc).__name__}); see the server log")

        headers = {
            "X-Seed": str(rendered.seed),
            "X-Steps": str(steps),
            "X-Width": str(width),
            "X-Height": str(height),
            "X-Model": model.name,
            "X-Elapsed-Ms": f"{rendered.elapsed_s * 1000:.1f}",
            "X-Queue-Ms": f"{waited * 1000:.1f}",
            "X-Prompt-Truncated": "true" if model.token_limit and rendered.tokens > model.token_limit else "false",
            "X-Prompt-Tokens": str(rendered.tokens),
            "X-Token-Limit": str(model.token_limit),
            "X-Superseded": "true" if stale else "false",
            "Cache-Control": "no-store",
        }
        if req.request_id is not None:
            headers["X-Request-Id"] = str(req.request_id)
        return Response(rendered.png, media_type="image/png", headers=headers)

    return app


# --- running ------------------------------------------------------------------------------------


class AppServer(uvicorn.Server):
    """uvicorn's server for `create_app`'s app, stopping the app's work as shutdown begins.

    uvicorn alone lets every open request finish before it exits: on Ctrl-C every queued image was
    drawn first, and a second Ctrl-C answered the waiting clients with 500s and printed a traceback
    for each. Here the waiting are answered 503 at once, and an image being drawn by a pipeline's
    own step loop (a teacher's) stops at its next step. The workers are closed here too, not by a
    lifespan task: a second Ctrl-C (uvicorn's forced exit) cancelled that task with a traceback."""

    def __init__(self, app: FastAPI, log_level: str = "warning") -> None:
        super().__init__(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drawing, waiting = self.app.state.stop_work()
        if drawing or waiting:
            log.warning(
                "shutting down: %d image(s) being drawn stop at their next step where their sampler allows; "
                "%d waiting request(s) answered 503 (Ctrl-C again to stop at once)",
                drawing,
                waiting,
            )
        await super().shutdown(sockets)
        for worker in self.app.state.workers.values():
            worker.close()


class ServerThread:
    """`AppServer` in a background thread on an already bound socket (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.socket = socket.create_server((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = AppServer(app, log_level)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self.socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
