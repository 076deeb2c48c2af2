"""The app's page in a real browser: Debian's chromium driven by Playwright against the real server
(uvicorn on a free loopback port, the embedded student). Writes a screenshot to
outputs/test-artefacts/app.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTEFACT = Path(__file__).resolve().parents[1] / "outputs" / "test-artefacts" / "app.png"
# No first-run, sync, update or other background traffic: the page must be the only thing talking.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytest.importorskip("fastapi", reason="the app needs fastapi (pip install fastapi uvicorn)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

from nitrofusion.app.server import LoadedModel, ModelSpec, Rendered, ServerThread, create_app, load_models  # noqa: E402


@pytest.fixture(scope="module")
def server():
    models = load_models([ModelSpec()], device="cpu", warmup=True)
    with ServerThread(create_app(models)) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


IMAGE_IS_LATEST = "() => { const i = document.getElementById('image'); return i.dataset.requestId === String(requestId)"
IMAGE_IS_LATEST += " && i.complete && i.naturalWidth > 0; }"
IMAGE_BYTES = "async () => Array.from(new Uint8Array(await (await fetch(document.getElementById('image').src))"
IMAGE_BYTES += ".arrayBuffer()))"


def test_image_follows_typing_and_steps(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 720})
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if "/api/generate" in r.url else None)
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#model option").all_inner_texts() == ["embedded"]
    assert page.locator("#size").input_value() == "32"

    # Type like a person: a request per keystroke; the newest one's image ends on screen.
    page.locator("#prompt").press_sequentially("a photo of a sneaker", delay=25)
    page.wait_for_function(IMAGE_IS_LATEST, timeout=15_000)
    first_src, first_bytes = page.locator("#image").get_attribute("src"), page.evaluate(IMAGE_BYTES)
    assert first_src.startswith("blob:") and bytes(first_bytes[:4]) == b"\x89PNG"
    assert page.locator("#image").get_attribute("data-steps") == "1"
    assert page.evaluate("requestId") == len("a photo of a sneaker")
    assert " ms to generate" in page.locator("#info").inner_text()
    assert page.locator("#download").get_attribute("href") == first_src
    assert page.locator("#download").get_attribute("download").endswith("-1step.png")

    # Another step count: a new image, different pixels.
    page.select_option("#steps", "4")
    page.wait_for_function(IMAGE_IS_LATEST, timeout=15_000)
    assert page.locator("#image").get_attribute("data-steps") == "4"
    assert page.locator("#image").get_attribute("src") != first_src
    assert page.evaluate(IMAGE_BYTES) != first_bytes
    assert "4 steps" in page.locator("#info").inner_text()
    assert page.locator("#notice").is_hidden() and page.locator("#error").is_hidden()

    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    ARTEFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTEFACT)

    # The page talked to this server only; no request failed with an error status.
    assert all(u.startswith((server.url, "blob:", "data:")) for u in requested), requested
    assert statuses and all(s in (200, 409) for s in statuses), statuses
    page.close()


def test_long_prompt_notice_and_errors(server, browser):
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]")
    page.locator("#prompt").fill("a photo of a red leather bag " * 15)
    page.wait_for_function(IMAGE_IS_LATEST, timeout=15_000)
    notice = page.locator("#notice")
    assert notice.is_visible() and "first 77" in notice.inner_text()

    # A bad seed is caught on the page; random seeds show the seed that was used.
    page.locator("#seed").fill("-3")
    assert page.locator("#error").is_visible()
    for typed in ("", "9007199254740993"):  # no seed (was sent as 0); past 2**53 (was sent as ...992)
        page.locator("#seed").fill(typed)
        assert page.locator("#error").is_visible() and "whole number" in page.locator("#error").inner_text()
    page.locator("#random").check()
    page.wait_for_function(IMAGE_IS_LATEST, timeout=15_000)
    assert page.locator("#error").is_hidden()
    assert page.locator("#seed").input_value() == page.locator("#image").get_attribute("data-seed")
    page.close()


class SlowModel(LoadedModel):
    """Draws a flat 32x32 PNG in 0.25 s: slower than a person types."""

    def __init__(self) -> None:
        super().__init__("slow", "test", None, "shift-lcm", default_size=32, size_multiple=8, token_limit=77)

    def render(self, prompt: str, steps: int, seed: int, width: int, height: int, interrupt=None) -> Rendered:
        import io
        import time

        from PIL import Image

        time.sleep(0.25)
        png = io.BytesIO()
        Image.new("RGB", (width, height), (len(prompt) * 9 % 256, 80, 160)).save(png, format="PNG")
        return Rendered(png.getvalue(), seed, 0.25)


def test_typing_faster_than_the_model_draws_still_shows_images_as_you_type(browser):
    """Each image that was being drawn when a newer keystroke came is shown (if nothing newer is), so
    the picture follows the typing, with "updating…", instead of staying blank until a pause."""
    with ServerThread(create_app([SlowModel()])) as server:
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_selector("body[data-ready=true]")
        page.evaluate(
            "() => { window.shownIds = []; new MutationObserver(() => window.shownIds.push("
            "Number(document.getElementById('image').dataset.requestId))).observe("
            "document.getElementById('image'), {attributes: true, attributeFilter: ['data-request-id']}); }"
        )
        page.locator("#prompt").press_sequentially("a photo of a red leather bag", delay=60)  # 1.7 s of typing
        typed = page.evaluate("requestId")
        shown_while_typing = page.evaluate("window.shownIds.slice()")
        page.wait_for_function(IMAGE_IS_LATEST, timeout=15_000)
        shown = page.evaluate("window.shownIds")
        assert len(shown_while_typing) >= 2, shown  # about one image per 0.25 s drawing, not none
        assert all(a < b for a, b in zip(shown, shown[1:])), "an older image replaced a newer one"
        assert shown[-1] == typed and "updating" not in page.locator("#info").inner_text()
        page.close()


class FlatModel(LoadedModel):
    """Draws a flat PNG at once, its colour from the step count."""

    def __init__(self, name: str, sampler: str, steps: tuple[int, ...], default_steps: int) -> None:
        super().__init__(name, "test", None, sampler, default_size=32, size_multiple=8, token_limit=77)
        self.steps, self.default_steps = steps, default_steps

    def render(self, prompt: str, steps: int, seed: int, width: int, height: int, interrupt=None) -> Rendered:
        import io

        from PIL import Image

        png = io.BytesIO()
        Image.new("RGB", (width, height), (steps * 9 % 256, 80, 160)).save(png, format="PNG")
        return Rendered(png.getvalue(), seed, 0.0)


def test_each_model_offers_its_own_steps(browser):
    """A student's 1-4 steps, a multi-step teacher's up to its own count, which it starts at."""
    student = FlatModel("student", "shift-lcm", (1, 2, 3, 4), 1)
    teacher = FlatModel("teacher", "native", (1, 2, 4, 8, 16, 25), 25)
    with ServerThread(create_app([student, teacher])) as server:
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator("#model option").all_inner_texts() == ["student", "teacher (25 steps)"]
        assert page.locator("#steps option").all_inner_texts() == ["1", "2", "3", "4"]
        page.locator("#prompt").fill("a photo of a bag")
        page.select_option("#steps", "2")
        page.wait_for_function(IMAGE_IS_LATEST, timeout=15_000)
        assert page.locator("#image").get_attribute("data-steps") == "2"

        page.select_option("#model", "teacher")
        assert page.locator("#steps option").all_inner_texts() == ["1", "2", "4", "8", "16", "25"]
        assert page.locator("#steps").input_value() == "25"
        page.wait_for_function(IMAGE_IS_LATEST, timeout=15_000)
        assert page.locator("#image").get_attribute("data-steps") == "25"
        page.select_option("#steps", "4")
        page.wait_for_function(IMAGE_IS_LATEST, timeout=15_000)
        assert page.locator("#image").get_attribute("data-steps") == "4"

        page.select_option("#model", "student")  # other steps offered: back to the student's own default
        assert page.locator("#steps option").all_inner_texts() == ["1", "2", "3", "4"]
        page.wait_for_function(IMAGE_IS_LATEST, timeout=15_000)
        assert page.locator("#image").get_attribute("data-steps") == "1"
        assert page.locator("#error").is_hidden()
        page.close()
