"""`python -m pipelines.app`: a page in the browser to draw, complete and inspect a trained run.

Needs Gradio (`pip install -e '.[app]'`). It serves one run (`--run-dir`, or a Hub model with
`--hub user/name`) at http://127.0.0.1:7860, on this machine only unless `--network`. Draw
gives `pipelines.sample`'s images for the same seed; Complete redraws part of a test image or
of an upload; Inspect shows the run's figures. Several tabs can use it at once: Gradio queues
their requests and answers each tab alone.
"""

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from foundation.cli import parse_config
from foundation.errors import UserError, run_cli
from foundation.training import use_all_cores
from pipelines import app_actions as actions
from pipelines.pipeline import VQPipeline
from stage2_prior.priors import PARALLEL_PRIORS

# Small images shown large, each pixel a sharp square, as the reader looks at them at 3x zoom.
PAGE_CSS = """
.pixels img, .pixels canvas { image-rendering: pixelated; }
#draw-grid img, #complete-result img, #inspect-reconstructions img { width: 100%; height: 100%; object-fit: contain; }
"""
CANVAS = 256  # the chosen image is painted on at this size, whatever the run's
MAX_UPLOAD = "20mb"
# Every event that runs a model shares one slot: the models' buffers (a captured decoding graph
# on a GPU) serve one call at a time. Beyond QUEUE_SIZE waiting requests a visitor is told the
# page is busy rather than left waiting behind an hour of others' work.
MODEL = dict(concurrency_id="model", concurrency_limit=1)
QUEUE_SIZE = 16


@dataclass
class AppConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "the run to serve (holding vqvae/ and the prior)"})
    hub: str | None = field(default=None, metadata={"help": "serve a model from the Hub instead (user/name, as save_pretrained wrote it)"})
    prior_dir: str = field(default="prior", metadata={"help": "folder of the prior inside the run (stage two's --prior-dir)"})
    port: int = field(default=7860, metadata={"help": "port to serve on"})
    network: bool = field(default=False, metadata={"help": "serve to the whole network (0.0.0.0), not only this machine: anyone who can "
                                                          "reach it can use the model and your CPU or GPU"})
    device: str = field(default="auto", metadata={"help": "where to run the models", "choices": ["auto", "cuda", "mps", "cpu"]})


def import_gradio():
    try:
        import gradio
    except ImportError:
        raise UserError("the page needs Gradio, which is not installed; install it with `pip install -e '.[app]'`") from None
    return gradio


def build_page(pipe: VQPipeline, run_dir: Path | None = None, prior_dir: str = "prior"):
    """The page as a `gradio.Blocks`: three tabs over one pipeline. Each handler turns a
    `UserError` into a line on the page and leaves what was shown before."""
    gr = import_gradio()
    title = f"{pipe.dataset or (run_dir.name if run_dir else 'a trained run')}: VQ-VAE and {pipe.prior.prior} prior"
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}\nDraw new images, let the model redraw part of an image, or look at what it measured.")
        with gr.Tab("Draw"):
            draw_tab(gr, pipe)
        with gr.Tab("Complete"):
            complete_tab(gr, pipe, actions.test_images(pipe, run_dir))
        with gr.Tab("Inspect"):
            inspect_tab(gr, pipe, run_dir, prior_dir)
    return page


def on_error(message: str) -> str:
    return f"**Could not do that:** {message}"


