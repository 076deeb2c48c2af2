"""`nitrofusion app`: the JSON API on the embedded model, bad input, and the scheduling rules
(latest request per client wins, one generation at a time per model, a bounded line)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the app needs fastapi (pip install fastapi uvicorn)")
httpx = pytest.importorskip("httpx", reason="the app tests need httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from nitrofusion.app.cli import add_parser, is_loopback, run  # noqa: E402
from nitrofusion.app.server import (  # noqa: E402
    MAX_BODY_BYTES,
    ClientSlots,
    LoadedModel,
    ModelSpec,
    Rendered,
    ServerThread,
    create_app,
    load_models,
    prompt_reading,
)
from nitrofusion.errors import Interrupted, UserError  # noqa: E402

LOCAL = "http://127.0.0.1"  # the app answers to this machine's names only (TestClient's default is "testserver")


@pytest.fixture(scope="module")
def embedded() -> LoadedModel:
    (model,) = load_models([ModelSpec()], device="cpu", warmup=False)
    return model


@pytest.fixture
def client(embedded):
    with TestClient(create_app([embedded]), base_url=LOCAL) as c:
        yield c


def _post(c, headers: dict | None = None, **body):
    return c.post("/api/generate", json={"prompt": "a photo of a sneaker", **body}, headers=headers)


def _error_of(r) -> str:
    data = r.json()
    assert set(data) >= {"error"} and data["error"], data
    assert "Traceback" not in r.text
    return data["error"]


# --- the API on the embedded student --------------------------------------------------------------


def test_health_and_models(client):
    assert client.get("/api/health").json()["status"] == "ok"
    data = client.get("/api/models").json()
    assert data["default"] == "embedded"
    (m,) = data["models"]
    assert m["sampler"] == "shift-lcm" and m["steps"] == [1, 2, 3, 4] and m["default_steps"] == 1
    assert m["default_size"] == 32 and m["size_multiple"] == 8 and m["token_limit"] == 77
    assert 32 in m["sizes"] and all(s % 8 == 0 for s in m["sizes"])


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert re.search(r"(https?:)?//[a-z]", r.text.replace("// ", "")) is None, "the page must not load anything"
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would pull scripts from a CDN


def test_generate_returns_png_with_provenance(client):
    r = _post(client, steps=2, seed=3, client="t", request_id=7)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    h = r.headers
    assert (h["x-seed"], h["x-steps"], h["x-model"], h["x-request-id"]) == ("3", "2", "embedded", "7")
    assert (h["x-width"], h["x-height"], h["x-prompt-truncated"]) == ("32", "32", "false")
    assert float(h["x-elapsed-ms"]) > 0 and float(h["x-queue-ms"]) >= 0  # an idle model: no wait to speak of
    assert float(h["x-queue-ms"]) < 1000
    image = Image.open(io.BytesIO(r.content))
    assert image.size == (32, 32)
    assert image.text["prompt"] == "a photo of a sneaker" and image.text["seed"] == "3" and image.text["steps"] == "2"
    # The model by the name clients know, never a server path (the embedded student is a file in a base).
    assert image.text["model"] == "embedded" and "unet" not in image.text
    assert not any("/" in value for value in image.text.values() if value != image.text["prompt"])
    # Same request, same bytes; other steps or another size, another image.
    assert _post(client, steps=2, seed=3).content == r.content
    assert _post(client, steps=1, seed=3).content != r.content
    assert Image.open(io.BytesIO(_post(client, seed=3, width=48, height=16).content)).size == (48, 16)


def test_random_seed_is_reported(client):
    drawn = [_post(client, seed=None), _post(client, seed="random")]
    seeds = {r.headers["x-seed"] for r in drawn}
    assert all(s.isdigit() for s in seeds) and len(seeds) == 2
    for r in drawn:  # the seed said is the seed used: asked for again, it draws the same image
        assert _post(client, seed=int(r.headers["x-seed"])).content == r.content


def test_long_prompt_is_truncated_and_reported(client):
    r = _post(client, prompt="a photo of a red sneaker " * 20)
    assert r.status_code == 200
    assert r.headers["x-prompt-truncated"] == "true" and r.headers["x-token-limit"] == "77"
    assert int(r.headers["x-prompt-tokens"]) > 77


def test_sd3_with_t5_reads_past_clips_77_tokens():
    from diffusers import StableDiffusion3Pipeline

    from nitrofusion.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()  # no T5: the CLIP encoders' 77 is all the model reads
    tokenizers, limit = prompt_reading(pipe)
    assert limit == 77 and tokenizers == [pipe.tokenizer, pipe.tokenizer_2]

    class WithT5:  # SD3's call and components, with a T5 encoder loaded
        __call__ = StableDiffusion3Pipeline.__call__
        tokenizer, tokenizer_2, tokenizer_3 = pipe.tokenizer, pipe.tokenizer_2, object()
        text_encoder_3 = object()

    tokenizers, limit = prompt_reading(WithT5())
    assert limit == 256 and tokenizers == [WithT5.tokenizer_3]  # counted by T5, up to the call's default


def test_tokenizers_are_used_on_the_worker_thread_only(embedded, monkeypatch):
    # Fast tokenizers keep truncation/padding as shared state: counting tokens on the event loop while the
    # worker encodes a prompt made the pipeline fail ("Expected size 77 but got size 5") under load.
    threads: list[str] = []
    count = LoadedModel.count_tokens

    def spy(self, prompt):
        threads.append(threading.current_thread().name)
        return count(self, prompt)

    monkeypatch.setattr(LoadedModel, "count_tokens", spy)
    with TestClient(create_app([embedded]), base_url=LOCAL) as c:
        assert _post(c).status_code == 200
    assert threads and all(t.startswith("nitrofusion-embedded") for t in threads), threads


def test_a_teacher_beside_its_student_samples_at_its_own_steps(embedded):
    """The app offered a multi-step teacher 1-4 steps only, where it draws noise: set beside the
    student, it runs up to its own step count, by default at that count."""
    (teacher,) = load_models([ModelSpec(model="embedded-teacher")], device="cpu", warmup=False)
    own = teacher.default_steps
    assert teacher.sampler == "native" and own > 4
    with TestClient(create_app([embedded, teacher]), base_url=LOCAL) as c:
        offered = {m["name"]: (m["steps"], m["default_steps"]) for m in c.get("/api/models").json()["models"]}
        assert offered == {"embedded": ([1, 2, 3, 4], 1), "embedded-teacher": ([1, 2, 4, 8, 16, own], own)}
        r = _post(c, model="embedded-teacher", seed=0)
        assert r.status_code == 200 and r.headers["x-steps"] == str(own)
        assert Image.open(io.BytesIO(r.content)).text["steps"] == str(own)
        assert _post(c, model="embedded-teacher", seed=0, steps=own).content == r.content
        assert _post(c, model="embedded-teacher", seed=0, steps=4).content != r.content
        r = _post(c, model="embedded-teacher", steps=3)
        assert r.status_code == 422 and _error_of(r) == (
            f"steps: model 'embedded-teacher' samples at 1, 2, 4, 8, 16, {own} steps, got 3"
        )
        assert _post(c, steps=own).status_code == 422  # the student: 1-4
        assert _post(c).headers["x-steps"] == "1"


def test_a_model_from_a_folder_is_described_by_the_folders_name_not_the_servers_path():
    """/api/models reported the --model path (e.g. /models/stable-diffusion-xl-base-1.0) to every
    client, where the PNGs name the model only."""
    from nitrofusion.world.spec import teacher_path

    (model,) = load_models([ModelSpec(model=str(teacher_path()), name="t")], device="cpu", warmup=False)
    assert model.describe(None)["source"] == "teacher"
    (hub,) = load_models([ModelSpec(model="embedded-teacher")], device="cpu", warmup=False)
    assert hub.describe(None)["source"] == "embedded-teacher"  # a name, not a path: as given


def test_a_models_steps_option_is_its_default_count(embedded):
    """SD3.5-Large-Turbo (a 4-step model the app cannot tell from a teacher) was served at its
    pipeline's 28 steps on every keystroke: --steps sets a model's count."""
    (teacher,) = load_models([ModelSpec(model="embedded-teacher", steps=4)], device="cpu", warmup=False)
    assert (teacher.steps, teacher.default_steps) == ((1, 2, 4), 4)
    (student,) = load_models([ModelSpec(steps=2)], device="cpu", warmup=False)
    assert (student.steps, student.default_steps) == ((1, 2, 3, 4), 2)
    with TestClient(create_app([student, teacher]), base_url=LOCAL) as c:
        assert _post(c).headers["x-steps"] == "2"
        assert _post(c, model="embedded-teacher").headers["x-steps"] == "4"
    for spec, said in (
        (ModelSpec(steps=5), "--steps for model 'embedded' must be 1 to 4, got 5"),
        (ModelSpec(model="embedded-teacher", steps=0), "must be a positive count, got 0"),
        (ModelSpec(shift=3, steps=4), "--steps 4: model 'embedded' samples at 1, 2 steps only"),
    ):
        with pytest.raises(UserError, match=re.escape(said)):
            load_models([spec], device="cpu", warmup=False)
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["app", "--model", "embedded-teacher", "--steps", "4", "--model", "embedded"])
    assert [(m.model, m.steps) for m in args.models] == [("embedded-teacher", 4), ("embedded", None)]


def test_a_small_shift_is_offered_the_step_counts_it_can_sample_only(embedded):
    """With --shift 3, 3 and 4 steps land on repeated UNet timesteps, refused on every request
    (naming a CLI option) while the page offered them."""
    (small,) = load_models([ModelSpec(model="embedded", shift=3, name="small")], device="cpu", warmup=False)
    assert small.steps == (1, 2) and embedded.steps == (1, 2, 3, 4)
    with TestClient(create_app([small]), base_url=LOCAL) as c:
        assert c.get("/api/models").json()["models"][0]["steps"] == [1, 2]
        assert _post(c, steps=2).status_code == 200
        assert _post(c, steps=3).status_code == 422


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"prompt": ""}, 400, "prompt is empty"),
        ({"prompt": "  \n "}, 400, "prompt is empty"),
        ({"steps": 0}, 422, "steps"),
        ({"steps": 5}, 422, "steps"),
        ({"steps": "2"}, 422, "steps"),
        ({"steps": 1.5}, 422, "steps"),
        ({"width": 33}, 400, "multiple of 8"),
        ({"height": 136}, 400, "from 8 to 128"),  # without --max-size: 4x the model's own 32 px
        ({"width": -16}, 400, "width"),
        ({"seed": -1}, 422, "seed"),
        ({"seed": "lucky"}, 422, "seed"),
        ({"model": "nope"}, 404, "unknown model 'nope'"),
        ({"model": "/etc/passwd"}, 404, "unknown model"),
        ({"model": "embedded-teacher"}, 404, "this server has: embedded"),
        ({"prompt": 42}, 422, "prompt"),
        ({"prompt": None}, 422, "prompt"),
        ({"unexpected": 1}, 422, "unexpected"),
        ({"request_id": 2**63}, 422, "request_id"),
        ({"prompt": "a" * 4001}, 422, "prompt"),
    ],
)
def test_bad_input_is_one_json_line(client, body, status, message):
    r = client.post("/api/generate", json={"prompt": "a bag", **body})
    assert r.status_code == status, r.text
    assert message in _error_of(r)


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (b'{"prompt": "a bag",', 400, "not valid JSON"),
        (b"\xff\xfe\x00garbage", 400, "not valid JSON"),
        (b'["a bag"]', 422, "JSON object"),
        (b"", 422, "JSON object"),
    ],
)
def test_malformed_body(client, raw, status, message):
    r = client.post("/api/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in _error_of(r)


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_of_another_content_type_is_415_and_says_so(client, kind):
    """What `curl -d '{...}'` sends without -H: the message names the header, not the body."""
    headers = {"content-type": kind} if kind else {}
    r = client.post("/api/generate", content=b'{"prompt": "a bag"}', headers=headers)
    assert r.status_code == 415 and "Content-Type must be application/json" in _error_of(r)


@pytest.mark.parametrize("host", ["127.0.0.1:7860", "localhost", "LOCALHOST:1", "[::1]:7860"])
def test_the_app_answers_to_this_machines_names(embedded, host):
    with TestClient(create_app([embedded]), base_url=LOCAL) as c:
        assert c.get("/api/models", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7860", "127.0.0.1.evil.example", "[::2]:1", ""])
def test_another_host_name_is_refused_against_dns_rebinding(embedded, host):
    """A page whose domain is re-pointed at 127.0.0.1 reaches the app as same-origin, with its own name
    in the Host header: refused, so it can neither draw nor read the models' local paths."""
    with TestClient(create_app([embedded]), base_url=LOCAL) as c:
        for r in (c.get("/api/models", headers={"host": host}), _post(c, headers={"host": host})):
            assert r.status_code == 400 and "this app answers to 127.0.0.1, ::1, localhost only" in _error_of(r)
    with TestClient(create_app([embedded], hosts=("*",)), base_url=LOCAL) as c:  # --host 0.0.0.0: any name
        assert c.get("/api/models", headers={"host": host or "x"}).status_code == 200


