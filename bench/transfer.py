"""Attribute-transfer benchmark: ProSpect vs textual inversion on the toy world (issue #4).

Run: ``python bench/transfer.py [--model DIR] [--references 20] [--steps 150] [--seeds 4] [--quick]``.

For each reference (a seeded random scene) it learns a ProSpect concept (N = 10) and a textual
inversion (N = 1, same budget), generates every task of :mod:`prospect.benchmark` with both, the
ProSpect split sweep and the caption ceiling, reads every image back and writes ``results.json``,
``results.md``, ``sweep.png`` and example grids to ``--out``. Concepts and readings are cached
there under a key of the settings that made them, so a rerun resumes and never mixes settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from prospect import Concept, InversionConfig, ProSpectPipeline, invert
from prospect.inversion import InversionError, check_config
from prospect.toyworld import world
from prospect.toyworld import benchmark as bm
from prospect.toyworld import plots
from prospect.distributed import seeded_images
from prospect.outputs import make_grid
from prospect.toyworld.reader import read_batch

METHODS = ("prospect", "ti", "caption")
LABEL = {"prospect": "ProSpect", "prospect_chosen": "ProSpect, pilot-chosen split", "ti": "TI",
         "ti_staged": "TI, ProSpect's stage texts", "ti_staged_chosen": "TI, the chosen split's stage texts",
         "caption": "caption (model ceiling)"}
BATCH = 64  # images per pipeline call
EXAMPLE_REFERENCES = 3  # references whose images are also saved as a grid


@dataclass
class BenchConfig:
    """Settings of one benchmark run (the command line flags map onto these)."""

    model: str | None = None  # model folder or file; None = the embedded toy-world model
    out: Path = Path("out/transfer")
    references: int = 20  # reference scenes (one concept of each method per reference)
    steps: int = 150  # inversion steps, both methods
    lr: float = 5e-3  # inversion learning rate, both methods (2e-3 before #12: docs/inversion-fidelity.md)
    batch_size: int = 10  # inversion batch, both methods
    initializer: str = "shape"  # names no attribute value
    flip_p: float = 0.0  # inversion's horizontal-flip probability, both methods (0.5 before #12)
    vectors: int = 6  # vectors per stage, both methods (TI: vectors of its one token; 1 before #12)
    parameterization: str = "free"  # ProSpect's stage coupling ("free" or "shared"; TI has one stage either way)
    stage_choice: int = 16  # ProSpect: each stage keeps the best-denoising stage token (0 = its own; TI has one)
    hue_jitter_from: int | None = None  # ProSpect: stages >= this learn from the reference at random hues (TI: n/a)
    hue_jitter_below: int | None = None  # ProSpect: stages < this learn from the reference at random hues (TI: n/a)
    ti_hue_jitter: bool = False  # TI: its one token learns from the reference at random hues (every timestep)
    templates: tuple[str, ...] = ("{}",)  # inversion caption templates, both methods; {texture}, {colour}, {shape},
    # {position}, {background} name the reference's own values (a captioned inversion: the user describes the image)
    timestep_templates: tuple[str, ...] = ()  # "LO-HI:TEMPLATE", both methods: also captions the samples of training
    # timestep in [LO, HI) (the same fields as templates); TI's one token sees them at those timesteps too (fair)
    shuffle_at: str | None = None  # "LO-HI", both methods: the inversion samples of training timestep in [LO, HI) see
    # the reference's patches in a random order (no shape, no layout); TI's one token sees them at those timesteps too
    seed: int = 0  # reference scenes, text attributes, inversions and image seeds derive from it
    seeds: int = 4  # images per reference per condition
    num_inference_steps: int = 20  # DDIM steps
    guidance_scale: float = 5.0
    sweep: tuple[int, ...] = tuple(range(2, 9))  # split points k of the texture, content and layout sweeps
    colour_windows: tuple[tuple[int, int], ...] = ()  # the colour sweep's windows [lo, hi); empty = [1, 5), [3, 7), [5, 9)
    n_boot: int = 2000  # bootstrap resamples
    mix_split: int = 5  # mixing: A's tokens in stages >= mix_split (layout), B's below (material)
    edit_split: int = 5  # img2img edit: ProSpect's reported row has '*' in stages < edit_split (the sweep shows all)
    tasks: tuple[str, ...] = ()  # the tasks run (TASKS' names, "mixing", "edit"); empty = all
    bare: tuple[int, ...] = ()  # layout: also '*' alone in stages >= J, the composed prompt in [k, J) (each J, k <= J);
    # colour: '*' alone in [J, hi) of each window [lo, hi) holding J, the composed prompt in [lo, J)
    ti_staged: bool = False  # TI also under ProSpect's stage texts at each reported split (prompt editing: fair)
    sweep_staged: bool = False  # at every sweep split also TI and the caption under ProSpect's stage texts
    bare_below: tuple[int, ...] = ()  # texture, content, edit: also '*' alone in stages < J, composed in [J, k) (k >= J)
    chosen: tuple[tuple[str, int, int], ...] = ()  # (task, lo, hi): ProSpect splits chosen on a pilot run, reported
    # beside the a-priori ones; choose them on other references (another --seed), never on the reported ones


def image_seeds(cfg: BenchConfig, r: int) -> list[int]:
    """Per reference, the same seeds for every method and task (paired); other references get others."""
    return [cfg.seed * 1_000_003 + r * 1_000 + j for j in range(cfg.seeds)]


def model_fingerprint(pp: ProSpectPipeline) -> str:
    """A hash of a few weight tensors: a retrained model at the same path gets a new cache."""
    h = hashlib.sha256()
    p = pp.pipe
    for tensor in (p.text_encoder.get_input_embeddings().weight[:1000], p.unet.conv_in.weight,
                   p.unet.conv_out.weight, p.vae.decoder.conv_out.weight):
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def fill_templates(templates: tuple[str, ...], values: dict[str, str]) -> tuple[str, ...]:
    """The inversion's templates for a reference: each named field becomes its value (``values``), ``{}`` stays."""
    return tuple(world.fill_template(t, values) for t in templates)


