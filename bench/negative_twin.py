"""Guidance away from a colour-free twin: per-stage negative prompts on the colour and content tasks (issue #12).

Run: ``python bench/negative_twin.py --seed 1 --references 12 --out runs/pilot-budget`` (the benchmark's folder: its
concepts are reused, the twins are added to its cache).

Each reference has its ProSpect concept and its textual inversion (TI), as ``bench/transfer.py`` learns them, and a
*twin* of each learned at random hues (ProSpect: every stage; TI: its one token), which carries the reference's shape,
position and texture but not its colour. In the stages that get ``*``, the negative prompt names the twin, so
classifier-free guidance steers from the twin towards the concept:

- ``none``: the empty negative (the benchmark's own rows);
- ``twin-context``: the same stage text with the twin in place of ``*`` (guidance on the concept's colour alone);
- ``twin-alone``: the twin alone (guidance on the text and the colour, away from the reference's shape);
- ``stage-9``: the concept's own stage-9 token (the layout stage's, colour not taken out; TI: its one token);
- ``shape-word``: a diagnostic, not a candidate: the reference's own shape in words (``a triangle``), which the
  user would have to write; how much taking the shape away at these stages can give at all.

Both methods get each variant with their own twin and tokens (a fair baseline). Images, seeds, stage texts and reading are the
benchmark's; only the negative prompt differs. Writes ``negative-twin.md`` and ``negative-twin.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import transfer as T
from prospect import Concept, ProSpectPipeline
from prospect.toyworld import benchmark as bm
from prospect.toyworld.reader import read_batch

TWIN = "<twin>"  # the twin concept's placeholder
EARLY = "<early>"  # the concept's stage-9 token in every stage
VARIANTS = ("none", "twin-context", "twin-alone", "stage-9", "shape-word")
DIAGNOSTIC = ("shape-word",)  # uses the reference's own words: reported, never chosen
SPLITS = {"colour": (3, 7), "content": (0, 6)}  # the shipped (pilot-chosen) splits of the two tasks
METHODS = ("prospect", "ti")


def negative_texts(variant: str, texts: list[str], split: tuple[int, int], shape: str) -> list[str]:
    """The N negative stage texts of a variant: its negative in the split's stages, the empty text elsewhere."""
    lo, hi = split
    inside = {"none": lambda t: "", "twin-context": lambda t: t.replace("*", TWIN), "twin-alone": lambda t: TWIN,
              "stage-9": lambda t: EARLY, "shape-word": lambda t: f"a {shape}"}[variant]
    return [inside(t) if lo <= k < hi else "" for k, t in enumerate(texts)]


def twin_config(cfg: T.BenchConfig) -> T.BenchConfig:
    """The twins' settings: the benchmark's, at random hues (ProSpect in every stage, TI at every timestep)."""
    return replace(cfg, hue_jitter_from=0, hue_jitter_below=None, ti_hue_jitter=True)


def run_reference(pp, r: int, cfg: T.BenchConfig, dirs, twin_dirs, cache: Path) -> tuple[dict, float, float]:
    """Readings of every (task, method, variant) of reference r (cached), and the seconds of inversion, generation."""
    readings = json.loads(cache.read_text()) if cache.exists() else {}
    keys = [f"{m}/{t}/{v}" for m in METHODS for t in SPLITS for v in VARIANTS]
    if all(k in readings for k in keys):
        return readings, 0.0, 0.0
    scene, seeds = bm.reference_scene(cfg.seed, r), T.image_seeds(cfg, r)
    texts = bm.texts_of(scene, cfg.seed, r)
    inverted = generated = 0.0
    for method, n in (("prospect", pp.num_stages), ("ti", 1)):
        concept, spent = T.learn(pp, scene, n, T.concept_path(dirs, r, method), cfg)
        twin, spent_twin = T.learn(pp, scene, n, T.concept_path(twin_dirs, r, method), twin_config(cfg))
        inverted += spent + spent_twin
        pp.load_concept(T.in_every_stage(concept, "*", pp.num_stages))
        pp.load_concept(T.in_every_stage(twin, TWIN, pp.num_stages))
        pp.load_concept(T.in_every_stage(Concept(placeholder=EARLY, embeddings=concept.embeddings[-1:]), EARLY,
                                         pp.num_stages))
        start = time.time()
        for name, split in SPLITS.items():
            task = bm.TASK[name]
            stage_texts = bm.stage_texts(task, texts[name], split)
            prompt = bm.editing_prompt(stage_texts)
            for variant in VARIANTS:
                negative = bm.editing_prompt(negative_texts(variant, stage_texts, split, scene.shape))
                images = T.seeded_images(pp, [prompt] * len(seeds), seeds, T.BATCH, negative_prompt=negative,
                                         num_inference_steps=cfg.num_inference_steps,
                                         guidance_scale=cfg.guidance_scale)
                readings[f"{method}/{name}/{variant}"] = [g.as_dict() for g in read_batch(images)]
        generated += time.time() - start
    cache.write_text(json.dumps(readings))
    return readings, inverted, generated