def test_size_cap(embedded):
    with TestClient(create_app([embedded], max_size=32), base_url=LOCAL) as c:
        r = _post(c, width=48, height=48)
        assert r.status_code == 400 and "from 8 to 32" in _error_of(r)
        assert c.get("/api/models").json()["models"][0]["sizes"] == [16, 24, 32]


def test_a_compiled_model_serves_its_compiled_size_only(embedded):
    compiled = dataclasses.replace(embedded, compiled_size=embedded.default_size)
    with TestClient(create_app([compiled]), base_url=LOCAL) as c:
        assert c.get("/api/models").json()["models"][0]["sizes"] == [embedded.default_size]
        r = _post(c, width=embedded.default_size * 2, height=embedded.default_size * 2)
        assert r.status_code == 400 and "compiled for" in _error_of(r)
        assert _post(c).status_code == 200


def test_real_server_survives_garbage(embedded):
    with ServerThread(create_app([embedded])) as server:
        # Not HTTP at all, then an oversized body, then malformed JSON: the server answers or drops each...
        with socket.create_connection((server.host, server.port), timeout=5) as s:
            s.sendall(b"\x16\x03\x01\x00\xa5GARBAGE\r\n\r\n")
            s.recv(1024)
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.post("/api/generate", content=b"{" + b" " * 100_000 + b"}")
            assert r.status_code == 413 and "at most" in _error_of(r)
            chunked = iter([b'{"prompt": "', b"x" * (MAX_BODY_BYTES + 1), b'"}'])  # no declared length
            r = c.post("/api/generate", content=chunked, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "at most" in _error_of(r)
            r = c.post("/api/generate", content=b"{nope", headers={"content-type": "application/json"})
            assert r.status_code == 400
            # ...and still serves the next valid request.
            r = c.post("/api/generate", json={"prompt": "a photo of a sneaker"})
            assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


def test_cli_parses_models_and_flags_loopback(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["app", "--model", "embedded", "--model", "realism=/sdxl", "--unet", "r.safetensors", "--shift", "250"]
    )
    assert [(m.name, m.model, m.unet, m.shift) for m in args.models] == [
        (None, "embedded", None, None),
        ("realism", "/sdxl", "r.safetensors", 250),
    ]
    assert args.host == "127.0.0.1" and args.func.__name__ == "run"
    import torch
    from safetensors.torch import save_file

    from nitrofusion.app.server import model_name

    folder = tmp_path / "realism-1.0"  # as export-lora writes a folder
    folder.mkdir()
    pair = {
        "unet.conv_in.lora_A.weight": torch.zeros(1, 4, 3, 3),
        "unet.conv_in.lora_B.weight": torch.zeros(8, 1, 1, 1),
    }
    save_file(pair, str(folder / "pytorch_lora_weights.safetensors"))
    (spec,) = parser.parse_args(["app", "--lora", str(folder)]).models
    assert (spec.model, spec.lora) == (None, str(folder))  # on the embedded teacher
    assert model_name(spec) == "realism-1.0"  # named by what makes the model what it is, dots and all
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


def test_serving_does_not_log_each_truncated_prompt(caplog):
    """Each keystroke of a long prompt logged a warning quoting the prompt (the page says it already)."""
    import logging

    from nitrofusion.app.cli import quiet_truncation
    from nitrofusion.pipelines import fast

    sd3 = logging.getLogger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3")
    with caplog.at_level(logging.WARNING), quiet_truncation():
        fast.log.warning("prompt 'a long ...' truncated to 77 tokens")
        sd3.warning("The following part of your input was truncated")
        logging.getLogger("nitrofusion.app").warning("still said")
    assert [r.getMessage() for r in caplog.records] == ["still said"]
    fast.log.warning("said again outside the server")  # the levels are given back
    assert caplog.records[-1].getMessage() == "said again outside the server"


def test_model_names_are_checked_before_loading():
    from nitrofusion.errors import UserError

    with pytest.raises(UserError, match="two models are named 'embedded'"):
        load_models([ModelSpec("embedded"), ModelSpec(None), ModelSpec("/does/not/exist")])
    with pytest.raises(UserError, match="may only use"):
        load_models([ModelSpec("/does/not/exist", name="a b")])
    # --steps a model cannot sample at, as far as its options tell: said before the first model loads
    # (an SDXL pipeline takes tens of seconds), not after.
    with pytest.raises(UserError, match="--steps for model 'embedded' must be 1 to 4, got 5"):
        load_models([ModelSpec("/does/not/exist"), ModelSpec(steps=5)])
    with pytest.raises(UserError, match="--steps for model 'exist' must be a positive count, got 0"):
        load_models([ModelSpec("/does/not/exist", steps=0)])


def test_the_app_serves_an_sd15_model_with_or_without_its_safety_checker(tmp_path):
    from nitrofusion.testing import save_tiny_sd15

    sd15 = save_tiny_sd15(tmp_path / "sd15", safety_checker=True)
    (kept,) = load_models([ModelSpec(str(sd15))], device="cpu", warmup=False)
    (left_out,) = load_models([ModelSpec(str(sd15))], device="cpu", warmup=False, safety_checker=False)
    assert kept.pipe.safety_checker is not None and left_out.pipe.safety_checker is None
    judged = []
    kept.pipe.safety_checker.register_forward_hook(lambda *_: judged.append(1))
    for model, judged_so_far in ((kept, 1), (left_out, 1)):
        with TestClient(create_app([model]), base_url=LOCAL) as c:
            r = _post(c)
            assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).format == "PNG", r.text
        assert len(judged) == judged_so_far  # the kept checker judged its served image
    assert left_out.pipe.nitro_unfiltered and not kept.pipe.nitro_unfiltered  # the other has none to judge with