def learn(pp: ProSpectPipeline, scene: world.Scene, num_stages: int, path: Path, cfg: BenchConfig) -> tuple[Concept, float]:
    """The cached concept, or invert ``scene``'s image and cache it (resumable from its checkpoint); returns seconds."""
    if path.exists():
        return Concept.load(path), 0.0
    start, image = time.time(), world.render_pil(scene)
    staged = num_stages > 1  # the settings of ProSpect's stages; TI has one token for all timesteps
    inv = InversionConfig(initializer=cfg.initializer, num_stages=num_stages, steps=cfg.steps, lr=cfg.lr,
                          batch_size=cfg.batch_size, seed=cfg.seed, checkpoint_every=50, flip_p=cfg.flip_p,
                          vectors_per_stage=cfg.vectors, parameterization=cfg.parameterization,
                          stage_choice=cfg.stage_choice,
                          hue_jitter_from=cfg.hue_jitter_from if staged else (0 if cfg.ti_hue_jitter else None),
                          hue_jitter_below=cfg.hue_jitter_below if staged else None,
                          templates=fill_templates(cfg.templates, scene.attributes()),
                          timestep_templates=fill_templates(cfg.timestep_templates, scene.attributes()),
                          shuffle_at=cfg.shuffle_at)
    ckpt = path.with_suffix(".ckpt")
    concept = invert(pp.pipe, [image], inv, checkpoint=ckpt, resume=True, progress=False)
    concept.save(path)
    ckpt.unlink(missing_ok=True)
    return concept, time.time() - start


def concept_path(dirs: dict[str, Path], r: int, method: str) -> Path:
    return dirs["concepts_ti" if method == "ti" else "concepts"] / f"ref{r:03d}-{method}.safetensors"


def in_every_stage(concept: Concept, placeholder: str, num_stages: int) -> Concept:
    """The concept under ``placeholder``; a TI concept's one stage repeated in every stage (same pipeline path)."""
    emb = concept.embeddings
    return Concept(placeholder=placeholder, embeddings=emb.expand(num_stages, *emb.shape[1:]) if len(emb) == 1 else emb)


def generate(pp: ProSpectPipeline, prompts: list[str], seeds: list[int], cfg: BenchConfig) -> list[Image.Image]:
    return seeded_images(pp, prompts, seeds, BATCH, num_inference_steps=cfg.num_inference_steps,
                         guidance_scale=cfg.guidance_scale)


def run_reference(pp, r: int, cfg: BenchConfig, dirs: dict[str, Path], todo: list[bm.Condition]) -> tuple[dict, dict]:
    """Readings of every condition for reference r (cached per condition), and seconds spent."""
    scene, cache = bm.reference_scene(cfg.seed, r), dirs["readings"] / f"ref{r:03d}.json"
    texts = bm.texts_of(scene, cfg.seed, r)
    readings = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [c for c in todo if c.key not in readings]
    seconds = {"inversion": 0.0, "generation": 0.0}
    if not missing:
        return readings, seconds
    image, seeds = world.render_pil(scene), image_seeds(cfg, r)
    examples = []
    for method, n in (("prospect", pp.num_stages), ("ti", 1)):
        mine = [c for c in missing if c.method == method or (method == "ti" and c.method == "caption")]
        if not mine:  # e.g. a rerun that only adds a chosen ProSpect split
            continue
        concept, spent = learn(pp, scene, n, concept_path(dirs, r, method), cfg)
        seconds["inversion"] += spent
        # TI's one row repeated in every stage: one token for all timesteps, same pipeline code path.
        pp.load_concept(in_every_stage(concept, "*", pp.num_stages))
        start = time.time()
        prompts = [c.prompt(scene, texts[c.task.name]) for c in mine for _ in seeds]
        images = generate(pp, prompts, seeds * len(mine), cfg)
        seconds["generation"] += time.time() - start
        got = read_batch(images)
        for i, c in enumerate(mine):
            readings[c.key] = [g.as_dict() for g in got[i * len(seeds):(i + 1) * len(seeds)]]
            if (c.split is None if c.method != "prospect" else c.split == c.task.default_split) and c.bare is None:
                examples.append((c, images[i * len(seeds):(i + 1) * len(seeds)]))
    cache.write_text(json.dumps(readings))
    if r < EXAMPLE_REFERENCES and examples:
        _example_grid(scene, examples, dirs["out"] / f"examples-ref{r:03d}.png")
    return readings, seconds


