"""The page as a server under load, on 127.0.0.1: several clients of Gradio's API at once, each
answered with its own images; a flood told the page is busy; limits held whatever a client sends."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foundation.errors import UserError
from pipelines import app_actions as actions
from pipelines.pipeline import sample_grid
from tests.test_app import free_port, pipe, pixels  # noqa: F401 (pipe: the fixture)

CLIENTS = 4


def resident_mb() -> float:
    """This process's resident memory (the server runs in it, in threads)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


@pytest.fixture
def serve(trained_run, pipe, tiny_fashion_dir, monkeypatch):  # noqa: F811
    """Start the page, as `python -m pipelines.app` would, and give its address; closed after."""
    pytest.importorskip("gradio_client")
    from pipelines import app

    pages = []

    def start(queue_size: int = app.QUEUE_SIZE) -> str:
        monkeypatch.setattr(app, "QUEUE_SIZE", queue_size)
        monkeypatch.setenv("VQ_DATA_DIR", str(tiny_fashion_dir))
        page = app.build_page(pipe, trained_run)
        port = free_port()
        app.launch(page, port, network=False, block=False)
        pages.append(page)
        return f"http://127.0.0.1:{port}"

    yield start
    for page in pages:
        page.close()


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def draw(url: str, seed: int, n: int = 12) -> tuple[np.ndarray, str]:
    image, text = client(url).predict(actions.EVERY_CLASS, n, 1.0, 1.0, 0, seed, 8, "identity", api_name="/draw")
    return pixels(Image.open(image["path"] if isinstance(image, dict) else image)), text


def expected_draw(pipe, seed: int, n: int = 12) -> np.ndarray:  # noqa: F811
    samples = pipe(n=n, seed=seed, guidance=1.0, output_type="pt")
    return pixels(actions.to_pil(sample_grid(samples.images, samples.labels)))


def complete(url: str, upload: Path, seed: int) -> np.ndarray:
    from gradio_client import handle_file

    session = client(url)  # the chosen image is the session's state: upload, then complete, as one visitor
    session.predict(handle_file(str(upload)), api_name="/upload")
    image, text = session.predict("bottom", {"background": None, "layers": [], "composite": None}, 2, None, seed,
                                  api_name="/complete")
    assert "completions" in text, text
    return pixels(Image.open(image["path"] if isinstance(image, dict) else image))


def test_clients_drawing_and_completing_at_once_each_get_their_own_images(serve, pipe, tmp_path):  # noqa: F811
    url = serve()
    upload = tmp_path / "mine.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1))).save(upload)
    image = pipe.prepare_images(upload)[0]
    draw(url, 0)  # warm-up, then memory measured over rounds of every client at once
    before = resident_mb()
    for round_ in range(3):
        with ThreadPoolExecutor(CLIENTS * 2) as pool:
            drawn = {seed: pool.submit(draw, url, seed) for seed in range(round_ * CLIENTS, (round_ + 1) * CLIENTS)}
            completed = {seed: pool.submit(complete, url, upload, seed) for seed in range(CLIENTS)}
            for seed, answer in drawn.items():
                shown, text = answer.result(timeout=60)
                assert f"seed {seed})" in text and np.array_equal(shown, expected_draw(pipe, seed)), f"draw, seed {seed}"
            for seed, answer in completed.items():
                assert np.array_equal(answer.result(timeout=60), pixels(actions.complete(pipe, image, "bottom", None, 2, None, seed)[0]))
    assert resident_mb() - before < 200, "memory grew with every round of requests"


def test_a_flood_is_told_the_page_is_busy_and_the_queue_still_serves(serve, pipe, monkeypatch):  # noqa: F811
    real, running = actions.draw, threading.Event()

    def slow_draw(*args, **kwargs):  # each request holds the model for a while, as large draws do
        running.set()
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(actions, "draw", slow_draw)
    url = serve(queue_size=2)
    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(draw, url, seed) for seed in range(8)]
        errors = [answer.exception(timeout=60) for answer in answers]
    refused = [str(error) for error in errors if error is not None]
    assert 0 < len(refused) < 8 and all("queue is full" in message.lower() for message in refused), refused
    assert draw(url, 3)[0].shape == expected_draw(pipe, 3).shape  # served again once the flood has passed


@pytest.mark.parametrize("n, passes", [(10**6, 8), (0, 8), (4, 10**4)])
def test_limits_hold_on_the_server_whatever_the_client_sends(serve, pipe, n, passes):  # noqa: F811
    """Gradio refuses a slider's value out of its range; the action refuses it too, for any caller."""
    from gradio_client import Client

    url = serve()
    try:
        _, said = Client(url, verbose=False).predict(actions.EVERY_CLASS, n, 1.0, 1.0, 0, 0, passes, "identity", api_name="/draw")
    except Exception as error:  # gradio_client raises the server's sentence
        said = str(error)
    assert "maximum value" in said or "minimum value" in said or "the page takes 1 to" in said, said
    with pytest.raises(UserError, match="the page takes 1 to"):
        actions.draw(pipe, actions.EVERY_CLASS, n, 1.0, 1.0, 0, 0, passes)
    with pytest.raises(UserError, match="the page takes 1 to 8 at a time"):
        actions.complete(pipe, pipe.prepare_images(Image.new("L", (8, 8)))[0], "bottom", None, 10**3, None, 0)


def test_an_upload_in_a_format_the_page_does_not_name_is_refused_before_any_reader_runs(pipe, tmp_path):  # noqa: F811
    Image.new("RGB", (20, 20)).save(tmp_path / "drawing.bmp")  # a format PIL reads, but not one the page names
    with pytest.raises(UserError, match="drawing.bmp is not an image this page can read; upload a PNG, JPEG, WebP or GIF"):
        actions.read_upload(pipe, tmp_path / "drawing.bmp")