def test_cli_fails_in_one_line_on_a_taken_port_and_warns_once_exposed(capsys, tmp_path):
    import argparse

    from nitrofusion.errors import UserError

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 0.0.0.0:{port}"):
            run(parser.parse_args(["app", "--host", "0.0.0.0", "--port", str(port)]))
    assert capsys.readouterr().err == ""  # the refusal is the one line; nothing was exposed
    # Bound: the warning comes before the models load (here a missing one stops the start).
    with pytest.raises(UserError):
        run(parser.parse_args(["app", "--host", "0.0.0.0", "--port", "0", "--model", str(tmp_path / "nothing")]))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: --host 0.0.0.0 exposes the app")
    # A host name bound to a loopback address (Debian maps the machine's own name to 127.0.1.1): no
    # warning, and the Host check stays (it was turned off for any name).
    import nitrofusion.app.cli as app_cli

    with pytest.MonkeyPatch.context() as m:
        m.setattr(app_cli, "bind", lambda host, port: socket.create_server(("127.0.0.1", 0)))
        with pytest.raises(UserError):
            run(parser.parse_args(["app", "--host", "this-machine", "--model", str(tmp_path / "nothing")]))
    assert capsys.readouterr().err == ""
    # An empty model is said as such, not taken as the working directory.
    for value in ("x=", " "):
        with pytest.raises(SystemExit):
            parser.parse_args(["app", "--model", value])
        assert "names no model" in capsys.readouterr().err