def _example_grid(scene: world.Scene, examples, path: Path) -> None:
    examples = sorted(examples, key=lambda e: (bm.TASKS.index(e[0].task), METHODS.index(e[0].method)))
    cols = len(examples[0][1])
    images = [world.render_pil(scene)] + [Image.new("RGB", (32, 32), "white")] * (cols - 1)
    labels = ["reference"] + [""] * (cols - 1)
    for c, ims in examples:
        images += ims
        labels += [f"{c.method} {c.task.name}"] + [""] * (cols - 1)
    make_grid(images, cols=cols, labels=labels, scale=4).save(path)


def run_mix(pp, r: int, cfg: BenchConfig, dirs: dict[str, Path]) -> dict:
    """Readings of 'layout of A + texture of B' (A = reference r, B = its partner), both methods, cached."""
    tail = "" if cfg.mix_split == bm.MIX_SPLIT else f"-k{cfg.mix_split}"
    cache = dirs["readings"] / f"mix{r:03d}{tail}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    b, seeds, readings = bm.mix_partner(cfg, r), image_seeds(cfg, r), {}
    for method, n in (("prospect", pp.num_stages), ("ti", 1)):
        for name, ref in (("<a>", r), ("<b>", b)):
            c, _ = learn(pp, bm.reference_scene(cfg.seed, ref), n, concept_path(dirs, ref, method), cfg)
            pp.load_concept(in_every_stage(c, name, pp.num_stages))
        images = generate(pp, [bm.mix_prompts(method, cfg.mix_split)] * len(seeds), seeds, cfg)
        readings[method] = [g.as_dict() for g in read_batch(images)]
    cache.write_text(json.dumps(dict(partner=b, **readings)))
    return readings


def run_edit(pp, r: int, cfg: BenchConfig, dirs: dict[str, Path]) -> tuple[dict, float]:
    """Readings of the img2img edit (the reference's texture onto its edit input), every condition, cached; and
    the seconds of generation."""
    cache = dirs["readings"] / f"edit{r:03d}.json"
    todo = bm.edit_conditions(cfg)
    readings = json.loads(cache.read_text()) if cache.exists() else {}
    if all(c.key in readings for c in todo):
        return readings, 0.0
    start, scene, seeds = time.time(), bm.reference_scene(cfg.seed, r), image_seeds(cfg, r)
    edit, text = bm.edit_input(cfg.seed, r)
    edit_image = world.render_pil(edit)
    for method, n in (("prospect", pp.num_stages), ("ti", 1)):
        mine = [c for c in todo if c.method == method or (method == "ti" and c.method == "caption")]
        concept, _ = learn(pp, scene, n, concept_path(dirs, r, method), cfg)
        pp.load_concept(in_every_stage(concept, "*", pp.num_stages))
        prompts = [c.prompt(scene, text) for c in mine for _ in seeds]
        images = seeded_images(pp, prompts, seeds * len(mine), BATCH, num_inference_steps=cfg.num_inference_steps,
                               guidance_scale=cfg.guidance_scale, image=edit_image, strength=bm.EDIT_STRENGTH)
        got = read_batch(images)
        for i, c in enumerate(mine):
            readings[c.key] = [g.as_dict() for g in got[i * len(seeds):(i + 1) * len(seeds)]]
    cache.write_text(json.dumps(readings))
    return readings, time.time() - start


def _ci(lo_hi) -> str:
    return f"[{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]"


def _jitter_words(cfg: BenchConfig) -> str:
    where = ([f"stages >= {cfg.hue_jitter_from}"] if cfg.hue_jitter_from is not None else []) + (
        [f"stages < {cfg.hue_jitter_below}"] if cfg.hue_jitter_below is not None else [])
    words = [f"in {' and '.join(where)} (ProSpect)"] if where else []
    words += ["at every timestep (TI)"] if cfg.ti_hue_jitter else []
    return ", ".join(words) or "off"


