"""The attribute-transfer benchmark on the toy world: tasks, prompts, scoring and statistics.

Measures the claim of ProSpect (Zhang et al., 2023) that per-stage tokens let a prompt take one
attribute of a reference (its material, its layout, its colour) and the rest from text, against
textual inversion (TI: the same ``invert`` code with ``num_stages=1``, one token for every
timestep, the same steps, lr, batch size, seed and initializer). ``bench/transfer.py`` runs it.

Tasks (every image is read back by :mod:`prospect.toyworld.reader`; the background is scored only
in reconstruction, since no transfer prompt names it):

* reconstruction: all five attributes match the reference;
* texture: the reference's texture, shape/colour/position from the text;
* layout: the reference's position and shape, colour/texture from the text;
* colour: the reference's colour, shape/texture/position from the text;
* content: the reference's colour and texture on a text shape and position (the official README's
  "content-aware" use: the text decides what is drawn and where, the reference how it looks);
* edit (img2img): the reference's texture onto an *edit input*, a rendered scene whose shape,
  colour, position and texture all differ from the reference's, at strength ``EDIT_STRENGTH``; the
  prompt names the input's shape, colour and position, and the image must keep them.

Text attributes are drawn uniformly among the values that differ from the reference's, so an
attribute that follows the text cannot match by copying the reference and vice versa.

Prompts (``*`` = the concept; both methods get the same words, seeds, DDIM steps and CFG):

* the *composed* prompt is what a TI user writes: the text attributes as words, and ``*`` in the
  slot of the attribute(s) to take from the reference, e.g. texture "a * blue square on the top",
  colour "a dotted * square on the top", layout "a dotted green *" (``*`` stands for the shape
  and no position is named); reconstruction is "*", the inversion's own caption.
* TI uses the composed prompt in every stage (one token, one prompt). With ``bare`` conditions TI also
  gets ProSpect's stage texts (prompt editing is open to a TI user), so that row isolates the per-stage tokens.
* ProSpect uses the composed prompt in the stages that carry the attribute and the same prompt
  without ``*`` (shape word "shape") in the others. Default stages, fixed before any run from the
  paper's account (layout first, material last): texture ``*`` in stages 0..4 (second half of
  generation), layout in 5..9 (first half), colour in 3..6 (the middle), content in 0..7 (the
  official README's content-aware example: text alone in the first two stages); reconstruction in all.
  Layout may also put ``*`` alone (the inversion's own caption) in its first stages [J, 10) and the composed
  prompt in [k, J) (colour likewise in [J, hi) of its window), and texture, content and the edit in their last stages [0, J) and the composed prompt in
  [J, k) (``bare_conditions``): the words before ``*`` change what its vectors become.
  The split sweep (``sweep_splits``) shows how the result depends on that choice; a best split
  picked from the sweep is selected on the test data and is optimistic.
* The model ceiling ("caption") names the target outright, e.g. "a striped blue square on the
  top": how often the model renders that combination at all, with no concept.

So ProSpect gets exactly one extra input, the stage split, which is the method's point; its
per-stage tokens each see 1/N of the inversion's samples, as they do at equal compute.

Statistics: a success rate has two 95 % intervals, Wilson over all images (treats them as
independent, so it is too narrow when images of one reference are correlated) and a percentile
bootstrap over references (resamples whole references; the one to read). ProSpect - TI is
a paired bootstrap over references of the per-reference difference in success rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from . import world
from ..spectrum import resolve_editing
from .reader import Reading

Split = tuple[int, int]  # ProSpect: the composed prompt ('*') in stages [lo, hi), plain text elsewhere
_WORD_ORDER = ("texture", "colour", "shape")  # the order of the world's captions, then position


@dataclass(frozen=True)
class TransferTask:
    """One task: which attributes come from the reference, which from the text."""

    name: str
    from_reference: tuple[str, ...]  # attributes the concept must carry
    from_text: tuple[str, ...]  # attributes the prompt names (drawn to differ from the reference)
    default_split: Split  # ProSpect's '*' stages, fixed a priori (N = 10)


TASKS = (
    TransferTask("reconstruction", world.ATTRIBUTES, (), (0, 10)),
    TransferTask("texture", ("texture",), ("shape", "colour", "position"), (0, 5)),
    TransferTask("layout", ("position", "shape"), ("colour", "texture"), (5, 10)),
    TransferTask("colour", ("colour",), ("shape", "texture", "position"), (3, 7)),
    TransferTask("content", ("colour", "texture"), ("shape", "position"), (0, 8)),  # last: the others keep their draws
)
TASK = {t.name: t for t in TASKS}
COLOUR_WIDTH = 4  # stages in a colour window of the sweep
BELOW = ("texture", "content", "edit")  # the tasks whose '*' stages are the last ones, [0, k)


EDIT = TransferTask("edit", ("texture",), ("shape", "colour", "position"), (0, 5))  # img2img; not in TASKS
EDIT_STRENGTH = 0.6  # the edit's img2img strength (the demo's): the last 60 % of the steps run


def sweep_splits(task: TransferTask, ks: Sequence[int], n: int = 10, windows: Sequence[Split] = ()) -> list[Split]:
    """The splits of the stage sweep: texture, content and edit '*' in stages < k, layout in stages >= k, colour
    windows (``windows``; none given: every COLOUR_WIDTH-stage window from stage 1 in steps of two)."""
    if task.name in BELOW:
        splits = [(0, k) for k in ks]
    elif task.name == "layout":
        splits = [(k, n) for k in ks]
    elif task.name == "colour":
        splits = list(windows) or [(lo, lo + COLOUR_WIDTH) for lo in range(1, n - COLOUR_WIDTH + 1, 2)]
    else:
        splits = []
    splits = [s for s in splits if 0 <= s[0] <= s[1] <= n]
    return sorted(set(splits) | {task.default_split})


def text_attributes(reference: world.Scene, task: TransferTask, rng: np.random.Generator) -> dict[str, str]:
    """The attributes the prompt names: each drawn uniformly among the values unlike the reference's."""
    out = {}
    for attr in task.from_text:
        others = [v for v in world.CHOICES[attr] if v != getattr(reference, attr)]
        out[attr] = others[rng.integers(len(others))]
    return out