def draw_tab(gr, pipe: VQPipeline) -> None:
    """New images for a class, a guidance, a temperature and a seed: `pipelines.sample`'s."""
    draw_labels = actions.draw_labels(pipe)
    guidance = getattr(pipe.prior, "default_guidance", 1.0) if pipe.class_names else 1.0

    def draw(label, n, guidance, temperature, top_k, seed, passes, transform):
        try:
            grid, text = actions.draw(pipe, label, n, guidance, temperature, top_k, seed, passes, transform)
        except UserError as error:
            return gr.update(), on_error(str(error))
        return grid, text

    with gr.Row():
        with gr.Column(scale=1):
            label = gr.Dropdown(draw_labels, value=draw_labels[0] if draw_labels else None, label="Class",
                                visible=bool(draw_labels), elem_id="draw-class")
            n = gr.Slider(1, actions.MOST_IMAGES, step=1,
                          value=min(actions.MOST_IMAGES, 8 * len(pipe.class_names)) if pipe.class_names else 64,
                          label="How many images", elem_id="draw-n")
            scale = gr.Slider(1.0, 5.0, value=guidance, step=0.05, label="Guidance (1: none; higher: more like the class)",
                              visible=bool(pipe.class_names), elem_id="draw-guidance")
            temperature = gr.Slider(0.5, 1.5, value=1.0, step=0.05, label="Temperature (lower: safer, less varied)")
            top_k = gr.Number(value=0, precision=0, minimum=0, label="Top-k (0: every code)")
            passes = gr.Slider(1, actions.MOST_PASSES, value=getattr(pipe.prior, "default_steps", 8), step=1,
                               label="MaskGIT passes", visible=pipe.prior.prior in PARALLEL_PRIORS)
            transforms = pipe.prior.transforms or ["identity"]
            transform = gr.Dropdown(transforms, value=transforms[0], visible=len(transforms) > 1, elem_id="draw-transform",
                                    label="Drawn as (identity: the images as they are; the prior also learned these transforms)")
            seed = gr.Number(value=0, precision=0, label="Seed (same seed, same images)", elem_id="draw-seed")
            button = gr.Button("Draw", variant="primary", elem_id="draw-button")
        with gr.Column(scale=2):
            grid = gr.Image(label="Drawn images", format="png", type="pil", interactive=False, height=600,
                            elem_id="draw-grid", elem_classes="pixels")
            status = gr.Markdown(elem_id="draw-status")
    button.click(draw, [label, n, scale, temperature, top_k, seed, passes, transform], [grid, status], **MODEL)


def complete_tab(gr, pipe: VQPipeline, examples: list) -> None:
    """A test image or an upload, part of it redrawn by the prior: a named region or a painted one."""
    complete_labels = actions.complete_labels(pipe)
    regions, regions_note = actions.redraw_choices(pipe)

    def choose_example(event: gr.SelectData):
        image, name = examples[event.index]
        return (*chosen(image), name if name in complete_labels else None)

    def upload(path):
        try:
            image = actions.read_upload(pipe, path)
        except UserError as error:
            return gr.update(), gr.update(), on_error(str(error))
        return chosen(image)

    def chosen(image):
        picture = actions.to_pil_images([image])[0].convert("RGBA").resize((CANVAS, CANVAS), Image.NEAREST)
        return image, {"background": picture, "layers": [], "composite": None}, "Image chosen: pick what to redraw, then Complete."

    def complete(image, redraw, painted, samples, label, seed):
        layer = painted["layers"][0] if painted and painted.get("layers") else None
        try:
            grid, text = actions.complete(pipe, image, redraw, layer, samples, label, seed)
        except UserError as error:
            return gr.update(), on_error(str(error))
        return grid, text

    picked = gr.State(None)  # this tab's image, uint8 [C, S, S]; one per browser tab
    gr.Markdown("**1. Choose an image**: click a test image of the run, or upload one of your own (any size: "
                "it is resized as training resized).")
    gallery = gr.Gallery(actions.to_pil_images([image for image, _ in examples]) if examples else None,
                         label="Test images", columns=16, height=120, allow_preview=False, show_label=False,
                         visible=bool(examples), elem_id="complete-examples", elem_classes="pixels")
    upload_button = gr.UploadButton("Upload an image", type="filepath", size="sm", elem_id="complete-upload",
                                    file_types=actions.UPLOAD_SUFFIXES)
    with gr.Row():
        with gr.Column(scale=1):
            canvas = gr.ImageEditor(label="The chosen image (paint on it to choose what to redraw yourself)",
                                    type="pil", image_mode="RGBA", sources=(), layers=False, transforms=(),
                                    canvas_size=(CANVAS, CANVAS), height=CANVAS + 100, elem_id="complete-canvas",
                                    brush=gr.Brush(colors=["#ff00ff"], default_size=16, color_mode="fixed"),
                                    elem_classes="pixels")
        with gr.Column(scale=1):
            redraw = gr.Radio(regions, value=regions[0], label="2. What to redraw", elem_id="complete-region")
            gr.Markdown(regions_note)
            class_choice = gr.Dropdown(complete_labels, value=None, label="Class to steer towards (empty: none)",
                                       visible=bool(complete_labels), elem_id="complete-class")
            samples = gr.Slider(1, actions.MOST_COMPLETIONS, value=4, step=1, label="Completions")
            complete_seed = gr.Number(value=0, precision=0, label="Seed", elem_id="complete-seed")
            complete_button = gr.Button("3. Complete", variant="primary", elem_id="complete-button")
        with gr.Column(scale=2):
            result = gr.Image(label="original | kept (the part to redraw grey) | completions", format="png",
                              type="pil", interactive=False, height=260, elem_id="complete-result", elem_classes="pixels")
            complete_status = gr.Markdown(elem_id="complete-status")
    gallery.select(choose_example, None, [picked, canvas, complete_status, class_choice])
    upload_button.upload(upload, upload_button, [picked, canvas, complete_status], **MODEL)
    complete_button.click(complete, [picked, redraw, canvas, samples, class_choice, complete_seed],
                          [result, complete_status], **MODEL)