def markdown(summary: dict, cfg: BenchConfig, n_refs: int) -> str:
    """The tables of results.md (also printed)."""
    lines = [f"Attribute transfer on the toy world: {n_refs} references x {cfg.seeds} images per task; "
             f"inversion {cfg.steps} steps, lr {cfg.lr}, batch {cfg.batch_size}, initializer '{cfg.initializer}', "
             f"flip p {cfg.flip_p}, {cfg.vectors} vector(s) per stage, {cfg.parameterization} stages, "
             f"stage choice {cfg.stage_choice or 'off'}, hue jitter {_jitter_words(cfg)}, templates "
             f"{', '.join(repr(t) for t in cfg.templates)}"
             + (f", at timesteps {', '.join(repr(t) for t in cfg.timestep_templates)}" if cfg.timestep_templates else "")
             + (f", patches shuffled at timesteps {cfg.shuffle_at}" if cfg.shuffle_at else "")
             + "; "
             f"DDIM {cfg.num_inference_steps}, CFG {cfg.guidance_scale}. 95 % intervals: Wilson over images "
             "(assumes independent images) and bootstrap over references (the one to read).", "",
             "| task | method | success | Wilson 95 % | bootstrap 95 % (refs) | " + " | ".join(world.ATTRIBUTES) + " |",
             "|---|---|---|---|---|" + "---|" * len(world.ATTRIBUTES)]
    for task, rows in summary["main"].items():
        for method, row in rows.items():
            s, attrs = row["success"], row["attributes"]
            cells = [f"{attrs[a]:.2f} {'(r)' if a in bm.TASK[task].from_reference else '(t)'}" if a in attrs else ""
                     for a in world.ATTRIBUTES]
            lines.append(f"| {task} | {LABEL[method]} | **{s['rate']:.2f}** ({s['successes']}/{s['n']}) | "
                         f"{_ci(s['wilson'])} | {_ci(s['bootstrap'])} | " + " | ".join(cells) + " |")
    lines += ["", "Attribute columns: fraction of images showing the reference's (r) or the text's (t) value.", "",
              "| task | ProSpect - TI (success) | paired bootstrap 95 % (refs) |", "|---|---|---|"]
    for task, d in summary["differences"].items():
        lines.append(f"| {task} | {d['mean']:+.2f} | [{d['lo']:+.2f}, {d['hi']:+.2f}] |")
    if summary["ceiling"]:
        lines += ["", "Model ceiling: attribute accuracy from the plain full caption of each reference: " +
                  ", ".join(f"{a} {v:.2f}" for a, v in summary["ceiling"].items())]
    staged = [m for m in ("ti_staged", "caption_staged") if any(m in r for rows in summary["sweep"].values() for r in rows)]
    lines += ["",
              "Split sweep (ProSpect; texture and content: '*' in stages < k, layout: in stages >= k, colour: in [lo, hi); "
              "stage 0 = generation ends; * = default split, fixed a priori" +
              ("; 'same texts': TI's token, or the reference's own words (the caption), where ProSpect has '*'"
               if staged else "") + "):", "",
              "| task | '*' stages | success | reference attrs | text attrs |" +
              "".join(f" {SWEEP_LABEL[m]}: success | reference attrs | text attrs |" for m in staged),
              "|---|---|---|---|---|" + "---|---|---|" * len(staged)]

    def cells(cell: dict | None) -> str:
        if cell is None:
            return " | | |"
        text = "" if cell["from_text"] is None else f"{cell['from_text']:.2f}"
        return f" {cell['success']:.2f} | {cell['from_reference']:.2f} | {text} |"

    for task, rows in summary["sweep"].items():
        for row in rows:
            lo, hi = row["split"]
            lines.append(f"| {task} | [{lo}, {hi}){' *' if row['default'] else ''} |" + cells(row) +
                         "".join(cells(row.get(m)) for m in staged))
    bare_rows = summary.get("bare", []) + summary.get("edit", {}).get("bare", [])
    for task in dict.fromkeys(row["task"] for row in bare_rows):
        t_ = bm.EDIT if task == "edit" else bm.TASK[task]
        attrs = t_.from_reference + t_.from_text
        where = {"layout": "stages >= J (as the inversion saw it), the composed prompt in [k, J), the plain text "
                           "below k", "colour": "stages [J, hi) of the window [lo, hi) (as the inversion saw it), the "
                           "composed prompt in [lo, J), the plain text outside the window"}.get(
            task, "stages < J (as the inversion saw it), the composed prompt in [J, k), the plain text from k")
        lines += ["", f"{task.capitalize()} with '*' alone in {where}; 'TI, same texts' = TI's one token under the "
                  "same stage texts; differences are paired bootstraps over references:", "",
                  "| '*' alone | composed | ProSpect | " + " | ".join(
                      f"{a} ({'r' if a in t_.from_reference else 't'})" for a in attrs) +
                  " | TI, same texts | ProSpect - TI | ProSpect - TI, same texts |",
                  "|---|---|---|" + "---|" * len(attrs) + "---|---|---|"]
        for row in (r for r in bare_rows if r["task"] == task):
            (lo, hi), j, s, a = row["split"], row["bare"], row["prospect"]["success"], row["prospect"]["attributes"]
            t, d, e = row["ti_staged"]["success"], row["minus_ti"], row["minus_ti_staged"]
            alone, composed = ((lo, j), (j, hi)) if task in bm.BELOW else ((j, hi), (lo, j))
            lines.append(f"| [{alone[0]}, {alone[1]}) | "
                         f"{f'[{composed[0]}, {composed[1]})' if composed[0] < composed[1] else 'none'} | "
                         f"**{s['rate']:.2f}** ({s['successes']}/{s['n']}) {_ci(s['bootstrap'])} | " +
                         " | ".join(f"{a[x]:.2f}" for x in attrs) + f" | {t['rate']:.2f} | "
                         f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] | "
                         f"{e['mean']:+.2f} [{e['lo']:+.2f}, {e['hi']:+.2f}] |")
    if "mix" in summary:
        m = summary["mix"]
        lines += ["", f"Mixing two concepts: layout (position, shape) of reference A + texture of reference B (B: the next "
                  f"reference unlike A in all three); ProSpect <a> in stages >= {cfg.mix_split}, <b> below; TI 'a <b> <a>' in "
                  "every stage:", "", "| method | success | bootstrap 95 % (refs) | position (A) | shape (A) | texture (B) |",
                  "|---|---|---|---|---|---|"]
        for method in ("prospect", "ti"):
            row, a = m[method]["success"], m[method]["attributes"]
            lines.append(f"| {LABEL[method]} | **{row['rate']:.2f}** ({row['successes']}/{row['n']}) | {_ci(row['bootstrap'])} | "
                         f"{a['position']:.2f} | {a['shape']:.2f} | {a['texture']:.2f} |")
        d = m["difference"]
        lines.append(f"| ProSpect - TI | {d['mean']:+.2f} | [{d['lo']:+.2f}, {d['hi']:+.2f}] | | | |")
    if "edit" in summary:
        e = summary["edit"]
        lines += ["", f"img2img edit: the reference's texture onto an edit input whose shape, colour, position and "
                  f"texture all differ from it (strength {bm.EDIT_STRENGTH}); the prompt names the input's shape, colour "
                  "and position; ProSpect '*' in stages < k, TI the composed prompt in every stage, caption the target "
                  "named outright:", "",
                  "| method | '*' stages | success | bootstrap 95 % (refs) | texture (r) | shape (t) | colour (t) | "
                  "position (t) |", "|---|---|---|---|---|---|---|---|"]
        for c in (c for c in bm.edit_conditions(cfg) if c.bare is None):
            row, a = e[c.key]["success"], e[c.key]["attributes"]
            where = "" if c.split is None else f"[{c.split[0]}, {c.split[1]})" + (
                " (reported)" if c.split == bm.edit_split(cfg) else "")
            lines.append(f"| {LABEL[c.method]} | {where} | **{row['rate']:.2f}** ({row['successes']}/{row['n']}) | "
                         f"{_ci(row['bootstrap'])} | {a['texture']:.2f} | {a['shape']:.2f} | {a['colour']:.2f} | "
                         f"{a['position']:.2f} |")
        for name, label in (("difference", "ProSpect - TI"), ("difference_staged", "ProSpect - TI, same texts")):
            if name in e:
                d = e[name]
                lines.append(f"| {label} | [0, {cfg.edit_split}) | {d['mean']:+.2f} | [{d['lo']:+.2f}, {d['hi']:+.2f}] "
                             "| | | | |")
    return "\n".join(lines) + "\n"