def target(reference: world.Scene, task: TransferTask, text: Mapping[str, str]) -> dict[str, str]:
    """What a successful image shows: the reference's carried attributes and the text's."""
    return {**{a: getattr(reference, a) for a in task.from_reference}, **text}


def describe(values: Mapping[str, str], concept: Sequence[str] = (), placeholder: str = "*") -> str:
    """A world caption naming ``values``; the ``concept`` attributes become one placeholder at the first one's slot.

    ``describe(scene.attributes()) == world.caption(scene)``; a missing shape reads "shape".
    """
    words, placed = ["a"], False
    for attr in _WORD_ORDER:
        if attr in concept:
            if not placed:
                words.append(placeholder)
                placed = True
        elif attr in values:
            words.append(values[attr])
        elif attr == "shape":
            words.append("shape")
    if "position" in concept and not placed:
        words += ["on", "the", placeholder]
    elif "position" in values and "position" not in concept:
        words += ["on", "the", values["position"]]
    text = " ".join(words)
    if "background" in values and "background" not in concept:
        text += f", {values['background']} background"
    return text


def composed_prompt(task: TransferTask, text: Mapping[str, str], placeholder: str = "*") -> str:
    """The TI-style prompt: the text's words with the placeholder where the reference's attributes go."""
    if not task.from_text:
        return placeholder
    return describe(text, task.from_reference, placeholder)


