"""``prospect ui``: a Gradio app, a thin layer over the API (``invert``, ``ProSpectPipeline``, ``visualize``).

Upload one or a few images and train a concept (with a live progress bar; it is saved and listed),
edit the N stage prompts (index 0 = the end of generation; presets for content, material, layout
and style, a split slider, int entries = another stage's token), generate txt2img or img2img, and
download the PNGs (their parameters in the metadata) or the ``visualize`` grid. Binds 127.0.0.1
unless told otherwise, never makes a public link unless asked, and runs one job at a time: the
others wait in Gradio's queue. Bad input shows the same one-line error as the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .files import safe_name
from .spectrum import parse_entries as parse_rows  # a stage row that is an integer is that stage's token

MAX_ROWS = 20  # stage rows the editor can show (a concept's N; 10 by default)
PRESETS = ("material", "style", "content", "layout", "custom")
HELP = {"material": "the concept in the last stages [0, k): its material and texture, the rest from the text",
        "style": "as material: the concept in the last stages [0, k)",
        "content": "the concept in the middle stages [k-2, k+2)",
        "layout": "the concept in the first stages [k, N): its layout and shape, the rest from the text; "
                  "the concept prompt '*' alone keeps the layout best (words before '*' change it), with k = 8 "
                  "of 10 on the embedded model",
        "custom": "edit the rows yourself"}


def preset_rows(preset: str, num_stages: int, split: int, concept_prompt: str, text_prompt: str) -> list[str]:
    """The N stage rows of a preset: ``concept_prompt`` in the preset's stages, ``text_prompt`` elsewhere."""
    if preset not in PRESETS or preset == "custom":
        raise ValueError(f"preset must be one of {', '.join(PRESETS[:-1])}, got {preset!r}")
    if not 0 <= split <= num_stages:
        raise ValueError(f"split must be in [0, {num_stages}], got {split}")
    inside = {"material": lambda i: i < split, "style": lambda i: i < split,
              "content": lambda i: split - 2 <= i < split + 2, "layout": lambda i: i >= split}[preset]
    return [concept_prompt if inside(i) else text_prompt for i in range(num_stages)]


def concept_name(text: str) -> str:
    """A concept file name from what the user typed (letters, digits, - and _)."""
    name = safe_name(text)
    if not name:
        raise ValueError("give the concept a name (letters, digits, - or _)")
    return name


class Studio:
    """The app's state and actions, independent of Gradio (so they are testable through the API)."""

    def __init__(self, load: Callable[[], object], folder: Path):
        self._load, self._pp = load, None
        self.folder = Path(folder)
        self.concepts_dir = self.folder / "concepts"
        self.images_dir = self.folder / "images"

    @property
    def pp(self):
        if self._pp is None:
            self._pp = self._load()
        return self._pp

    def concept_files(self) -> list[str]:
        return sorted(p.stem for p in self.concepts_dir.glob("*.safetensors")) if self.concepts_dir.exists() else []

    def use(self, name: str | None):
        """Load concept ``name`` (under its placeholder, replacing one of the same placeholder); None: none."""
        from .concept import Concept

        if not name:
            return None
        path = self.concepts_dir / f"{concept_name(name)}.safetensors"
        if not path.exists():
            raise ValueError(f"no concept named {name!r}; train one first")
        return self.pp.load_concept(Concept.load(path))

    def train(self, image_paths: list[str], name: str, steps: int, on_step: Callable[[int, int], None] | None = None):
        from .data import open_image
        from .files import ensure_folder
        from .inversion import InversionConfig, check_config, invert

        name = concept_name(name)
        if not image_paths:
            raise ValueError("upload one or a few images of the concept first")
        cfg = InversionConfig(steps=int(steps), checkpoint_every=0)
        check_config(cfg)
        images = [open_image(p) for p in image_paths]
        log = (lambda s: on_step(s.step + 1, cfg.steps)) if on_step else None
        concept = invert(self.pp, images, cfg, on_step=log, progress=False)
        path = ensure_folder(self.concepts_dir) / f"{name}.safetensors"
        concept.save(path)
        return path

    def generate(self, concept: str | None, rows: list[str], image_path: str | None, strength: float, steps: int,
                 guidance: float, seed: int, count: int) -> list[Path]:
        from .data import open_image
        from .distributed import generate_share
        from .files import ensure_folder
        from .outputs import save_png
        from .pipeline import GenerationConfig

        self.use(concept)
        words = parse_rows(rows[: self.pp.num_stages])
        image = open_image(image_path) if image_path else None
        settings = GenerationConfig(num_inference_steps=int(steps), guidance_scale=float(guidance),
                                    strength=float(strength))
        settings.check(img2img=image is not None)
        if not 1 <= int(count) <= 16:
            raise ValueError(f"images must be in [1, 16], got {count}")
        folder, paths = ensure_folder(self.images_dir), []
        for first, result in generate_share(self.pp, int(count), int(seed), batch_size=int(count),
                                            prospect_words=words, image=image, config=settings):
            for k, im in enumerate(result.images, first):
                params = dict(result.parameters, seed=int(seed), index=k, generator_seed=int(seed) + k,
                              concept=concept, stage_prompts=result.stage_prompts[0])
                paths.append(save_png(im, folder / f"{_stamp()}-{seed}-{k:03d}.png", params))
        return paths

    def visualize(self, concept: str, steps: int, guidance: float, seed: int) -> Path:
        from .files import ensure_folder
        from .outputs import save_png
        from .visualize import visualize

        loaded = self.use(concept)
        if loaded is None:
            raise ValueError("choose a concept to visualize")
        vis = visualize(self.pp, loaded.placeholder, seed=int(seed), num_inference_steps=int(steps),
                        guidance_scale=float(guidance), scale=4)
        return save_png(vis.grid, ensure_folder(self.images_dir) / f"{_stamp()}-stages-{seed}.png",
                        {"labels": vis.labels, "prospect_words": vis.stage_words})


