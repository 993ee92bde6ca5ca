"""The page of `python -m pipelines.app`: its actions as plain functions, then the page itself in a
real headless Chromium (Debian's `chromium`, driven by Playwright), served from a tiny run."""

import io
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from foundation.errors import UserError
from pipelines import app_actions as actions
from pipelines.pipeline import VQPipeline, sample_grid

SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output" / "app"


@pytest.fixture(scope="module")
def pipe(trained_run):
    return VQPipeline.from_run(trained_run, device="cpu")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_draw_shows_the_pipelines_images_for_that_seed(pipe):
    """Each cell of the shown grid against the image the pipeline draws for the seed, cut out by
    position (8 a row, 2 pixels apart), not rebuilt with the calls the action makes."""
    shown, text = actions.draw(pipe, "Dress", 12, None, 1.0, 0, seed=3)
    expected = pipe(n=12, labels="Dress", seed=3).images
    side = pipe.vqvae.image_size
    grid = pixels(shown)
    assert grid.shape[:2] == (2 + 2 * (side + 2), 2 + 8 * (side + 2)) and text.startswith("12 images")
    for i, image in enumerate(expected):
        top, left = 2 + (i // 8) * (side + 2), 2 + (i % 8) * (side + 2)
        assert np.array_equal(grid[top: top + side, left: left + side], pixels(image)), i
    other, _ = actions.draw(pipe, "Dress", 12, None, 1.0, 0, seed=4)
    assert not np.array_equal(pixels(other), grid)  # the seed is what was drawn with


def test_no_class_draws_without_guidance_whatever_the_slider_says(pipe):
    if actions.NO_CLASS not in actions.draw_labels(pipe):
        pytest.skip("this prior never learned its null label")
    shown, text = actions.draw(pipe, actions.NO_CLASS, 4, 2.0, 1.0, 0, seed=1)
    samples = pipe(n=4, labels="none", seed=1, output_type="pt")
    assert np.array_equal(pixels(shown), pixels(actions.to_pil(sample_grid(samples.images, samples.labels))))
    assert "unconditional" in text


def test_bad_uploads_and_an_empty_painting_are_one_sentence_each(pipe, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="notes.txt is not an image this page can read"):
        actions.read_upload(pipe, tmp_path / "notes.txt")
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(actions, "MAX_UPLOAD_PIXELS", 300 * 199)
    with pytest.raises(UserError, match=r"big.png is too large to read here \(300x200 pixels\)"):
        actions.read_upload(pipe, tmp_path / "big.png")
    image = pipe.prepare_images(Image.new("L", (40, 40)))[0]
    with pytest.raises(UserError, match="no image yet"):
        actions.complete(pipe, None, "bottom", None, 2, None, 0)
    with pytest.raises(UserError, match="nothing is painted yet"):
        actions.complete(pipe, image, actions.PAINTED, Image.new("RGBA", (64, 64)), 2, None, 0)


def test_a_painted_mask_redraws_the_painted_codes(pipe):
    image = pipe.prepare_images(Image.new("L", (40, 40), 200))[0]
    painted = Image.new("RGBA", (256, 256))
    painted.paste((255, 0, 255, 255), (0, 128, 256, 256))  # the bottom half
    by_paint, _ = actions.complete(pipe, image, actions.PAINTED, painted, 2, None, seed=1)
    by_name, _ = actions.complete(pipe, image, "bottom", None, 2, None, seed=1)
    assert np.array_equal(pixels(by_paint), pixels(by_name))


def test_a_raster_prior_offers_only_the_bottom_and_says_why(pipe):
    regions, note = actions.redraw_choices(pipe)
    assert regions == ["bottom", actions.PAINTED] and "MaskGIT" in note


def test_the_overview_names_the_data_the_models_and_the_figures(pipe, trained_run):
    described, _ = actions.overview(pipe, trained_run)
    assert "8x8 map of codes" in described and "transformer prior" in described
    with_figures = VQPipeline(pipe.vqvae, pipe.prior, {"stage1": {"mse": 0.0049}, "samples": {"fd_ratio": 4.8}})
    described, every = actions.overview(with_figures, None)
    assert "| Reconstruction error on test images (MSE; lower is better) | 0.0049 |" in described
    assert "| `samples.fd_ratio` | 4.8 |" in every


def test_the_inspect_tab_shows_each_stages_curves(trained_run):
    shown = actions.training_curves(trained_run)
    assert [path.parent.name for path, _ in shown] == ["vqvae", "prior"]
    assert all(Image.open(path).height == 220 for path, _ in shown)
    assert actions.training_curves(trained_run, "no_such_prior")[1:] == [] and actions.training_curves(None) == []


def test_a_maskgit_prior_offers_every_region():
    maskgit = SimpleNamespace(prior=SimpleNamespace(prior="maskgit"), vqvae=SimpleNamespace(map_shape=(8, 8)))
    regions, _ = actions.redraw_choices(maskgit)
    assert regions == ["bottom", "top", "left", "right", "center", actions.PAINTED]


def test_the_command_names_a_missing_run_and_a_taken_port(tmp_path, pipe, trained_run, tiny_fashion):
    pytest.importorskip("gradio")
    from pipelines import app

    with pytest.raises(UserError, match="no VQ-VAE in .*nothing"):
        app.main(["--run-dir", str(tmp_path / "nothing")])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} is taken"):
            app.launch(app.build_page(pipe, trained_run), port, network=False, block=False)


