"""What the app and the loaders refuse: path traversal, clients naming files, exposure by default,
pickled weights and remote code. Each hostile payload would leave a marker file if it ran."""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import socket

import pytest

pytest.importorskip("fastapi", reason="the app needs fastapi (pip install fastapi uvicorn)")
httpx = pytest.importorskip("httpx", reason="the app tests need httpx")

import torch  # noqa: E402

from nitrofusion.app.server import ModelSpec, ServerThread, create_app, load_models  # noqa: E402
from nitrofusion.errors import UserError  # noqa: E402
from nitrofusion.pipelines.loading import load_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def server():
    (model,) = load_models([ModelSpec()], device="cpu", warmup=False)
    with ServerThread(create_app([model], max_size=64)) as s:
        yield s


def raw_get(server, target: str) -> tuple[int, bytes]:
    """Send the request line exactly as given (an HTTP client would normalise the dots away)."""
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.mark.parametrize(
    "target",
    [
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/api/..%2f..%2f..%2fetc%2fpasswd",
        "//etc/passwd",
        "/static/../../nitrofusion/app/server.py",
        "/api/generate/../../pyproject.toml",
        "/page.html",
    ],
)
def test_path_traversal_finds_nothing(server, target):
    status, data = raw_get(server, target)
    assert status in (400, 404, 405), data[:200]
    assert b"root:" not in data and b"import" not in data and b"[project]" not in data


def test_clients_cannot_name_files_as_models(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for model in ("../../etc/passwd", "/etc", str(shutil.which("python3")), "embedded-teacher"):
            r = c.post("/api/generate", json={"prompt": "a sneaker", "model": model})
            assert r.status_code == 404 and "unknown model" in r.json()["error"], r.text


def test_oversized_requests_are_refused_before_they_are_read(server):
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        head = "POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        s.sendall(f"{head}Content-Length: {10**9}\r\nConnection: close\r\n\r\n".encode())
        reply = s.recv(65536)  # answered although not a byte of the announced gigabyte was sent
    assert reply.startswith(b"HTTP/1.1 413")


def test_app_binds_loopback_unless_told(monkeypatch):
    import uvicorn

    from nitrofusion.cli import main

    bound = []

    def capture(self, sockets):
        bound.append(sockets[0].getsockname()[0])

    monkeypatch.setattr(uvicorn.Server, "run", capture)
    assert main(["app", "--port", "0", "--no-warmup"]) == 0
    assert bound == ["127.0.0.1"]


# --- only safetensors, never remote code ---------------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@contextlib.contextmanager
def no_unpickling():
    """Any attempt to unpickle fails the test: torch's weights-only loading would stop the payload
    above, so the marker alone could not tell an attempted load from none."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "load", refuse)
        m.setattr(pickle, "load", refuse)
        m.setattr(pickle, "loads", refuse)
        m.setattr(pickle, "Unpickler", refuse)
        yield


def test_pickled_pipeline_weights_are_never_loaded(tiny_sdxl_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_sdxl_dir, model)
    marker = tmp_path / "unpickled"
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with (
        no_unpickling(),
        pytest.raises(UserError, match=r"pickle files \(unet/diffusion_pytorch_model.bin\).*never unpickled"),
    ):
        load_pipeline(model, device="cpu")
    assert not marker.exists()


def test_pickled_student_is_never_loaded(tiny_sdxl_dir, tmp_path):
    marker = tmp_path / "unpickled"
    student = tmp_path / "student.safetensors"  # a pickle under a safetensors name
    student.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_pipeline(tiny_sdxl_dir, unet=student, device="cpu")
    assert not marker.exists()


EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('remote code ran')\n"


@pytest.mark.parametrize("where", ["component", "pipeline"])
def test_remote_code_in_a_model_directory_is_never_run(tiny_sdxl_dir, tmp_path, where):
    model = tmp_path / "model"
    shutil.copytree(tiny_sdxl_dir, model)
    marker = tmp_path / "ran"
    index = json.loads((model / "model_index.json").read_text())
    if where == "component":  # a UNet class from a module shipped in the directory
        (model / "unet" / "evil_unet.py").write_text(EVIL.format(marker=str(marker)) + "class EvilUNet: pass\n")
        index["unet"] = ["evil_unet", "EvilUNet"]
    else:  # a custom pipeline class next to model_index.json
        (model / "pipeline.py").write_text(EVIL.format(marker=str(marker)) + "class EvilPipeline: pass\n")
        index["_class_name"] = "EvilPipeline"
    (model / "model_index.json").write_text(json.dumps(index))
    refusal = "comes from 'evil_unet'; only diffusers" if where == "component" else "not one of diffusers' own"
    with pytest.raises(UserError, match=refusal):
        load_pipeline(model, device="cpu")
    assert not marker.exists()