def inspect_tab(gr, pipe: VQPipeline, run_dir: Path | None, prior_dir: str) -> None:
    """The run at a glance: its data and models, its figures in words, its reconstructions and curves."""
    described, every_figure = actions.overview(pipe, run_dir)
    gr.Markdown(described, elem_id="inspect-overview")
    reconstructions = actions.reconstruction_grid(run_dir)
    if reconstructions:
        gr.Image(str(reconstructions), label="Stage one: test images (top rows) over their reconstructions",
                 interactive=False, height=300, elem_id="inspect-reconstructions", elem_classes="pixels")
    for path, caption in actions.training_curves(run_dir, prior_dir):
        gr.Markdown(f"**{caption}**")  # above the curves, not over their first title as an image's label is
        gr.Image(str(path), show_label=False, interactive=False, elem_classes="inspect-curves")
    if every_figure:
        with gr.Accordion("Every figure in metrics.json (docs/metrics.md says what each means)", open=False):
            gr.Markdown(every_figure)


def launch(page, port: int, network: bool, block: bool = True):
    """Serve the page; `block=False` returns at once (for tests)."""
    host = "0.0.0.0" if network else "127.0.0.1"
    if network:
        print("warning: serving to the whole network: anyone who can reach this machine's port "
              f"{port} can use the model and its processor")
    page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)  # each tab gets its own answer
    try:
        return page.launch(server_name=host, server_port=port, css=PAGE_CSS, ssr_mode=False, max_file_size=MAX_UPLOAD,
                           prevent_thread_lock=not block, quiet=True, footer_links=[])
    except OSError as error:
        if "port" not in str(error).lower():
            raise
        raise UserError(f"port {port} is taken (is the page already running?); open that one, or serve on another with --port") from None


def main(argv=None):
    config = parse_config(AppConfig, argv, description=__doc__.splitlines()[0])
    import_gradio()
    if config.hub:
        pipe, run_dir = VQPipeline.from_pretrained(config.hub, prior=config.prior_dir, device=config.device), None
    else:
        pipe, run_dir = VQPipeline.from_run(config.run_dir, prior=config.prior_dir, device=config.device), Path(config.run_dir)
    use_all_cores(pipe.device)
    print(f"Serving {config.hub or config.run_dir} at http://{'0.0.0.0' if config.network else '127.0.0.1'}:{config.port} "
          f"(Ctrl+C stops it)")
    launch(build_page(pipe, run_dir, config.prior_dir), config.port, config.network)


if __name__ == "__main__":
    run_cli(main)