SWEEP_LABEL = {"ti_staged": "TI, same texts", "caption_staged": "caption, same texts"}
SWEPT = ("texture", "layout", "colour", "content")  # the panels of sweep.png
OPTIONAL = ("mixing", "edit")  # --tasks names beside bm.TASK's


def _runs(cfg: BenchConfig, name: str) -> bool:
    return not cfg.tasks or name in cfg.tasks


def plot_sweep(summary: dict, path: Path) -> None:
    """One panel per transfer task: success, reference and text attribute rates against the split, with TI's and
    the caption ceiling's success as dashed levels."""
    panels = []
    for task in SWEPT:
        rows = summary["sweep"][task]
        xs = [(r["split"][0] if task in ("layout", "colour") else r["split"][1]) for r in rows]
        level = lambda name: [summary["main"][task][name]["success"]["rate"]] * 2  # noqa: E731
        series = [plots.Series("success", xs, [r["success"] for r in rows], "black", width=2.5),
                  plots.Series("reference attrs", xs, [r["from_reference"] for r in rows], "tab:blue"),
                  plots.Series("text attrs", xs, [r["from_text"] for r in rows], "tab:orange"),
                  plots.Series("TI success", [0, 10], level("ti"), "tab:red", "--"),
                  plots.Series("caption ceiling", [0, 10], level("caption"), "0.6", "--")]
        for m, colour in (("ti_staged", "tab:red"), ("caption_staged", "0.6")):
            if all(m in r for r in rows):  # --sweep-staged: the same stage texts at each split
                series.append(plots.Series(f"{SWEEP_LABEL[m]} success", xs, [r[m]["success"] for r in rows], colour, ":o"))
        what = {"texture": "'*' in stages < k", "layout": "'*' in stages >= k", "colour": "'*' in [k, k+4)",
                "content": "'*' in stages < k"}[task]
        default = next(x for x, r in zip(xs, rows) if r["default"])
        panels.append(plots.Panel(f"{task}: {what}", "k", series, ylabel="rate" if not panels else "",
                                  xticks=range(0, 11, 2), marks=[default]))
    plots.line_panels(panels, path)


