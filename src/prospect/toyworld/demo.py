"""``prospect demo``: the main job on the embedded model, from a reference image to a report.

Inverts a reference (a rendered toy-world scene by default) into per-stage tokens, then runs
the official README's uses in the toy world's terms: reconstruction, content-aware,
material-aware and layout-aware generation, an img2img edit and the per-stage visualization.
Every generated image is read back by the analytic attribute reader, so the report says which
attributes came from the reference and which from the text.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from . import world
from ..inversion import InversionConfig, invert
from ..files import atomic_write_text, check_output_folder
from ..outputs import ensure_dir, make_grid, save_png
from ..pipeline import ProSpectPipeline
from ..visualize import visualize
from .reader import Reading, read

REFERENCE = world.Scene(position="left", shape="triangle", colour="red", texture="checkered", background="light")
EDIT_INPUT = world.Scene(position="right", shape="circle", colour="blue", texture="plain", background="light")


@dataclass
class Task:
    """One demo generation: its stage list and what each attribute is expected to follow."""

    name: str
    description: str
    prospect_words: list[str] | None  # index 0 = generation ends; None = "*" in every stage
    from_text: dict[str, str] = field(default_factory=dict)  # attributes the text (or the edit input) sets
    img2img: bool = False
    from_reference: tuple[str, ...] = ()  # attributes the caption claims come from the reference
    guidance_scale: float = 5.0  # the row's CFG scale, chosen with its stages on the benchmark's pilot
    hue_jitter_from: int | None = None  # this row's own inversion sees the reference at random hues in stages >= K
    hue_jitter_below: int | None = None  # this row's own inversion sees the reference at random hues in stages < K

    @property
    def own_inversion(self) -> tuple[int | None, int | None]:
        """What sets this row's inversion apart from the demo's one; (None, None) = it uses that one."""
        return self.hue_jitter_from, self.hue_jitter_below

    def claim(self, reference: dict[str, str]) -> dict[str, str]:
        """The attribute values an image must show for this row to show what its caption claims."""
        return {**{a: reference[a] for a in self.from_reference}, **self.from_text}



SHOWN = 3  # a row shows its claim when at least this many of 4 images do (read back)


def _window(lo: int, hi: int, inside: str, outside: str, n: int = 10) -> list[str]:
    """Stage list with ``inside`` in stages [lo, hi) (index 0 = generation ends) and ``outside`` elsewhere."""
    return [inside if lo <= k < hi else outside for k in range(n)]


# The stages that get '*' and the CFG scale of each row, as bench/transfer.py's tasks: chosen on its
# pilot references (--seed 1), not on this reference nor on the benchmark's held-out ones. Pilot of
# session 12 (stage choice on; 12 references x 4 images, CFG 5 and 3; docs/inversion-fidelity.md):
TEXTURE_STAGES, TEXTURE_CFG = (0, 4), 3.0  # pilot: [0, 4) best at both scales (0.46 at CFG 3, 0.35 at 5)
# layout (session 19 pilot): its own inversion colour-free in stages >= 6, '*' *alone* in stages 8..9 and the plain
# text in 0..7, CFG 3: 0.90 (the captioned inversion's best 0.88, the plain inversion's [6, 10) composed 0.56)
LAYOUT_STAGES, LAYOUT_CFG, LAYOUT_HUE_JITTER_FROM = (8, 10), 3.0, 6
COLOUR_STAGES, COLOUR_CFG = (3, 7), 5.0  # pilot: the a-priori window best (0.60 at CFG 5, 0.40 at 3)
CONTENT_STAGES, CONTENT_CFG = (0, 6), 5.0  # pilot: [0, 6) 0.65 at CFG 5, the a-priori [0, 8) 0.23
RECONSTRUCTION_CFG = 3.0  # pilot: 0.96 at CFG 3, 0.85 at 5
# img2img: the benchmark's edit task (session 18 pilot): with its own inversion colour-free in stages < 6, '*' in
# [0, 5) 0.35 at CFG 3 and 5 (tie: CFG 3), against the plain inversion's best 0.27 ([0, 4), CFG 5)
EDIT_STAGES, EDIT_CFG, EDIT_HUE_JITTER_BELOW = (0, 5), 3.0, 6

TASKS = [
    Task("reconstruction", "'*' in every stage: the reference itself", None,
         from_reference=("position", "shape", "colour", "texture", "background"), guidance_scale=RECONSTRUCTION_CFG),
    Task("content-aware", f"'*' in stages {CONTENT_STAGES[0]}..{CONTENT_STAGES[1] - 1}, text alone in the others: "
         "the reference's colour and texture on a text shape and position",
         _window(*CONTENT_STAGES, "a * square on the right", "a square on the right"),
         {"shape": "square", "position": "right"}, from_reference=("colour", "texture"), guidance_scale=CONTENT_CFG),
    Task("material-aware", f"'*' in stages {TEXTURE_STAGES[0]}..{TEXTURE_STAGES[1] - 1} (the end of generation): "
         "the reference's texture on a text shape, colour and position",
         _window(*TEXTURE_STAGES, "a * blue square on the top", "a blue square on the top"),
         {"shape": "square", "colour": "blue", "position": "top"}, from_reference=("texture",), guidance_scale=TEXTURE_CFG),
    Task("layout-aware", f"'*' alone in stages {LAYOUT_STAGES[0]}..{LAYOUT_STAGES[1] - 1} (the start), the text in "
         f"the others: the reference's position and shape under a text colour and texture (its own inversion, at "
         f"random hues in stages {LAYOUT_HUE_JITTER_FROM}..9, so those tokens carry no colour)",
         _window(*LAYOUT_STAGES, "*", "a dotted green shape"), {"colour": "green", "texture": "dotted"},
         from_reference=("position", "shape"), guidance_scale=LAYOUT_CFG, hue_jitter_from=LAYOUT_HUE_JITTER_FROM),
    Task("colour-aware", f"'*' in stages {COLOUR_STAGES[0]}..{COLOUR_STAGES[1] - 1}: the reference's colour on a "
         "text shape, texture and position",
         _window(*COLOUR_STAGES, "a striped * square on the top", "a striped square on the top"),
         {"shape": "square", "texture": "striped", "position": "top"}, from_reference=("colour",),
         guidance_scale=COLOUR_CFG),
    Task("img2img edit", f"the edit input (a plain blue circle on the right), strength 0.6, '*' in stages "
         f"{EDIT_STAGES[0]}..{EDIT_STAGES[1] - 1}: the reference's texture onto it (its own inversion, at random "
         f"hues in stages 0..{EDIT_HUE_JITTER_BELOW - 1}, so those tokens carry no colour)",
         _window(*EDIT_STAGES, "a * blue circle on the right", "a blue circle on the right"),
         {"shape": "circle", "colour": "blue", "position": "right"}, img2img=True, from_reference=("texture",),
         guidance_scale=EDIT_CFG, hue_jitter_below=EDIT_HUE_JITTER_BELOW),
]

TASK_BY_NAME = {t.name: t for t in TASKS}


@dataclass
class DemoConfig:
    """Settings of the demo (``prospect demo`` flags map onto these)."""

    out: Path = Path("prospect-demo")  # output folder
    image: str | None = None  # reference image; None = a rendered toy-world scene
    seed: int = 0  # seed of the inversion and of every generation
    inversion_steps: int = 150  # inversion budget (about a minute on 2 CPU cores; docs/inversion-fidelity.md)
    lr: float = 5e-3  # inversion learning rate; vectors per stage and flip are InversionConfig's defaults
    stage_choice: int = InversionConfig.stage_choice  # draws per stage of the stage choice (0 = each stage keeps its own)
    samples: int = 4  # images per task
    num_inference_steps: int = 50  # DDIM steps
    guidance_scale: float | None = None  # None = each row's own (Task.guidance_scale); a number = every row
    strength: float = 0.6  # img2img strength of the edit task
    scale: int = 4  # upscale factor of the figure (the toy world is 32x32)


@dataclass
class DemoReport:
    """Where the demo wrote its results, and the attribute readings of every image."""

    figure: Path
    html: Path
    concept: Path
    readings: dict[str, list[dict[str, str]]]
    seconds: float
    shown: dict[str, int] = field(default_factory=dict)  # per row, how many images show what its caption claims

    def failed_rows(self) -> list[str]:
        """Rows that show their claim in fewer than SHOWN images (the report marks them in red)."""
        return [name for name, k in self.shown.items() if not _enough(k, len(self.readings[name]))]


def run_demo(cfg: DemoConfig, model: str | Path | None = None,
             load: Callable[[], ProSpectPipeline] | None = None) -> DemoReport:
    """Invert the reference, run every task, write the figure, the HTML report and the concept.

    ``load`` (called once the output folder and the reference are checked) gives the pipeline, already
    on its device and in its dtype, instead of loading ``model`` on the CPU.
    """
    from ..data import open_image
    from ..distributed import Solo

    start = time.time()
    check_output_folder(cfg.out)  # before the model loads
    reference = open_image(cfg.image) if cfg.image else world.render_pil(REFERENCE)
    pp = load() if load is not None else ProSpectPipeline.from_pretrained(model)
    out = ensure_dir(cfg.out)
    pp.pipe.set_progress_bar_config(disable=True)
    inv = InversionConfig(initializer="shape", steps=cfg.inversion_steps, lr=cfg.lr, seed=cfg.seed, checkpoint_every=0,
                          stage_choice=cfg.stage_choice)
    accelerator = Solo(pp.device) if load is not None else None
    ref_attrs = read(reference).as_dict()  # what the reader sees in the reference: the rows' claims
    concept = invert(pp.pipe, [reference], inv, accelerator=accelerator)
    concept_path = concept.save(out / "concept.safetensors")
    concepts, results = {(None, None): concept}, {}
    for task in TASKS:
        if task.own_inversion not in concepts:
            own = replace(inv, hue_jitter_from=task.hue_jitter_from, hue_jitter_below=task.hue_jitter_below)
            concepts[task.own_inversion] = invert(pp.pipe, [reference], own, accelerator=accelerator)
            concepts[task.own_inversion].save(out / f"concept-{task.name.replace(' ', '-')}.safetensors")
        pp.load_concept(concepts[task.own_inversion])
        results[task.name] = _run_task(pp, task, cfg)
    pp.load_concept(concept)
    vis = visualize(pp, seed=cfg.seed, num_inference_steps=cfg.num_inference_steps,
                    guidance_scale=_guidance(TASK_BY_NAME["reconstruction"], cfg), scale=cfg.scale)
    save_png(vis.grid, out / "stages.png")
    readings = {name: [read(im).as_dict() for im in images] for name, images in results.items()}
    shown = {t.name: sum(_shows(r, t.claim(ref_attrs)) for r in readings[t.name]) for t in TASKS}
    figure = _figure(reference, results, cfg, shown)
    save_png(figure, out / "demo.png")
    for name, images in results.items():
        save_png(make_grid(images, cols=len(images), scale=cfg.scale), out / f"{name.replace(' ', '-')}.png")
    save_png(reference.resize((reference.width * cfg.scale, reference.height * cfg.scale), Image.Resampling.NEAREST),
             out / "reference.png")
    elapsed = time.time() - start
    page = _html(ref_attrs, readings, cfg, elapsed, shown)
    atomic_write_text(out / "report.html", page)
    atomic_write_text(out / "readings.json", json.dumps(dict(readings=readings, shown=shown), indent=1))
    return DemoReport(out / "demo.png", out / "report.html", concept_path, readings, elapsed, shown)


def _shows(reading: dict[str, str], claim: dict[str, str]) -> bool:
    return all(Reading(**reading).matches(claim).values())


def _enough(shown: int, n: int) -> bool:
    """Whether a row of n images shows its claim: SHOWN of them (all, for a row of fewer)."""
    return shown >= min(SHOWN, n)


def _guidance(task: Task, cfg: DemoConfig) -> float:
    return task.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale


def _run_task(pp: ProSpectPipeline, task: Task, cfg: DemoConfig) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(cfg.seed)
    kwargs = dict(image=world.render_pil(EDIT_INPUT), strength=cfg.strength) if task.img2img else {}
    result = pp("*", prospect_words=task.prospect_words, num_images_per_prompt=cfg.samples, generator=gen,
                num_inference_steps=cfg.num_inference_steps, guidance_scale=_guidance(task, cfg), **kwargs)
    return result.images


def _figure(reference: Image.Image, results: dict[str, list[Image.Image]], cfg: DemoConfig,
            shown: dict[str, int]) -> Image.Image:
    """One row per task (reference first), labelled with how many images show the row's claim; red if too few."""
    cols, size = cfg.samples, next(iter(results.values()))[0].size
    images = [reference.resize(size)] + [Image.new("RGB", size, "white")] * (cols - 1)
    labels, colours = ["reference"] + [""] * (cols - 1), ["black"] * cols
    for name, ims in results.items():
        ok = _enough(shown[name], len(ims))
        images += ims
        labels += [name, f"{shown[name]}/{len(ims)} {'ok' if ok else 'NOT SHOWN'}"] + [""] * (len(ims) - 2)
        colours += ["black" if ok else "red"] * len(ims)
    return make_grid(images, cols=cols, labels=labels, scale=cfg.scale, label_colours=colours)