# --- scheduling, with a model whose generation the test holds and releases -------------------------------


class GatedModel(LoadedModel):
    """Returns the prompt as the "image"; each generation waits until the test opens the gate."""

    def __init__(self, name: str = "gated") -> None:
        super().__init__(name, "test", None, "shift-lcm", default_size=32, size_multiple=8, token_limit=77)
        self.gate = threading.Event()
        self.started: list[str] = []
        self.active = 0
        self.max_active = 0
        self.fail_next = False
        self.failure = "boom"
        self._lock = threading.Lock()

    def render(self, prompt: str, steps: int, seed: int, width: int, height: int, interrupt=None) -> Rendered:
        with self._lock:
            self.started.append(prompt)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            deadline = time.monotonic() + 10
            while not self.gate.wait(0.005):  # a "step" at a time, as a pipeline's loop asks `interrupt`
                if interrupt is not None and interrupt():
                    raise Interrupted()
                assert time.monotonic() < deadline, "the test never opened the gate"
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError(self.failure)
            return Rendered(prompt.encode(), seed, 0.001)
        finally:
            with self._lock:
                self.active -= 1


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


def _run_with(app, scenario) -> None:
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=10) as c:

            def post(prompt: str, client: str | None = None, request_id: int | None = None, model=None):
                body = {"prompt": prompt, "client": client, "request_id": request_id, "model": model}
                return asyncio.ensure_future(c.post("/api/generate", json={k: v for k, v in body.items() if v}))

            await scenario(c, post)

    asyncio.run(main())