def stage_texts(task: TransferTask, text: Mapping[str, str], split: Split, n: int = 10,
                bare: int | None = None) -> list[str]:
    """ProSpect's N stage texts (index 0 = generation ends): composed prompt in [lo, hi), text alone elsewhere;
    with ``bare`` = J the placeholder alone (as the inversion saw it) in the stages of the split generation meets
    first or last: [J, hi) for layout, [lo, J) for the ``BELOW`` tasks."""
    lo, hi = split
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"split {split} must satisfy 0 <= lo <= hi <= {n}")
    below = task.name in BELOW
    if bare is not None and not (lo < bare <= hi if below else lo <= bare < hi):
        raise ValueError(f"bare {bare} must lie in the split's stages [{lo}, {hi})"
                         + (" and leave '*' alone in one at least" if below and bare == lo else ""))
    alone = (lambda i: lo <= i < bare) if below else (lambda i: bare <= i < hi)
    plain, composed = describe(text), composed_prompt(task, text)
    return ["*" if bare is not None and alone(i) else composed if lo <= i < hi else plain for i in range(n)]


def caption_stage_texts(task: TransferTask, reference: world.Scene, text: Mapping[str, str], split: Split,
                        n: int = 10) -> list[str]:
    """The caption under ProSpect's stage schedule: the reference's own words where the composed prompt has '*'
    (stages [lo, hi)), the text alone elsewhere; what an ideal token could do at this split on this model."""
    composed, full = composed_prompt(task, text), describe(target(reference, task, text))
    return [full if t == composed else t for t in stage_texts(task, text, split, n)]


def editing_prompt(texts: Sequence[str]) -> str:
    """One prompt in A1111 editing syntax that resolves to ``texts`` (index = stage), for batched calls."""
    n = len(texts)
    if n == 0:
        raise ValueError("no stage texts")
    prompt = texts[n - 1]
    for boundary in range(n - 1, 0, -1):  # generation runs from stage n-1 down to 0
        if texts[boundary - 1] != texts[boundary]:  # stages >= boundary keep what came before
            prompt = f"[{prompt}:{texts[boundary - 1]}:{(n - boundary) / n!r}]"
    if resolve_editing(prompt, n) != list(texts):  # guards against a text with editing syntax in it
        raise ValueError(f"stage texts {list(texts)!r} cannot be written as one editing prompt")
    return prompt


def hits(reading: Reading, wanted: Mapping[str, str]) -> dict[str, bool]:
    """Per attribute of ``wanted``, whether the image shows it."""
    return reading.matches(wanted)