def summarise(all_readings: list[dict], cfg: T.BenchConfig) -> dict:
    """Per task: success and attribute rates of every method and variant, and ProSpect's variants minus the
    stronger fair TI (the best of TI's variants, the diagnostic's too), paired over references."""
    out = {}
    for name in SPLITS:
        task = bm.TASK[name]
        wanted = [bm.wanted_of(cfg, r, task) for r in range(len(all_readings))]

        def grid(key):
            return [[bm.success(bm.Reading(**x), w) for x in rr[key]] for rr, w in zip(all_readings, wanted)]

        def attrs(key):
            hits = [bm.hits(bm.Reading(**x), w) for rr, w in zip(all_readings, wanted) for x in rr[key]]
            return {a: float(np.mean([h[a] for h in hits])) for a in hits[0]}

        rows = {f"{m}/{v}": dict(success=float(np.mean(grid(f"{m}/{name}/{v}"))),
                                 attributes=attrs(f"{m}/{name}/{v}")) for m in METHODS for v in VARIANTS}
        best_ti = max(VARIANTS, key=lambda v: rows[f"ti/{v}"]["success"])
        diffs = {v: bm.paired_difference(grid(f"prospect/{name}/{v}"), grid(f"ti/{name}/{best_ti}"), cfg.n_boot).__dict__
                 for v in VARIANTS}
        out[name] = dict(split=SPLITS[name], rows=rows, stronger_ti=best_ti, prospect_minus_stronger_ti=diffs)
    return out


def markdown(summary: dict, cfg: T.BenchConfig, n_refs: int, seconds: dict) -> str:
    lines = [f"Guidance away from a colour-free twin (bench/negative_twin.py): {n_refs} references (seed {cfg.seed}) "
             f"x {cfg.seeds} images, the benchmark's inversions ({cfg.steps} steps, {cfg.vectors} vectors, stage "
             f"choice {cfg.stage_choice}) and twins at random hues; DDIM {cfg.num_inference_steps}, CFG "
             f"{cfg.guidance_scale}; {seconds['inversion']:.0f} s inversion, {seconds['generation']:.0f} s generation "
             "this run.", ""]
    for name, s in summary.items():
        lo, hi = s["split"]
        attributes = list(next(iter(s["rows"].values()))["attributes"])
        lines += [f"{name}, '*' in [{lo}, {hi}); the stronger fair TI is TI/{s['stronger_ti']}:", "",
                  "| method | negative | success | " + " | ".join(attributes) + " | ProSpect − stronger fair TI |",
                  "|---|---|---|" + "---|" * len(attributes) + "---|"]
        for key, row in s["rows"].items():
            method, variant = key.split("/")
            d = s["prospect_minus_stronger_ti"][variant] if method == "prospect" else None
            cell = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d else ""
            label = variant + (" (diagnostic)" if variant in DIAGNOSTIC else "")
            lines.append(f"| {'ProSpect' if method == 'prospect' else 'TI'} | {label} | {row['success']:.2f} | "
                         + " | ".join(f"{row['attributes'][a]:.2f}" for a in attributes) + f" | {cell} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="ProSpect vs TI on colour and content, negatives from a colour-free twin.")
    p.add_argument("--model", default=None, help="model folder or file (default: the embedded toy-world model)")
    p.add_argument("--out", type=Path, default=T.BenchConfig.out, help="the benchmark's output folder (its cache)")
    p.add_argument("--references", type=int, default=12)
    p.add_argument("--seed", type=int, default=1, help="seed of the references (default 1: the pilot's)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in
                                                                                   T.QUICK.items() if k != "sweep"))
    args = p.parse_args(argv)
    quick = {k: v for k, v in T.QUICK.items() if k != "sweep"} if args.quick else {}
    cfg = T.BenchConfig(**{**quick, "model": args.model, "out": args.out, "seed": args.seed,
                           "guidance_scale": args.guidance_scale,
                           **({} if args.quick else {"references": args.references})})
    if cfg.references < 2:
        p.error("--references must be at least 2 (the intervals resample references)")
    pp = ProSpectPipeline.from_pretrained(cfg.model)
    pp.pipe.set_progress_bar_config(disable=True)
    dirs, keys = T.cache_dirs(pp, cfg)
    twin_dirs, twin_keys = T.cache_dirs(pp, twin_config(cfg))
    cache = cfg.out / "negative-twin" / T._key(dict(plain=keys, twin=twin_keys, seeds=cfg.seeds,
                                                    steps=cfg.num_inference_steps, cfg=cfg.guidance_scale))
    cache.mkdir(parents=True, exist_ok=True)
    all_readings, seconds = [], {"inversion": 0.0, "generation": 0.0}
    for r in range(cfg.references):
        readings, inverted, generated = run_reference(pp, r, cfg, dirs, twin_dirs, cache / f"ref{r:03d}.json")
        all_readings.append(readings)
        seconds["inversion"] += inverted
        seconds["generation"] += generated
        print(f"reference {r + 1}/{cfg.references} ({inverted:.0f} s inversion, {generated:.0f} s generation)",
              flush=True)
    summary = summarise(all_readings, cfg)
    table = markdown(summary, cfg, cfg.references, seconds)
    (cfg.out / "negative-twin.md").write_text(table, encoding="utf-8")
    (cfg.out / "negative-twin.json").write_text(json.dumps(dict(seed=cfg.seed, references=cfg.references,
                                                                seconds=seconds, **summary), indent=1))
    print(table)
    return summary


if __name__ == "__main__":
    main()
