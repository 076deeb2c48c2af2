"""Input fuzzing (hypothesis): the CLI's options, the config file and the app's JSON API.

Whatever comes in, the answer is a clean error -- exit status 2 with a message (CLI, config),
a 4xx JSON error (app) -- or the work starting; never a traceback, never a hang. The examples
per test are few in `make test` (the `ci` profile, deterministic) and many in `make soak`.
"""

from __future__ import annotations

import argparse
import json
import signal
from contextlib import contextmanager

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nitrofusion.cli import build_parser, main
from nitrofusion.errors import UserError
from nitrofusion.training.config import DistillConfig, load_config

FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
HANG_SECONDS = 60  # one example taking this long counts as hung


class Reached(Exception):
    """The input passed validation and the real work would start here."""


@contextmanager
def must_finish(seconds: float = HANG_SECONDS):
    def hung(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: hung")

    old = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- the CLI -------------------------------------------------------------------------------------


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


SUBCOMMANDS = _subcommands()
# Random host names would make every example wait on DNS; binding rules are tested in test_app.py.
NOT_FUZZED = {"--help", "-h", "--host"}
OPTIONS = {
    name: sorted({o for a in p._actions for o in a.option_strings} - NOT_FUZZED) for name, p in SUBCOMMANDS.items()
}
WORDS = [
    "embedded", "embedded-teacher", "demo", "sdxl", "native", "shift-lcm", "auto", "cpu", "cuda", "fp16", "bf16",
    "fp32", "inception", "clip", "fid", "imagereward", "latest", "loss.kind=hinge", "optim.lr=nan",
    "refine.steps_per_stage=[1,0,0,5]", "run.output_dir=", "=", "a photo of a sneaker",
]  # fmt: skip
HOSTILE_PATHS = ["/dev/zero", "/dev/null", "/dev/stdin", "/", "/proc/nonexistent/x", "../../etc/passwd", "-", ""]


def cli_values(tmp):
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"\x00\xff" * 64)
    pickle = tmp / "weights.bin"
    pickle.write_bytes(b"\x80\x04K\x01.")
    bad_yaml = tmp / "config.yaml"
    bad_yaml.write_text("loss: [unclosed\n")
    text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
    return st.one_of(
        st.sampled_from(WORDS + HOSTILE_PATHS + [str(tmp), str(garbage), str(pickle), str(bad_yaml)]),
        st.integers(-(10**12), 10**12).map(str),
        st.sampled_from(["0", "1", "2", "4", "5", "-1", "16", "33", "1e9", "nan", "inf", "-inf"]),
        st.floats().map(str),
        text,
    )


@st.composite
def command_lines(draw, values):
    name = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    tokens = draw(st.lists(st.one_of(st.sampled_from(OPTIONS[name] or ["--out"]), values), max_size=8))
    return [name, *tokens]


@pytest.fixture
def no_real_work(monkeypatch, tmp_path):
    """Stop each command where its heavy work would begin, once its input has been checked."""
    import uvicorn

    import nitrofusion.data.teacher
    import nitrofusion.evaluation.evaluate
    import nitrofusion.evaluation.reproduce
    import nitrofusion.pipelines
    import nitrofusion.training.distill
    import nitrofusion.world.train

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(nitrofusion.pipelines, "load_pipeline", reached)  # generate's first real work
    monkeypatch.setattr(nitrofusion.training.distill.Distiller, "__init__", reached)
    monkeypatch.setattr(nitrofusion.data.teacher, "make_pairs", reached)
    monkeypatch.setattr(nitrofusion.evaluation.evaluate, "evaluate", reached)
    monkeypatch.setattr(nitrofusion.evaluation.reproduce.Reproduction, "run", reached)
    monkeypatch.setattr(nitrofusion.world.train, "build_world", reached)
    monkeypatch.setattr(uvicorn.Server, "run", reached)
    monkeypatch.chdir(tmp_path)  # relative output paths land here
    return tmp_path


def test_fuzz_cli_options(no_real_work, capsys):
    @FUZZ
    @given(argv=command_lines(cli_values(no_real_work)))
    def check(argv):
        with must_finish():
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: usage error (2) or --version/--help (0)
                code = exc.code
            except Reached:
                code = None
        out, err = capsys.readouterr()
        event(f"{argv[0]}: {'work started' if code is None else f'exit {code}'}")
        assert "Traceback" not in err + out, (argv, err)
        assert code in (None, 0, 1, 2), (argv, code, err)
        if code == 2:
            assert "error:" in err, (argv, err)

    check()


# --- the config file and overrides ---------------------------------------------------------------


def _schema() -> dict[str, list[str]]:
    d = DistillConfig().to_dict()
    return {section: sorted(keys) for section, keys in d.items() if isinstance(keys, dict)}