# The page in a browser.

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no chromium here; `make test` installs Debian's chromium where apt can")
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def served(trained_run, pipe, tiny_fashion_dir):
    pytest.importorskip("gradio")
    from pipelines.app import build_page, launch

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VQ_DATA_DIR", str(tiny_fashion_dir))  # the run's test images, for the Complete tab
        page = build_page(pipe, trained_run)
    port = free_port()
    launch(page, port, network=False, block=False)
    yield f"http://127.0.0.1:{port}"
    page.close()


def shown_image(tab, selector: str) -> Image.Image:
    """The PNG an <img> of the page shows, as the server sent it."""
    source = tab.locator(f"{selector} img").first.get_attribute("src")
    return Image.open(io.BytesIO(tab.request.get(source).body()))


def draw(tab, seed: int) -> None:
    tab.fill("#draw-seed input", str(seed))
    tab.click("#draw-button")
    tab.wait_for_function(f"document.querySelector('#draw-status').innerText.includes('seed {seed})')")


def test_the_page_draws_completes_and_survives_a_bad_upload(browser, served, pipe, tmp_path):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    first, second = browser.new_page(viewport={"width": 1400, "height": 1000}), browser.new_page()
    for tab in (first, second):
        tab.goto(served)
        tab.wait_for_selector("#draw-button")

    # Draw, in two tabs at once with different seeds: each shows the pipeline's grid for its own seed.
    first.fill("#draw-seed input", "5")
    second.fill("#draw-seed input", "6")
    first.click("#draw-button")
    second.click("#draw-button")
    for tab, seed in ((first, 5), (second, 6)):
        tab.wait_for_function(f"document.querySelector('#draw-status').innerText.includes('seed {seed})')")
        n = int(tab.input_value("#draw-n input[type=number]"))
        samples = pipe(n=n, seed=seed, output_type="pt")
        expected = actions.to_pil(sample_grid(samples.images, samples.labels))
        assert np.array_equal(pixels(shown_image(tab, "#draw-grid")), pixels(expected)), f"seed {seed}"
    first.screenshot(path=SCREENSHOTS / "1_draw.png", full_page=True)

    # Complete an upload of another size: its bottom half redrawn, as the pipeline completes it.
    Image.fromarray(np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (40, 1))).save(tmp_path / "mine.png")
    first.get_by_role("tab", name="Complete").click()
    with first.expect_file_chooser() as chooser:
        first.click("#complete-upload")
    chooser.value.set_files(tmp_path / "mine.png")
    first.wait_for_function("document.querySelector('#complete-status').innerText.includes('Image chosen')")
    first.click("#complete-button")
    first.wait_for_function("document.querySelector('#complete-status').innerText.includes('completions')")
    image = pipe.prepare_images(tmp_path / "mine.png")
    completed = pipe.complete(image, "bottom", 4, seed=0, output_type="pt")
    shown = pixels(shown_image(first, "#complete-result"))
    side = pipe.vqvae.image_size
    kept = shown[2:2 + side, 4 + side:4 + 2 * side]  # the second cell of the row (padding 2)
    expected_kept = (completed.kept[0].permute(1, 2, 0).expand(-1, -1, 3) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(kept, expected_kept)  # the original's reconstruction, its redrawn half grey
    expected, _ = actions.complete(pipe, image[0], "bottom", None, 4, None, 0)
    assert np.array_equal(shown, pixels(expected))
    first.screenshot(path=SCREENSHOTS / "2_complete.png", full_page=True)

    # A text file named as a PNG as an upload: a sentence on the page, and Draw still works afterwards.
    (tmp_path / "notes.png").write_text("not an image")
    with first.expect_file_chooser() as chooser:
        first.click("#complete-upload")
    chooser.value.set_files(tmp_path / "notes.png")
    first.wait_for_function("document.querySelector('#complete-status').innerText.includes('not an image')")
    first.screenshot(path=SCREENSHOTS / "3_bad_upload.png", full_page=True)
    first.get_by_role("tab", name="Draw").click()
    draw(first, 7)
    first.get_by_role("tab", name="Inspect").click()
    first.wait_for_selector("#inspect-overview")
    first.screenshot(path=SCREENSHOTS / "4_inspect.png", full_page=True)