def test_latest_request_per_client_wins():
    m = GatedModel()
    app = create_app([m])
    worker = app.state.workers["gated"]

    async def scenario(c, post):
        first = post("a", "A", 1)
        await _until(lambda: m.started == ["a"])
        second = post("ab", "A", 2)
        await _until(lambda: worker.state()["waiting"] == 1)
        third = post("abc", "A", 3)
        # The waiting request is dropped at once, not queued behind the running one.
        r2 = await asyncio.wait_for(second, 5)
        assert r2.status_code == 409 and r2.json()["superseded"] is True
        m.gate.set()
        r1, r3 = await first, await third
        # Finished after a newer request arrived: delivered all the same, marked, so the page can show it
        # until the newer image comes (a user typing faster than the model draws sees the picture follow).
        assert r1.status_code == 200 and r1.content == b"a" and r1.headers["x-superseded"] == "true"
        assert r3.status_code == 200 and r3.content == b"abc" and r3.headers["x-request-id"] == "3"
        assert r3.headers["x-superseded"] == "false"
        assert m.started == ["a", "abc"], "the stale keystroke was never generated"
        assert worker.state() == {"running": False, "waiting": 0, "completed": 1, "superseded": 1, "stale": 1,
                                  "busy": 0, "failed": 0, "abandoned": 0}  # fmt: skip

    _run_with(app, scenario)