def _stamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")


def _one_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def build_app(studio: Studio):
    """The Gradio Blocks of the app (queue: one job at a time)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    import gradio as gr

    from .concept import ConceptError
    from .inversion import InversionError
    from .spectrum import SpectrumError

    known = (ValueError, SpectrumError, ConceptError, InversionError, OSError)

    def guarded(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except known as err:  # the CLI's one line, in the browser
                raise gr.Error(f"prospect: error: {_one_line(err)}") from None
        return run

    def train(files, name, steps, progress=gr.Progress()):
        paths = [getattr(f, "name", f) for f in (files or [])]
        path = studio.train(paths, name, steps, on_step=lambda s, n: progress((s, n), desc="inversion"))
        choices = studio.concept_files()
        return f"saved {path.name}", gr.update(choices=choices, value=path.stem)

    def rows_for(preset, split, concept_prompt, text_prompt, *rows):
        if preset == "custom":
            return list(rows)
        n = studio.pp.num_stages
        filled = preset_rows(preset, n, int(split), concept_prompt, text_prompt)
        return filled + list(rows[n:])

    def stages_of(concept):
        n = studio.use(concept).num_stages if concept else studio.pp.num_stages
        if n > MAX_ROWS:
            raise ValueError(f"the editor shows up to {MAX_ROWS} stages; this concept has {n} (use the CLI)")
        return [gr.update(visible=i < n) for i in range(MAX_ROWS)] + [gr.update(maximum=n)]

    def generate(concept, image, strength, steps, guidance, seed, count, *rows):
        paths = studio.generate(concept, list(rows), image, strength, steps, guidance, seed, count)
        return [str(p) for p in paths], [str(p) for p in paths]

    def grid(concept, steps, guidance, seed):
        path = studio.visualize(concept, steps, guidance, seed)
        return str(path), [str(path)]

    with gr.Blocks(title="ProSpect") as app:
        gr.Markdown("# ProSpect\nLearn a concept from one or a few images, one token per denoising stage, then "
                    "choose what each stage takes: stage 0 is the end of generation (material, texture), "
                    "stage N-1 its start (layout).")
        with gr.Row():
            with gr.Column():
                gr.Markdown("## 1. Train")
                files = gr.File(file_count="multiple", file_types=["image"], label="reference images", elem_id="images")
                name = gr.Textbox(value="concept", label="concept name", elem_id="name")
                steps = gr.Number(value=150, precision=0, label="inversion steps", elem_id="train-steps")
                train_btn = gr.Button("Train", variant="primary", elem_id="train")
                status = gr.Textbox(label="status", interactive=False, elem_id="status")
            with gr.Column():
                gr.Markdown("## 2. Stages")
                concept = gr.Dropdown(choices=studio.concept_files(), value=None, label="concept (placeholder *)",
                                      allow_custom_value=False, elem_id="concept")
                preset = gr.Dropdown(choices=list(PRESETS), value="material", label="preset", elem_id="preset",
                                     info="; ".join(f"{k}: {v}" for k, v in HELP.items()))
                split = gr.Slider(0, 10, value=5, step=1, label="split k", elem_id="split")
                concept_prompt = gr.Textbox(value="*", label="prompt in the concept's stages", elem_id="concept-prompt")
                text_prompt = gr.Textbox(value="", label="prompt in the other stages", elem_id="text-prompt")
                rows = [gr.Textbox(value="*" if i < 5 else "", label=f"stage {i}", visible=i < 10,
                                   elem_id=f"stage-{i}") for i in range(MAX_ROWS)]
        with gr.Row():
            with gr.Column():
                gr.Markdown("## 3. Generate")
                image = gr.Image(type="filepath", label="input image (img2img, optional)", elem_id="input-image")
                strength = gr.Slider(0, 1, value=0.6, label="img2img strength")
                gen_steps = gr.Number(value=50, precision=0, label="denoising steps", elem_id="gen-steps")
                guidance = gr.Number(value=5.0, label="guidance scale")
                seed = gr.Number(value=0, precision=0, label="seed")
                count = gr.Slider(1, 16, value=4, step=1, label="images")
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    vis_btn = gr.Button("Visualize stages", elem_id="visualize")
            with gr.Column():
                gallery = gr.Gallery(label="images", columns=4, format="png", elem_id="gallery")
                downloads = gr.File(file_count="multiple", label="PNGs (parameters in their metadata)",
                                    elem_id="downloads")

        train_btn.click(guarded(train), [files, name, steps], [status, concept], api_name="train")
        concept.change(guarded(stages_of), [concept], [*rows, split], api_name=False)
        for trigger in (preset.change, split.release, concept_prompt.submit, text_prompt.submit):
            trigger(guarded(rows_for), [preset, split, concept_prompt, text_prompt, *rows], rows, api_name=False)
        gen_btn.click(guarded(generate), [concept, image, strength, gen_steps, guidance, seed, count, *rows],
                      [gallery, downloads], api_name="generate")
        vis_btn.click(guarded(grid), [concept, gen_steps, guidance, seed], [gallery, downloads], api_name="visualize")
    app.queue(default_concurrency_limit=1)  # several users' jobs wait their turn on the one pipeline
    return app


def launch(studio: Studio, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True):
    """Serve the app; ``share`` makes Gradio's public link (off unless asked)."""
    app = build_app(studio)
    app.launch(server_name=host, server_port=port, share=share, ssr_mode=False, prevent_thread_lock=not block,
               allowed_paths=[str(studio.folder.resolve())], quiet=not block, footer_links=[])
    return app