def cache_dirs(pp: ProSpectPipeline, cfg: BenchConfig) -> tuple[dict[str, Path], dict[str, str]]:
    """The run's cache folders (made) and their keys: concepts under a key of the settings that made them, readings
    under one of the generation's; other scripts that reuse the benchmark's concepts find them here."""
    shared = dict(model=model_fingerprint(pp), steps=cfg.steps, lr=cfg.lr, batch=cfg.batch_size,
                  init=cfg.initializer, seed=cfg.seed, **({"flip_p": cfg.flip_p} if cfg.flip_p != 0.5 else {}),
                  **({"vectors": cfg.vectors} if cfg.vectors != 1 else {}),
                  **({"parameterization": cfg.parameterization} if cfg.parameterization != "free" else {}),
                  **({"stage_choice": cfg.stage_choice} if cfg.stage_choice else {}),
                  **({"templates": list(cfg.templates)} if tuple(cfg.templates) != ("{}",) else {}),
                  **({"timestep_templates": list(cfg.timestep_templates)} if cfg.timestep_templates else {}),
                  **({"shuffle_at": cfg.shuffle_at} if cfg.shuffle_at else {}))
    base = _key(shared)  # ProSpect's hue jitter is its own: TI's concepts are those of the run without it
    ti_key = _key(dict(shared, ti_hue_jitter=True)) if cfg.ti_hue_jitter else base
    jitter = {k: v for k, v in (("hue_jitter_from", cfg.hue_jitter_from), ("hue_jitter_below", cfg.hue_jitter_below))
              if v is not None}
    inv_key = _key(dict(shared, **jitter)) if jitter else base
    gen_key = _key(dict(inv=inv_key, seeds=cfg.seeds, steps=cfg.num_inference_steps, cfg=cfg.guidance_scale,
                        **({"ti": ti_key} if cfg.ti_hue_jitter else {})))
    dirs = {"out": cfg.out, "concepts": cfg.out / "concepts" / inv_key, "concepts_ti": cfg.out / "concepts" / ti_key,
            "readings": cfg.out / "readings" / gen_key}
    for p in dirs.values():
        p.mkdir(parents=True, exist_ok=True)
    return dirs, dict(inversion=inv_key, ti=ti_key, generation=gen_key)


def run(cfg: BenchConfig) -> dict:
    """The whole benchmark: inversions, generation, scoring and the written report."""
    start = time.time()
    pp = ProSpectPipeline.from_pretrained(cfg.model)
    pp.pipe.set_progress_bar_config(disable=True)
    if pp.num_stages != 10:
        raise ValueError("the benchmark's splits are written for N = 10 stages")
    dirs, keys = cache_dirs(pp, cfg)
    todo = bm.conditions(cfg)
    all_readings, seconds = [], {"inversion": 0.0, "generation": 0.0}
    for r in range(cfg.references):
        readings, spent = run_reference(pp, r, cfg, dirs, todo)
        all_readings.append(readings)
        seconds = {k: seconds[k] + spent[k] for k in seconds}
        print(f"reference {r + 1}/{cfg.references}: {bm.reference_scene(cfg.seed, r)} "
              f"({spent['inversion']:.0f} s inversion, {spent['generation']:.0f} s generation)", flush=True)
    summary = bm.summarise(bm.score(all_readings, cfg, todo), cfg, todo)
    if cfg.references > 1 and _runs(cfg, "mixing"):
        start_mix = time.time()
        summary["mix"] = bm.score_mix([run_mix(pp, r, cfg, dirs) for r in range(cfg.references)], cfg)
        seconds["generation"] += time.time() - start_mix
    if _runs(cfg, "edit"):
        edits = [run_edit(pp, r, cfg, dirs) for r in range(cfg.references)]
        summary["edit"] = bm.score_edit([readings for readings, _ in edits], cfg)
        seconds["generation"] += sum(spent for _, spent in edits)
    seconds["total"] = time.time() - start
    table = markdown(summary, cfg, cfg.references)
    (cfg.out / "results.md").write_text(table, encoding="utf-8")
    if all(t in summary["sweep"] for t in SWEPT):
        plot_sweep(summary, cfg.out / "sweep.png")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    result = dict(settings=settings, cache_keys=keys, seconds=seconds,
                  references=[asdict(bm.reference_scene(cfg.seed, r)) for r in range(cfg.references)],
                  texts=[bm.texts_of(bm.reference_scene(cfg.seed, r), cfg.seed, r) for r in range(cfg.references)], **summary)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(table)
    print(f"time this run: {seconds['inversion']:.0f} s inversion, {seconds['generation']:.0f} s generation, "
          f"{seconds['total']:.0f} s in all; wrote {cfg.out / 'results.md'}, results.json, sweep.png")
    return result