def test_out_of_order_request_id_is_stale():
    m = GatedModel()
    m.gate.set()

    app = create_app([m])

    async def scenario(c, post):
        assert (await post("new", "A", 5)).status_code == 200
        r = await post("old", "A", 4)
        assert r.status_code == 409 and "superseded" in r.json()["error"]
        assert (await post("newer", "A", 6)).status_code == 200
        assert m.started == ["new", "newer"]
        assert app.state.workers["gated"].state()["superseded"] == 1

    _run_with(app, scenario)


def test_clients_do_not_supersede_each_other_and_one_generation_runs_at_a_time():
    m = GatedModel()
    app = create_app([m])

    async def scenario(c, post):
        tasks = [post(f"p{i}", f"client-{i}") for i in range(5)] + [post("anonymous"), post("anonymous too")]
        await _until(lambda: app.state.workers["gated"].state()["waiting"] == 6)
        # While a generation holds the model, the event loop still answers.
        assert (await c.get("/api/health")).json()["models"]["gated"]["running"] is True
        m.gate.set()
        replies = await asyncio.gather(*tasks)
        assert [r.status_code for r in replies] == [200] * 7
        assert sorted(r.content for r in replies) == sorted(p.encode() for p in m.started)
        assert m.max_active == 1

    _run_with(app, scenario)


def test_full_queue_is_503_and_the_line_keeps_moving():
    m = GatedModel()
    app = create_app([m], queue_size=2)

    async def scenario(c, post):
        running = post("running", "A")
        await _until(lambda: m.started == ["running"])
        waiting = [post("b", "B"), post("c", "C")]
        await _until(lambda: app.state.workers["gated"].state()["waiting"] == 2)
        r = await post("d", "D")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "busy" in _error_of(r) and r.json()["busy"] is True  # what a page retries on
        # A waiting client's newer request replaces its own place in line: not "busy".
        waiting[0] = post("bb", "B")
        m.gate.set()
        assert (await running).status_code == 200
        replies = [await t for t in waiting]
        assert [(r.status_code, r.content) for r in replies] == [(200, b"bb"), (200, b"c")]
        assert app.state.workers["gated"].state()["busy"] == 1

    _run_with(app, scenario)


def test_a_request_refused_as_busy_supersedes_nothing():
    """A's next keystroke finds the line full: 503, and A's image being generated is not lost to it."""
    m = GatedModel()
    app = create_app([m], queue_size=1)

    async def scenario(c, post):
        running = post("a", "A", 1)
        await _until(lambda: m.started == ["a"])
        waiting = post("b", "B", 1)
        await _until(lambda: app.state.workers["gated"].state()["waiting"] == 1)
        assert (await post("ab", "A", 2)).status_code == 503
        m.gate.set()
        r = await running
        assert r.status_code == 200 and r.content == b"a" and r.headers["x-superseded"] == "false"
        assert (await waiting).status_code == 200
        assert (await post("ab", "A", 2)).status_code == 200, "the refused request id was not taken either"

    _run_with(app, scenario)