SCHEMA = _schema()
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(), st.text(max_size=12))
yaml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def config_documents(draw):
    doc = {}
    for section in draw(st.lists(st.sampled_from(sorted(SCHEMA)) | st.text(max_size=8), max_size=4)):
        keys = SCHEMA.get(section, ["x"])
        doc[section] = draw(
            st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), yaml_values, max_size=4) | yaml_values
        )
    return doc


@st.composite
def overrides(draw):
    section = draw(st.sampled_from(sorted(SCHEMA)))
    key = draw(st.sampled_from(SCHEMA[section]) | st.text(max_size=6))
    value = draw(st.text(max_size=12) | yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()))
    return draw(st.sampled_from([f"{section}.{key}={value}", f"{key}={value}", value]))


def _loads_or_user_error(*args) -> None:
    with must_finish():
        try:
            cfg = load_config(*args)
        except UserError as exc:
            assert str(exc) and "\n" not in str(exc).strip(), str(exc)
            return
    assert isinstance(cfg, DistillConfig)


@FUZZ
@given(doc=config_documents(), sets=st.lists(overrides(), max_size=3))
def test_fuzz_config_documents_and_overrides(tmp_path_factory, doc, sets):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    _loads_or_user_error(None, path, sets)


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzz_config_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_bytes(raw)
    _loads_or_user_error("embedded", path, [])


# --- the app's JSON API ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["prompt", "steps", "seed", "width", "height", "model", "client", "request_id"]
sensible = {
    "prompt": st.sampled_from(["a photo of a sneaker", "", "   ", "x" * 5000, "../../etc/passwd", "\u202e\x00"]),
    "steps": st.integers(-2, 6),
    "seed": st.sampled_from([0, 1, -1, 2**32, 2**64, "random", None, "7"]),
    "width": st.sampled_from([0, 8, 16, 32, 33, 64, -8, 10**9]),
    "height": st.sampled_from([0, 8, 16, 32, 33, 64, -8, 10**9]),
    "model": st.sampled_from(["embedded", "../../etc", "/etc/passwd", "", None]),
    "client": st.text(max_size=10) | st.none(),
    "request_id": st.integers(-5, 5) | st.none(),
}


@st.composite
def bodies(draw):
    chosen = draw(st.lists(st.sampled_from(FIELDS), unique=True))
    body = {k: draw(sensible[k] | json_values) for k in chosen}
    body.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return draw(st.just(body) | json_values)


@pytest.fixture(scope="module")
def app_client():
    from fastapi.testclient import TestClient

    from nitrofusion.app.server import ModelSpec, create_app, load_models

    (model,) = load_models([ModelSpec()], device="cpu", warmup=False)
    with TestClient(create_app([model], max_size=64), base_url="http://127.0.0.1") as c:  # a name the app answers to
        yield c


ANSWERS = {200, 400, 404, 409, 413, 415, 422, 503}


def _answered_cleanly(r) -> None:
    assert r.status_code in ANSWERS, (r.status_code, r.text[:300])
    if r.status_code == 200:
        assert r.content.startswith(b"\x89PNG")
    else:
        assert r.headers["content-type"].startswith("application/json")
        error = r.json()["error"]
        assert error and "Traceback" not in error


@FUZZ
@given(body=bodies())
def test_fuzz_app_json(app_client, body):
    # Encoded here, not by the client (which refuses inf/nan): Python-style JSON with Infinity and
    # NaN is exactly what a hostile client can send (found by the soak: body=inf).
    content = json.dumps(body, allow_nan=True).encode()
    with must_finish():
        _answered_cleanly(
            app_client.post("/api/generate", content=content, headers={"content-type": "application/json"})
        )


@pytest.mark.parametrize(
    "body",
    [
        float("inf"),
        float("nan"),
        {"prompt": "a cat", "steps": float("inf")},
        {"prompt": "a cat", "seed": float("nan")},
        {"prompt": "a", "width": -float("inf")},
    ],
)
def test_app_answers_non_finite_json_numbers_cleanly(app_client, body):
    content = json.dumps(body, allow_nan=True).encode()
    r = app_client.post("/api/generate", content=content, headers={"content-type": "application/json"})
    _answered_cleanly(r)
    assert r.status_code == 422


@FUZZ
@given(
    raw=st.binary(max_size=400) | bodies().map(lambda b: json.dumps(b)[:-1].encode()),
    content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
)
def test_fuzz_app_raw_bytes(app_client, raw, content_type):
    with must_finish():
        _answered_cleanly(app_client.post("/api/generate", content=raw, headers={"content-type": content_type}))
    assert app_client.get("/api/health").json()["status"] == "ok"
