"""`nitrofusion app`: serve the real-time page and JSON API for models loaded once at start-up.

Standalone too: ``python -m nitrofusion.app.cli [options]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import sys
from collections.abc import Iterator

from nitrofusion.app import ModelSpec
from nitrofusion.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


class _ModelAction(argparse.Action):
    """--model [NAME=]PATH_OR_ID starts a new model entry."""

    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[no-untyped-def]
        name, sep, model = value.partition("=")
        named = sep and name and "/" not in name
        if not (model if named else value).strip():  # "" would be taken as the working directory
            parser.error(f"--model {value!r} names no model: give [NAME=]MODEL")
        spec = ModelSpec(model=model, name=name) if named else ModelSpec(model=value)
        namespace.models = [*(namespace.models or []), spec]


class _AppliesToModel(argparse.Action):
    """--unet / --lora / --shift / --guidance-scale / --steps apply to the --model given before them (or to the
    default model)."""

    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[no-untyped-def]
        if not namespace.models:
            namespace.models = [ModelSpec()]
        spec = namespace.models[-1]
        if getattr(spec, self.dest) is not None:
            parser.error(f"{option_string} given twice for one --model")
        setattr(spec, self.dest, value)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `app` on the `nitrofusion` command's subparsers."""
    a = subparsers.add_parser("app", help="local real-time app: the image follows the prompt as you type")
    _add_arguments(a)
    a.set_defaults(func=run)
    return a


def _add_arguments(a: argparse.ArgumentParser) -> None:
    a.add_argument(
        "--model",
        dest="models",
        action=_ModelAction,
        metavar="[NAME=]MODEL",
        help="a model to serve (repeatable; the first is the default): 'embedded' (the shipped student, default), "
        "'embedded-teacher', 'embedded-flow-teacher', a diffusers pipeline directory or a hub id (from the local "
        "cache, else downloaded unless HF_HUB_OFFLINE is set); NAME is what the page shows",
    )
    a.add_argument(
        "--unet", dest="unet", action=_AppliesToModel, help="student UNet (.safetensors) for the preceding --model"
    )
    a.add_argument(
        "--lora",
        dest="lora",
        action=_AppliesToModel,
        help="a LoRA (.safetensors) fused into the preceding --model (default: the embedded teacher); export-lora's "
        "samples as its student",
    )
    a.add_argument("--shift", dest="shift", type=int, action=_AppliesToModel, help="timestep shift for it")
    a.add_argument(
        "--guidance-scale",
        dest="guidance_scale",
        type=float,
        action=_AppliesToModel,
        help="CFG scale for it (default: 0 for shift-lcm, else its pipeline's own: SDXL 5, SD1.5 7.5, SD3 7; "
        "SD3.5-Large-Turbo needs 0)",
    )
    a.add_argument(
        "--steps",
        dest="steps",
        type=int,
        action=_AppliesToModel,
        help="the step count it samples at unless the page asks for another (default: 1 for a distilled model, "
        "a multi-step model's own; SD3.5-Large-Turbo's is 4)",
    )
    a.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    a.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    a.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    a.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16")
    a.add_argument(
        "--compile",
        action="store_true",
        help="CUDA: compile, capture a sample per step count as a CUDA graph at start-up (default size only)",
    )
    a.add_argument("--no-safety-checker", action="store_true", help="leave out the models' safety checkers (SD1.5's)")
    a.add_argument(
        "--max-size",
        type=int,
        help="largest width or height a request may ask for (default: 4x each model's own size, at most 1024)",
    )
    a.add_argument("--queue-size", type=int, default=32, help="requests that may wait per model (one per client)")
    a.add_argument("--no-warmup", action="store_true", help="skip sampling one image per model at start-up")
    a.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the server's log (default warning; info logs each request)",
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def bind(host: str, port: int) -> socket.socket:
    """Bind before loading models, so a taken port fails in one line and at once."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0 to 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        return socket.create_server((host, port), family=family)
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve --host '{host}': {exc.strerror}") from None
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


@contextlib.contextmanager
def quiet_truncation() -> Iterator[None]:
    """A prompt past the text encoders' limit is said to the page (X-Prompt-Truncated, the notice
    under the field), not logged: the app draws at every keystroke, and each would log a warning
    quoting the user's prompt (ours, and diffusers' for the pipelines it samples itself)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("nitrofusion.pipelines.fast", "diffusers.pipelines")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run(args: argparse.Namespace) -> int:
    try:
        from nitrofusion.app.server import LOOPBACK_HOSTS, AppServer, create_app, load_models
    except ImportError as exc:
        raise UserError(
            f"the app needs fastapi and uvicorn ({exc.name} is missing): pip install fastapi uvicorn"
        ) from None

    if (args.max_size is not None and args.max_size < 8) or args.queue_size < 1:
        raise UserError("--max-size must be at least 8 and --queue-size at least 1")
    sock = bind(args.host, args.port)  # first: a host that cannot be bound is one line, no warning
    # By the address bound, not the name given: a host name of this machine (Debian maps it to
    # 127.0.1.1) is loopback too, and must keep the Host-header check against DNS rebinding.
    loopback = is_loopback(args.host) or is_loopback(str(sock.getsockname()[0]))
    if not loopback:
        print(
            f"warning: --host {args.host} exposes the app to the network, with no authentication; "
            "anyone who can reach it can use this machine's compute",
            file=sys.stderr,
        )
    try:
        models = load_models(
            args.models or [],
            device=args.device,
            dtype=args.dtype,
            warmup=not args.no_warmup,
            compile=args.compile,
            safety_checker=not args.no_safety_checker,
            max_size=args.max_size,
        )
        # On loopback, only this machine's own names are answered (DNS rebinding); exposed on purpose, any.
        hosts = (*LOOPBACK_HOSTS, args.host) if loopback else ("*",)
        app = create_app(models, max_size=args.max_size, queue_size=args.queue_size, hosts=hosts)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"nitrofusion app: http://{shown}:{port}  (models: {', '.join(m.name for m in models)})", flush=True)
        server = AppServer(app, log_level=args.log_level)
        with quiet_truncation():
            server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    # As in `nitrofusion`'s own entry point: keep transformers' import-time notices off stderr.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(prog="nitrofusion app", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"nitrofusion app: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