def test_a_request_whose_client_hung_up_leaves_the_line_and_is_never_drawn():
    """A script's timeout or a closed tab: the request kept its place in line and was drawn for
    nobody, holding up the clients still waiting. Over real sockets, as uvicorn reports a hang-up."""
    import json

    m = GatedModel()
    app = create_app([m], queue_size=1)
    worker = app.state.workers["gated"]

    def until(condition) -> None:
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)

    def send(sock: socket.socket, prompt: str, client: str) -> None:
        body = json.dumps({"prompt": prompt, "client": client}).encode()
        head = ["POST /api/generate HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
        sock.sendall("\r\n".join([*head, f"Content-Length: {len(body)}", "", ""]).encode() + body)

    with ServerThread(app) as server:
        running = socket.create_connection((server.host, server.port))
        send(running, "a", "A")
        until(lambda: m.started == ["a"])
        gone = socket.create_connection((server.host, server.port))
        send(gone, "b", "B")
        until(lambda: worker.state()["waiting"] == 1)
        gone.close()
        until(lambda: worker.state()["waiting"] == 0)
        assert worker.stats["abandoned"] == 1
        # The freed place takes the next client at once (the line holds one): no 503.
        with httpx.Client(base_url=server.url, timeout=10) as c:
            waiting = threading.Thread(target=lambda: c.post("/api/generate", json={"prompt": "c", "client": "C"}))
            waiting.start()
            until(lambda: worker.state()["waiting"] == 1)
            m.gate.set()
            waiting.join(10)
        assert running.recv(4096).startswith(b"HTTP/1.1 200")
        running.close()
        until(lambda: worker.stats["completed"] == 2)
    assert m.started == ["a", "c"]


def test_shutting_down_answers_the_waiting_at_once_and_stops_the_image_being_drawn():
    """Ctrl-C: uvicorn alone let every open request finish, so each queued image was drawn before
    the app exited, and a second Ctrl-C answered the waiting 500 with a traceback each."""
    m = GatedModel()
    app = create_app([m])
    worker = app.state.workers["gated"]
    server = ServerThread(app).start()
    replies: dict[str, httpx.Response] = {}

    def post(prompt: str) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            replies[prompt] = c.post("/api/generate", json={"prompt": prompt, "client": prompt})

    posts = [threading.Thread(target=post, args=(p,)) for p in ("a", "b", "c")]
    posts[0].start()
    deadline = time.monotonic() + 5
    while m.started != ["a"]:
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    for t in posts[1:]:
        t.start()
    while worker.state()["waiting"] != 2:
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    t0 = time.monotonic()
    server.stop()  # as a Ctrl-C does: uvicorn's shutdown; the gate is never opened
    for t in posts:
        t.join(10)
    assert time.monotonic() - t0 < 5, "the shutdown waited for the image being drawn"
    assert sorted(replies) == ["a", "b", "c"]
    for r in replies.values():
        assert r.status_code == 503 and "shutting down" in r.json()["error"]
    assert m.started == ["a"], "a waiting request was drawn"
    assert worker.state() | {"running": False} == {"running": False, "waiting": 0, "completed": 0, "superseded": 0,
                                                   "stale": 0, "busy": 0, "failed": 0, "abandoned": 0}  # fmt: skip


SERVE_UNSTOPPABLE = """
import sys, time
from nitrofusion.app.server import AppServer, LoadedModel, Rendered, create_app, ServerThread

class Unstoppable(LoadedModel):  # one long call that never asks to be interrupted (the fast path's)
    def render(self, prompt, steps, seed, width, height, interrupt=None):
        print("drawing", flush=True)
        time.sleep(3)
        return Rendered(prompt.encode(), seed, 3.0)

app = create_app([Unstoppable("m", "test", None, "shift-lcm", default_size=32, size_multiple=8, token_limit=77)])
server = ServerThread(app)  # its socket and port; served here, in the main thread, as `nitrofusion app` does
print(server.port, flush=True)
try:
    server.server.run(sockets=[server.socket])
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_second_ctrl_c_answers_the_request_still_drawing_without_a_traceback(tmp_path):
    """uvicorn's forced exit cancelled the request whose image was being drawn: a 500 and a traceback."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "serve.py"
    script.write_text(SERVE_UNSTOPPABLE)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        replies = {}

        def post(prompt: str) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as c:
                replies[prompt] = c.post("/api/generate", json={"prompt": prompt, "client": prompt})

        posts = [threading.Thread(target=post, args=(p,)) for p in ("a", "b")]
        posts[0].start()
        assert proc.stdout.readline() == "drawing\n"
        posts[1].start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        for t in posts:
            t.join(20)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert [replies[p].status_code for p in ("a", "b")] == [503, 503]
    assert all("shutting down" in r.json()["error"] for r in replies.values())
    assert "Traceback" not in err and "shutting down" in err, err
    # 130: uvicorn re-raises the Ctrl-C it caught once it has stopped. One full run on a loaded machine
    # saw 0 (no KeyboardInterrupt reached the script) with the same 503s: either way it stopped cleanly.
    assert proc.returncode in (0, 130), err


def test_switching_models_frees_the_old_models_place_in_line_at_once():
    one, two = GatedModel("one"), GatedModel("two")
    app = create_app([one, two])

    async def scenario(c, post):
        running = post("b", "B", 1, model="one")
        await _until(lambda: one.started == ["b"])
        waiting = post("a", "A", 1, model="one")
        await _until(lambda: app.state.workers["one"].state()["waiting"] == 1)
        two.gate.set()
        moved = await post("a", "A", 2, model="two")  # A switched models while waiting for "one"
        assert moved.status_code == 200
        r = await asyncio.wait_for(waiting, 5)  # answered at once, not when "one" came free
        assert r.status_code == 409 and app.state.workers["one"].state()["waiting"] == 0
        one.gate.set()
        assert (await running).status_code == 200 and one.started == ["b"]

    _run_with(app, scenario)


def test_failed_generation_answers_500_and_server_goes_on():
    m = GatedModel()
    m.gate.set()
    m.fail_next = True

    async def scenario(c, post):
        r = await post("x")
        assert r.status_code == 500 and "RuntimeError" in _error_of(r)
        assert (await post("y")).status_code == 200

    _run_with(create_app([m]), scenario)


def test_the_cpu_allocators_out_of_memory_answers_503_like_a_gpus():
    """On a CPU it is a plain RuntimeError, which answered 500 "see the server log"."""
    m = GatedModel()
    m.gate.set()
    m.fail_next, m.failure = True, "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"

    async def scenario(c, post):
        r = await post("x")
        assert r.status_code == 503 and "try a smaller size" in _error_of(r)
        # Not to be retried as it stands: the page retried every 503, this one forever.
        assert "retry-after" not in r.headers and "busy" not in r.json()
        assert (await post("y")).status_code == 200

    _run_with(create_app([m]), scenario)


def test_without_max_size_each_model_serves_up_to_four_times_its_own_size(embedded):
    """A 32-px CPU model served up to 1024 px: one request drew for minutes (its teacher for hours)."""
    big = dataclasses.replace(embedded, name="big", default_size=512)
    with TestClient(create_app([embedded, big]), base_url=LOCAL) as c:
        served = {m["name"]: m["max_size"] for m in c.get("/api/models").json()["models"]}
        assert served == {"embedded": 128, "big": 1024}  # 4x, at most 1024
        assert _post(c, width=128, height=128).status_code == 200
    with TestClient(create_app([embedded], max_size=256), base_url=LOCAL) as c:  # --max-size: as given
        assert c.get("/api/models").json()["models"][0]["max_size"] == 256


def test_models_are_picked_by_name_and_each_has_its_own_worker():
    a, b = GatedModel("a"), GatedModel("b")
    app = create_app([a, b])

    async def scenario(c, post):
        ta = post("to a", "A")
        await _until(lambda: a.started == ["to a"])
        # b is free while a is busy; the default model is the first one.
        b.gate.set()
        rb = await post("to b", "B", model="b")
        assert rb.status_code == 200 and rb.headers["x-model"] == "b"
        # Switching model supersedes the same client's request waiting for the other model.
        stale = post("a again", "C")
        await _until(lambda: app.state.workers["a"].state()["waiting"] == 1)
        assert (await post("moved to b", "C", model="b")).status_code == 200
        a.gate.set()
        assert (await ta).status_code == 200 and (await stale).status_code == 409
        assert a.started == ["to a"]

    _run_with(app, scenario)


def test_client_memory_is_bounded():
    slots = ClientSlots(capacity=3)
    tickets = [slots.claim(f"c{i}") for i in range(10)]
    assert len(slots._latest) == 3
    assert slots.is_current(tickets[-1]) and slots.is_current(tickets[0])  # forgotten clients are never stale
    anonymous = [slots.claim(None) for _ in range(5)]
    assert len(slots._latest) == 3 and all(slots.is_current(t) for t in anonymous)


def test_a_failed_or_silent_disconnect_watch_abandons_nothing():
    """Only a watch that saw the hang-up frees a place: one that raised (or a server that never
    reports a disconnect) leaves the request waiting for its image."""
    m = GatedModel()
    app = create_app([m], queue_size=2)
    worker = app.state.workers["gated"]

    failed = []

    async def broken():
        failed.append(True)
        raise RuntimeError("the server's receive failed")

    async def silent():  # a server that never reports the hang-up
        await asyncio.Event().wait()

    async def scenario(c, post):
        from nitrofusion.app.server import Ticket

        running = post("a", "A")
        await _until(lambda: m.started == ["a"])
        waiting = asyncio.ensure_future(worker.submit(Ticket("B", 10**6), lambda: "b", broken))
        unheard = asyncio.ensure_future(worker.submit(Ticket("C", 10**6), lambda: "c", silent))
        await _until(lambda: worker.state()["waiting"] == 2 and failed)
        for _ in range(10):  # the failed watch's exception handled, whatever it does
            await asyncio.sleep(0)
        assert worker.state()["waiting"] == 2 and worker.stats["abandoned"] == 0
        m.gate.set()
        assert (await running).status_code == 200
        assert [(await asyncio.wait_for(w, 5))[0] for w in (waiting, unheard)] == ["b", "c"]

    _run_with(app, scenario)