def success(reading: Reading, wanted: Mapping[str, str]) -> bool:
    """Whether the image shows every attribute of ``wanted`` (the task's success)."""
    return all(hits(reading, wanted).values())


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for the default z)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes}/{n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _per_reference(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"expected a non-empty [references, images] array, got shape {x.shape}")
    return x.mean(axis=1)


def bootstrap(x, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean success of a [references, images] array, resampling references."""
    means = _per_reference(x)
    idx = np.random.default_rng(seed).integers(0, len(means), size=(n_boot, len(means)))
    boots = means[idx].mean(axis=1)
    return float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


@dataclass
class Rate:
    """A success rate with its Wilson (images) and bootstrap (references) 95 % intervals."""

    successes: int
    n: int
    rate: float
    wilson: tuple[float, float]
    bootstrap: tuple[float, float]


def rate(x, n_boot: int = 2000, seed: int = 0) -> Rate:
    """Summarise a [references, images] array of successes."""
    x = np.asarray(x, dtype=bool)
    _per_reference(x)
    k, n = int(x.sum()), int(x.size)
    return Rate(k, n, k / n, wilson(k, n), bootstrap(x, n_boot, seed))


@dataclass
class Difference:
    """Mean per-reference difference of success rates (a - b), with a paired bootstrap 95 % interval."""

    mean: float
    lo: float
    hi: float
    references: int


def paired_difference(a, b, n_boot: int = 2000, seed: int = 0) -> Difference:
    """a - b, paired by reference (row): resamples references, keeping each one's two rates together."""
    da, db = _per_reference(a), _per_reference(b)
    if da.shape != db.shape:
        raise ValueError(f"a has {len(da)} references but b has {len(db)}")
    d = da - db
    lo, hi = bootstrap(d[:, None], n_boot, seed)
    return Difference(float(d.mean()), lo, hi, len(d))


# Scoring a run: ``cfg`` is the run's settings (``bench/transfer.py``'s BenchConfig): its seed, references,
# n_boot, sweep, chosen, tasks, bare and mix_split are read here.


@dataclass
class Condition:
    """One way of generating a task: a method and, for ProSpect, the stages that get '*'."""

    method: str
    task: TransferTask
    split: Split | None = None  # TI with a split: its one token under ProSpect's stage texts (prompt editing);
    # caption with a split: the reference's words in the split's stages, the text alone elsewhere
    bare: int | None = None  # the placeholder alone in stages >= bare (layout) or < bare of the split (``stage_texts``)

    @property
    def key(self) -> str:
        tail = f"/{self.split[0]}-{self.split[1]}" if self.split else ""
        return f"{self.method}/{self.task.name}{tail}" + ("" if self.bare is None else f"/bare{self.bare}")

    def prompt(self, scene: world.Scene, text: dict[str, str]) -> str:
        if self.method == "caption":
            if self.split is not None:
                return editing_prompt(caption_stage_texts(self.task, scene, text, self.split))
            return describe(target(scene, self.task, text))
        if self.method == "ti" and self.split is None:
            return composed_prompt(self.task, text)
        return editing_prompt(stage_texts(self.task, text, self.split, bare=self.bare))


def chosen_split(cfg, task: TransferTask) -> Split | None:
    return next(((lo, hi) for name, lo, hi in cfg.chosen if name == task.name), None)


def tasks_of(cfg) -> list[TransferTask]:
    """The transfer tasks a run scores (``cfg.tasks``; empty = all)."""
    return [t for t in TASKS if not cfg.tasks or t.name in cfg.tasks]


def bare_conditions(cfg, tasks: Sequence[TransferTask] | None = None) -> list[Condition]:
    """The placeholder alone where generation meets the split first (layout: stages >= J, J in ``cfg.bare``,
    composed prompt in [k, J), every sweep k <= J; colour: stages [J, hi) of each window [lo, hi) holding J) or last (texture and content: stages < J, J in
    ``cfg.bare_below``, composed prompt in [J, k), every sweep k >= J): ProSpect, and TI's one token under the same
    stage texts. ``tasks`` defaults to the run's transfer tasks (``tasks_of``); the edit passes its own."""
    out = []
    for task in tasks_of(cfg) if tasks is None else tasks:
        if task.name == "layout":
            splits = sorted({((k, 10), j) for j in cfg.bare for k in cfg.sweep if k <= j < 10})
        elif task.name == "colour":  # each window of the sweep [lo, hi) with lo <= J < hi
            splits = sorted({(w, j) for j in cfg.bare for w in sweep_splits(task, cfg.sweep, windows=cfg.colour_windows) if w[0] <= j < w[1]})
        elif task.name in BELOW:
            splits = sorted({((0, k), j) for j in cfg.bare_below for k in cfg.sweep if 0 < j <= k})
        else:
            splits = []
        out += [Condition(m, task, split, j) for split, j in splits for m in ("prospect", "ti")]
    return out


def reported_splits(cfg, task: TransferTask) -> list[Split]:
    """The splits a task's ProSpect rows report: the a-priori one and the pilot-chosen one (if any); the edit's one."""
    if task == EDIT:
        return [edit_split(cfg)]
    return sorted({task.default_split, chosen_split(cfg, task)} - {None})


def staged_ti_conditions(cfg, task: TransferTask) -> list[Condition]:
    """With ``cfg.ti_staged``: TI's one token under ProSpect's stage texts at each reported split (prompt editing
    is open to a TI user: the fair baseline of the per-stage tokens). Reconstruction's '*' everywhere is TI's own."""
    if not cfg.ti_staged or not task.from_text:
        return []
    return [Condition("ti", task, s) for s in reported_splits(cfg, task)]


def sweep_staged_conditions(cfg, task: TransferTask) -> list[Condition]:
    """With ``cfg.sweep_staged``: at every split of the task's sweep, TI's one token and the caption (the reference's
    own words, ``caption_stage_texts``) under ProSpect's stage texts: the fair baseline and the model's ceiling of
    each split."""
    if not cfg.sweep_staged or not task.from_text:
        return []
    return [Condition(m, task, s) for s in task_splits(cfg, task) for m in ("ti", "caption")]


def task_splits(cfg, task: TransferTask) -> list[Split]:
    """Every split a task's ProSpect rows are generated at: the sweep's and the reported ones."""
    return sorted(set(sweep_splits(task, cfg.sweep, windows=cfg.colour_windows)) | set(reported_splits(cfg, task)))


def conditions(cfg) -> list[Condition]:
    out = []
    for task in tasks_of(cfg):
        out += [Condition("prospect", task, s) for s in task_splits(cfg, task)]
        out += [Condition("ti", task), Condition("caption", task)] + staged_ti_conditions(cfg, task)
        out += sweep_staged_conditions(cfg, task)
    out += bare_conditions(cfg)
    return list({c.key: c for c in out}.values())  # one of each (staged TI may be asked for twice)


def reference_scene(seed: int, r: int) -> world.Scene:
    return world.random_scene(np.random.default_rng([seed, r]))


def texts_of(scene: world.Scene, seed: int, r: int) -> dict[str, dict[str, str]]:
    return {t.name: text_attributes(scene, t, np.random.default_rng([seed, r, i])) for i, t in enumerate(TASKS)}



MIX_SPLIT = 5  # mixing's a-priori split: A's tokens in stages >= 5 (layout, first half), B's below (material)
MIX_FROM_A, MIX_FROM_B = ("position", "shape"), ("texture",)


def mix_partner(cfg, r: int) -> int:
    """B for reference A = r: the next reference whose position, shape and texture all differ from A's."""
    a = reference_scene(cfg.seed, r)
    for j in range(1, cfg.references):
        b = reference_scene(cfg.seed, (r + j) % cfg.references)
        if all(getattr(a, x) != getattr(b, x) for x in MIX_FROM_A + MIX_FROM_B):
            return (r + j) % cfg.references
    return (r + 1) % cfg.references


def mix_prompts(method: str, split: int = MIX_SPLIT, n: int = 10) -> str:
    """Layout of <a> + texture of <b>: ProSpect switches tokens at ``split``; TI writes both in one prompt."""
    if method == "ti":
        return "a <b> <a>"  # what a TI user writes: <b> in the texture slot, <a> in the shape slot
    return editing_prompt(["<b>" if i < split else "<a>" for i in range(n)])



def score_mix(mix: list[dict], cfg) -> dict:
    """Success (A's position and shape, B's texture) per method, with ProSpect - TI paired over references."""
    out, arrays = {}, {}
    for method in ("prospect", "ti"):
        rows, attrs = [], {a: [] for a in MIX_FROM_A + MIX_FROM_B}
        for r, readings in enumerate(mix):
            a, b = reference_scene(cfg.seed, r), reference_scene(cfg.seed, mix_partner(cfg, r))
            wanted = {**{x: getattr(a, x) for x in MIX_FROM_A}, **{x: getattr(b, x) for x in MIX_FROM_B}}
            got = [hits(Reading(**d), wanted) for d in readings[method]]
            rows.append([all(h.values()) for h in got])
            for x in attrs:
                attrs[x].append([h[x] for h in got])
        arrays[method] = np.asarray(rows, dtype=bool)
        out[method] = dict(success=asdict(rate(arrays[method], cfg.n_boot, cfg.seed)),
                           attributes={x: float(np.mean(v)) for x, v in attrs.items()})
    out["difference"] = asdict(paired_difference(arrays["prospect"], arrays["ti"], cfg.n_boot, cfg.seed))
    return out


def wanted_of(cfg, r: int, task: TransferTask) -> dict[str, str]:
    """What a successful image of reference r shows in ``task`` (the edit's text is its input's)."""
    scene = reference_scene(cfg.seed, r)
    text = edit_input(cfg.seed, r)[1] if task == EDIT else texts_of(scene, cfg.seed, r)[task.name]
    return target(scene, task, text)


def score(all_readings: list[dict], cfg, todo: list[Condition]) -> dict[str, dict[str, np.ndarray]]:
    """Per condition: [references, images] arrays of success and of each scored attribute."""
    out = {}
    for c in todo:
        arrays = {"success": [], **{a: [] for a in c.task.from_reference + c.task.from_text}}
        for r, readings in enumerate(all_readings):
            wanted = wanted_of(cfg, r, c.task)
            rows = [hits(Reading(**d), wanted) for d in readings[c.key]]
            arrays["success"].append([all(h.values()) for h in rows])
            for a in wanted:
                arrays[a].append([h[a] for h in rows])
        out[c.key] = {k: np.asarray(v, dtype=bool) for k, v in arrays.items()}
    return out


def summarise(scores: dict, cfg, todo: list[Condition]) -> dict:
    """Rates with intervals, ProSpect - TI differences, the split sweep and the attribute ceiling."""
    by = {c.key: c for c in todo}
    main, diffs, sweep = {}, {}, {}
    for task in tasks_of(cfg):
        keys = {"prospect": Condition("prospect", task, task.default_split).key,
                "ti": Condition("ti", task).key, "caption": Condition("caption", task).key}
        if chosen_split(cfg, task) not in (None, task.default_split):
            keys["prospect_chosen"] = Condition("prospect", task, chosen_split(cfg, task)).key
        diffs[task.name] = asdict(paired_difference(scores[keys["prospect"]]["success"], scores[keys["ti"]]["success"],
                                                       cfg.n_boot, cfg.seed))
        if "prospect_chosen" in keys:
            diffs[task.name + " (chosen split)"] = asdict(paired_difference(
                scores[keys["prospect_chosen"]]["success"], scores[keys["ti"]]["success"], cfg.n_boot, cfg.seed))
        for c in staged_ti_conditions(cfg, task):  # ProSpect minus TI under the very same stage texts
            chosen = c.split != task.default_split
            mine = keys["prospect_chosen" if chosen else "prospect"]
            keys["ti_staged_chosen" if chosen else "ti_staged"] = c.key
            diffs[f"{task.name}{' (chosen split)' if chosen else ''} vs TI, same texts"] = asdict(paired_difference(
                scores[mine]["success"], scores[c.key]["success"], cfg.n_boot, cfg.seed))
        main[task.name] = {m: dict(success=asdict(rate(scores[k]["success"], cfg.n_boot, cfg.seed)),
                                   attributes={a: float(v.mean()) for a, v in scores[k].items() if a != "success"})
                           for m, k in keys.items()}
        sweep[task.name] = [dict(split=list(by[k].split), default=by[k].split == task.default_split,
                                 **_sweep_cell(s, task),
                                 **{m: _sweep_cell(scores[key], task) for m, key in
                                    (("ti_staged", Condition("ti", task, by[k].split).key),
                                     ("caption_staged", Condition("caption", task, by[k].split).key)) if key in scores})
                            for k, s in scores.items() if k.startswith(f"prospect/{task.name}/") and by[k].bare is None]
    ceiling = {a: float(v.mean()) for a, v in scores.get("caption/reconstruction", {}).items() if a != "success"}
    out = dict(main=main, differences=diffs, sweep=sweep, ceiling=ceiling)
    if bare_conditions(cfg):
        out["bare"] = summarise_bare(scores, cfg)
    return out


def _sweep_cell(s: dict[str, np.ndarray], task: TransferTask) -> dict:
    return dict(success=float(s["success"].mean()),
                from_reference=float(np.mean([s[a] for a in task.from_reference])),
                from_text=float(np.mean([s[a] for a in task.from_text])) if task.from_text else None)


def summarise_bare(scores: dict, cfg, todo: list[Condition] | None = None) -> list[dict]:
    """Per bare condition (``bare_conditions``, or ``todo``'s): ProSpect's and staged TI's rates, and ProSpect
    minus each TI row (the task's own TI, composed prompt in every stage, and the staged one)."""
    rows = []
    for c in bare_conditions(cfg) if todo is None else [c for c in todo if c.bare is not None]:
        if c.method != "prospect":
            continue
        mine, ti = scores[c.key], scores[Condition("ti", c.task).key]["success"]
        staged = scores[Condition("ti", c.task, c.split, c.bare).key]
        rows.append(dict(task=c.task.name, split=list(c.split), bare=c.bare,
                         prospect=dict(success=asdict(rate(mine["success"], cfg.n_boot, cfg.seed)),
                                       attributes={a: float(v.mean()) for a, v in mine.items() if a != "success"}),
                         ti_staged=dict(success=asdict(rate(staged["success"], cfg.n_boot, cfg.seed)),
                                        attributes={a: float(v.mean()) for a, v in staged.items() if a != "success"}),
                         minus_ti=asdict(paired_difference(mine["success"], ti, cfg.n_boot, cfg.seed)),
                         minus_ti_staged=asdict(paired_difference(mine["success"], staged["success"], cfg.n_boot,
                                                                  cfg.seed))))
    return rows


def edit_input(seed: int, r: int) -> tuple[world.Scene, dict[str, str]]:
    """Reference r's edit input and the words its prompt names: shape, colour, position and texture all unlike the
    reference's (so neither the input nor the text can supply the reference's texture)."""
    ref = reference_scene(seed, r)
    rng = np.random.default_rng([seed, r, len(TASKS)])
    text = text_attributes(ref, EDIT, rng)
    textures = [v for v in world.CHOICES["texture"] if v != ref.texture]
    scene = world.random_scene(rng).with_(**text, texture=textures[rng.integers(len(textures))])
    return scene, text


def edit_conditions(cfg) -> list[Condition]:
    splits = sorted(set(sweep_splits(EDIT, cfg.sweep)) | {edit_split(cfg)})
    return ([Condition("prospect", EDIT, s) for s in splits]
            + [Condition("ti", EDIT), Condition("caption", EDIT)]
            + staged_ti_conditions(cfg, EDIT)
            + bare_conditions(cfg, [EDIT]))


def edit_split(cfg) -> Split:
    """The edit's reported ProSpect split: '*' in stages < ``cfg.edit_split`` (a priori texture's [0, 5))."""
    return (0, cfg.edit_split)


def score_edit(readings: list[dict], cfg) -> dict:
    """Per edit condition: success and attribute rates; ProSpect (at ``edit_split``) - TI paired over references."""
    scores = score(readings, cfg, edit_conditions(cfg))
    out = {k: dict(success=asdict(rate(s["success"], cfg.n_boot, cfg.seed)),
                   attributes={a: float(v.mean()) for a, v in s.items() if a != "success"}) for k, s in scores.items()}
    chosen = Condition("prospect", EDIT, edit_split(cfg)).key
    out["difference"] = asdict(paired_difference(scores[chosen]["success"], scores[Condition("ti", EDIT).key]["success"],
                                                 cfg.n_boot, cfg.seed))
    for c in staged_ti_conditions(cfg, EDIT):
        out["difference_staged"] = asdict(paired_difference(scores[chosen]["success"], scores[c.key]["success"],
                                                            cfg.n_boot, cfg.seed))
    if bare_conditions(cfg, [EDIT]):
        out["bare"] = summarise_bare(scores, cfg, bare_conditions(cfg, [EDIT]))
    return out