QUICK = dict(references=2, steps=20, seeds=2, num_inference_steps=10, sweep=(2, 5, 8))


def stage_range(text: str) -> tuple[int, int]:
    """'LO-HI' as (LO, HI) (ValueError or IndexError if it is not two integers)."""
    lo, hi = text.split("-")[:2]
    return int(lo), int(hi)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="ProSpect vs textual inversion: attribute-transfer benchmark.")
    p.add_argument("--model", default=None, help="model folder or file (default: the embedded toy-world model)")
    p.add_argument("--out", type=Path, default=BenchConfig.out, help="output folder (also the cache)")
    p.add_argument("--references", type=int, help="reference scenes (default 20)")
    p.add_argument("--steps", type=int, help="inversion steps of both methods (default 150)")
    p.add_argument("--lr", type=float, help="inversion learning rate (default 5e-3)")
    p.add_argument("--seeds", type=int, help="images per reference per condition (default 4)")
    p.add_argument("--flip-p", type=float, help="inversion flip probability, both methods (default 0)")
    p.add_argument("--vectors", type=int, help="vectors per stage, both methods (default 6)")
    p.add_argument("--parameterization", choices=("free", "shared"), help="ProSpect's stage coupling (default free)")
    p.add_argument("--stage-choice", type=int, help="ProSpect: draws per stage of the choice of each stage's token "
                   "(default 16; 0 = each stage keeps its own)")
    p.add_argument("--hue-jitter-from", type=int, help="ProSpect: stages >= K learn from the reference at random "
                   "hues, so they carry no colour (default: off)")
    p.add_argument("--hue-jitter-below", type=int, help="ProSpect: stages < K learn from the reference at random "
                   "hues, so the late (texture) tokens carry no colour (default: off)")
    p.add_argument("--ti-hue-jitter", action="store_true", default=None,
                   help="TI: its one token learns from the reference at random hues, at every timestep (default: off)")
    p.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                   help="inversion caption template with {}, both methods, repeatable (default '{}'); {texture}, "
                   "{colour}, {shape}, {position}, {background} are the reference's own values (a captioned inversion)")
    p.add_argument("--template-at", action="append", dest="timestep_templates", metavar="LO-HI:TEMPLATE",
                   help="a caption template for the inversion samples of training timestep in [LO, HI) only, both "
                   "methods, repeatable, drawn with the --template ones; the same fields, e.g. "
                   "'300-700:a {texture} {} {shape} on the {position}' (default: none)")
    p.add_argument("--shuffle-at", metavar="LO-HI", help="both methods: the inversion samples of training timestep "
                   "in [LO, HI) see the reference's 4x4 patches in a random order (default: off)")
    p.add_argument("--initializer", help="initializer word(s), both methods (default 'shape')")
    p.add_argument("--batch-size", type=int, help="inversion batch, both methods (default 10)")
    p.add_argument("--num-inference-steps", type=int, help="DDIM steps (default 20)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale (default 5)")
    p.add_argument("--colour-windows", help="the colour sweep's windows of '*' stages, LO-HI comma separated, e.g. "
                   "2-6,3-7,4-8 (default 1-5,3-7,5-9)")
    p.add_argument("--sweep", help="split points k of the sweeps, comma separated (default 2..8; 0..10 adds text-only and all-stage ends)")
    p.add_argument("--seed", type=int, help="seed of everything (default 0)")
    p.add_argument("--mix-split", type=int, help="mixing: A's tokens in stages >= K, B's below (default 5)")
    p.add_argument("--edit-split", type=int, help="img2img edit: the reported ProSpect row has '*' in stages < K "
                   "(default 5; the sweep's splits are all in the table)")
    p.add_argument("--tasks", help="the tasks to run, comma separated: " + ", ".join((*bm.TASK, *OPTIONAL)) +
                   " (default: all)")
    p.add_argument("--bare", help="layout: also '*' alone in stages >= J and the composed prompt in [k, J), for each J "
                   "(comma separated) and each --sweep k <= J; colour: '*' alone in [J, hi) of each window [lo, hi) "
                   "holding J; TI gets the same stage texts too (default: none)")
    p.add_argument("--ti-staged", action="store_true", default=None,
                   help="TI also under ProSpect's stage texts at each reported split (a-priori and --chosen; the edit's "
                   "--edit-split): prompt editing is open to a TI user too (default: off)")
    p.add_argument("--sweep-staged", action="store_true", default=None,
                   help="at every split of the sweep also TI's one token and the caption (the reference's own words "
                   "where '*' goes) under ProSpect's stage texts: the fair baseline and the model's ceiling of each "
                   "split (default: off)")
    p.add_argument("--bare-below", help="texture, content and edit: also '*' alone in stages < J and the composed "
                   "prompt in [J, k), for each J (comma separated) and each --sweep k >= J; TI gets the same stage "
                   "texts too (default: none)")
    p.add_argument("--chosen", action="append", metavar="TASK:LO-HI",
                   help="a ProSpect split chosen on a pilot run (another --seed), e.g. texture:0-8; repeatable")
    p.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("quick",)}
    for name, flag in (("templates", "--template"), ("timestep_templates", "--template-at")):
        if name not in given:
            continue
        given[name] = tuple(given[name])
        try:  # the world's fields first; then the inversion's own check of each template's one '{}'
            check_config(InversionConfig(**{name: fill_templates(given[name], {a: a for a in world.ATTRIBUTES})}))
        except InversionError as err:
            p.error(f"{flag}: {err}")
        except (IndexError, KeyError, ValueError) as err:
            p.error(f"{flag}: fields are {{}} and {', '.join('{' + a + '}' for a in world.ATTRIBUTES)} ({err!r})")
    for name in ("sweep", "bare", "bare_below"):
        if name in given:
            try:
                given[name] = tuple(int(k) for k in given[name].split(","))
            except ValueError:
                p.error(f"--{name.replace('_', '-')} takes integers, comma separated, e.g. 6,7,8")
    if "tasks" in given:
        given["tasks"] = tuple(t.strip() for t in given["tasks"].split(","))
        unknown = [t for t in given["tasks"] if t not in (*bm.TASK, *OPTIONAL)]
        if unknown:
            p.error(f"--tasks: unknown {', '.join(unknown)}; one of {', '.join((*bm.TASK, *OPTIONAL))}")
    if "colour_windows" in given:
        try:
            given["colour_windows"] = tuple(stage_range(w) for w in given["colour_windows"].split(","))
        except (ValueError, IndexError):
            p.error("--colour-windows takes LO-HI, comma separated, e.g. 2-6,3-7,4-8")
        if any(not 0 <= lo < hi <= 10 for lo, hi in given["colour_windows"]):
            p.error("--colour-windows: each window LO-HI with 0 <= LO < HI <= 10")
    if "chosen" in given:
        try:
            given["chosen"] = tuple((t, *stage_range(r)) for t, r in (c.split(":") for c in given["chosen"]))
        except (ValueError, IndexError):
            p.error("--chosen takes TASK:LO-HI, e.g. texture:0-8")
        if any(t not in bm.TASK or not 0 <= lo < hi <= 10 for t, lo, hi in given["chosen"]):
            p.error(f"--chosen: task one of {', '.join(bm.TASK)} and 0 <= LO < HI <= 10")
    cfg = BenchConfig(**{**(QUICK if args.quick else {}), **given})
    for name in ("references", "steps", "seeds", "num_inference_steps"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.hue_jitter_from is not None and not 0 <= cfg.hue_jitter_from < 10:
        p.error("--hue-jitter-from must be a stage in 0..9")
    if cfg.hue_jitter_below is not None and not 1 <= cfg.hue_jitter_below <= 10:
        p.error("--hue-jitter-below must be a stage count in 1..10")
    if cfg.shuffle_at is not None:
        try:
            check_config(InversionConfig(shuffle_at=cfg.shuffle_at))
        except InversionError as err:
            p.error(str(err).replace("shuffle_at", "--shuffle-at", 1))
    if not 1 <= cfg.edit_split <= 10:
        p.error("--edit-split must lie in 1..10")
    if any(not 0 <= k <= 10 for k in cfg.sweep):
        p.error("--sweep values must lie in 0..10")
    if any(not 1 <= j <= 9 for j in cfg.bare):
        p.error("--bare values must be stages in 1..9")
    if cfg.bare and not (_runs(cfg, "layout") or _runs(cfg, "colour")):
        p.error("--bare adds layout and colour conditions: --tasks must include one of them")
    if any(not 1 <= j <= 9 for j in cfg.bare_below):
        p.error("--bare-below values must be stages in 1..9")
    if cfg.bare_below and not any(_runs(cfg, t) for t in bm.BELOW):
        p.error("--bare-below adds texture, content and edit conditions: --tasks must include one of them")
    return run(cfg)


if __name__ == "__main__":
    main()