def _html(reference: dict[str, str], readings: dict, cfg: DemoConfig, seconds: float, shown: dict[str, int]) -> str:
    """A short self-contained report: images, stage lists, attribute readings and, per row, whether it shows its claim."""
    esc = html.escape
    rows = []
    for task in TASKS:
        n, k = len(readings[task.name]), shown[task.name]
        claim = ", ".join(f"{a}={esc(v)}" for a, v in task.claim(reference).items())
        if _enough(k, n):
            verdict = f"<p class='ok'>Shows its claim ({claim}) in {k} of {n} images.</p>"
        else:
            verdict = (f"<p class='fail'>Does not show its claim ({claim}): only {k} of {n} images do "
                       f"(a row needs {min(SHOWN, n)}). This row is not a result.</p>")
        if task.hue_jitter_from is not None:
            verdict += (f"<p>Inverted again for this row with the reference at random hues in stages "
                        f"{task.hue_jitter_from}..9 (--hue-jitter-from {task.hue_jitter_from}).</p>")
        if task.hue_jitter_below is not None:
            verdict += (f"<p>Inverted again for this row with the reference at random hues in stages "
                        f"0..{task.hue_jitter_below - 1} (--hue-jitter-below {task.hue_jitter_below}).</p>")
        words = task.prospect_words or ["*"] * 10
        stage_list = "<br>".join(f"{i}: {esc(w)}" for i, w in enumerate(words))
        cells = []
        for r in readings[task.name]:
            marks = []
            for attr, value in r.items():
                source = "text" if task.from_text.get(attr) == value else ("ref" if reference[attr] == value else "other")
                marks.append(f"{attr}={esc(value)} <i>({source})</i>")
            cells.append("<li>" + ", ".join(marks) + "</li>")
        rows.append(f"<h2 class='{'ok' if _enough(k, n) else 'fail'}'>{esc(task.name)}</h2>"
                    f"<p>{esc(task.description)} (CFG {_guidance(task, cfg):g})</p>{verdict}"
                    f"<img src='{esc(task.name.replace(' ', '-'))}.png'>"
                    f"<details><summary>stage prompts (index 0 = generation ends)</summary><p>{stage_list}</p></details>"
                    f"<ul>{''.join(cells)}</ul>")
    ref = ", ".join(f"{k}={esc(v)}" for k, v in reference.items())
    return ("<!doctype html><meta charset='utf-8'><title>ProSpect demo</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}img{image-rendering:pixelated}"
            ".fail{color:#c00000;font-weight:bold}.ok{color:#006000}</style>"
            f"<h1>ProSpect demo</h1><p>Reference ({ref}):</p><img src='reference.png'>"
            f"<p>Inversion: {cfg.inversion_steps} steps, lr {cfg.lr}, seed {cfg.seed}; sampling: DDIM {cfg.num_inference_steps} steps, "
            f"guidance {'per row' if cfg.guidance_scale is None else cfg.guidance_scale}; total {seconds:.0f} s.</p>"
            "<p>Each reading names where the attribute came from: <i>ref</i> (the reference), <i>text</i> (the stage "
            "prompts), or <i>other</i>.</p>" + "".join(rows) +
            "<h2>What each stage's token carries</h2><img src='stages.png'>")
