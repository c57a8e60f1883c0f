"""The ``prospect`` command: a thin layer over the Python API.

Every subcommand maps its flags onto the API's dataclasses and functions. Known bad input
ends with one line on stderr ("prospect: error: ...") and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MAX_SEED = 2 ** 63 - 1
MAX_BATCH = 1024  # images per pipeline call
MAX_SCALE = 64  # visualize's upscale factor
A1111_STEPS = 20  # A1111's default sampling steps


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as our one line ("prospect: error: ...", exit 2) instead of a usage block."""

    def error(self, message):
        self.exit(2, f"prospect: error: {message} (see '{self.prog} --help')\n")


DEFAULT_MODEL_HELP = "a diffusers folder or a .ckpt/.safetensors file (default: the embedded toy-world model)"


def _flag(f) -> str | None:
    """A config field's flag: its metadata's ``flag`` (None = no flag), else --field-name."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _dest(f) -> str:
    return _flag(f).lstrip("-").replace("-", "_")


def config_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the config dataclass ``cls``: its type, default, choices and help come from the field,
    so the CLI never restates a default."""
    import typing
    from dataclasses import MISSING, fields

    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if _flag(f) is None or f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = "" if default is None else f" (default {', '.join(map(repr, default)) if isinstance(default, tuple) else default})"
        text = f.metadata.get("help", "") + shown
        if f.metadata.get("invert"):  # --no-X sets the field False
            p.add_argument(_flag(f), action="store_true", help=f.metadata.get("help"))
        elif f.metadata.get("action") == "append":
            p.add_argument(_flag(f), action="append", default=None, help=text)
        else:
            kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
            p.add_argument(_flag(f), type=kind, default=default, choices=f.metadata.get("choices"), help=text)


def config_from(cls, args: argparse.Namespace, **given):
    """The config dataclass ``cls`` from the parsed flags that ``config_flags`` added (and ``given`` values)."""
    from dataclasses import fields

    values = {}
    for f in fields(cls):
        if f.name in given or _flag(f) is None or not hasattr(args, _dest(f)):
            continue
        value = getattr(args, _dest(f))
        if f.metadata.get("invert"):
            value = not value
        elif f.metadata.get("action") == "append":
            value = tuple(value) if value else f.default
        values[f.name] = value
    return cls(**values, **given)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP)
    p.add_argument("--model-config", default=None, help="config folder for a single-file model (default: shipped SD 1.x/2.x)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: this process's GPU if any)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="weights dtype (default: float32 on CPU, float16 on GPU)")


def _sampling_args(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from .pipeline import GenerationConfig  # the defaults live in the config dataclass, not here

    config_flags(p, GenerationConfig, skip)
    p.add_argument("--scheduler", default="ddim", help="ddim, ddpm, pndm, lms, euler, euler_a, heun, dpm++, unipc")
    p.add_argument("--seed", type=int, default=0)


def _train_args(p: argparse.ArgumentParser) -> None:
    from .inversion import InversionConfig  # the defaults live in the config dataclass, not here

    config_flags(p, InversionConfig)
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt.safetensors if present")
    p.add_argument("--validation-prompt", default="*", help="prompt of the validation images (default '*')")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="prospect", description="ProSpect: per-stage textual inversion and prompt-spectrum generation.")
    parser.add_argument("--version", action="version", version=f"prospect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="learn a concept (one token per stage) from one or a few images")
    t.add_argument("images", nargs="+", help="image files or folders")
    t.add_argument("--out", required=True, help="concept file to write (.safetensors)")
    _model_args(t)
    _train_args(t)

    m = sub.add_parser("train-many", help="learn several concepts, spread over the processes of a launch")
    m.add_argument("jobs", help="JSON list of jobs: {\"images\": [...], \"out\": \"x.safetensors\", other train options}")
    _model_args(m)
    _train_args(m)  # defaults for every job; a job's own keys override them

    g = sub.add_parser("generate", help="generate or edit images with a prompt per stage")
    _model_args(g)
    g.add_argument("--concept", action="append", default=[], help="concept file(s) to load")
    g.add_argument("--prompt", default="*", help="prompt; '*' takes the prospect words or the learned token")
    g.add_argument("--prospect-words", default=None, help="JSON/YAML file with N entries (index 0 = generation ends)")
    g.add_argument("--word", action="append", default=None, help="one prospect_words entry (repeat N times; an int = that stage's token)")
    g.add_argument("--image", default=None, help="input image for img2img")
    g.add_argument("--num-images", type=int, default=1, help="image k uses seed + k (default 1)")
    g.add_argument("--batch-size", type=int, default=1,
                   help="images per pipeline call (default 1); the images do not depend on the number of processes")
    g.add_argument("--out", default="prospect-out", help="output folder")
    _sampling_args(g)

    v = sub.add_parser("visualize", help="grid of what each stage's token carries")
    _model_args(v)
    v.add_argument("--concept", required=True)
    v.add_argument("--out", default="prospect-out", help="output folder")
    v.add_argument("--scale", type=int, default=1, help="upscale factor of the grid (nearest)")
    _sampling_args(v, skip=("strength", "negative_prompt", "eta"))

    e = sub.add_parser("export", help="write a concept for other tools")
    e.add_argument("concept")
    e.add_argument("--format", choices=("diffusers", "a1111", "comfyui"), required=True,
                   help="comfyui: models/embeddings/ under --out (a ComfyUI folder) and a workflow (UI and API JSON)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--steps", type=int, default=A1111_STEPS,
                   help=f"a1111: the sampling steps the printed prompt schedules exactly (default {A1111_STEPS}, "
                        "A1111's own default)")
    e.add_argument("--name", default=None, help="name of the exported embeddings and tokens (default: the concept "
                   "file's name, so two exports never collide)")

    i = sub.add_parser("info", help="describe a concept file")
    i.add_argument("concept")

    d = sub.add_parser("demo", help="the main job on the embedded model: invert a reference, then show the uses")
    d.add_argument("--image", default=None, help="reference image (default: a rendered toy-world scene)")
    d.add_argument("--out", default="prospect-demo", help="output folder")
    d.add_argument("--steps", type=int, default=None, help="inversion steps (default: the demo's budget)")
    d.add_argument("--seed", type=int, default=0)
    _model_args(d)

    u = sub.add_parser("ui", help="the web app: train, edit the stages, generate (Gradio, in your browser)")
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    u.add_argument("--share", action="store_true", help="also make Gradio's public share link (off by default)")
    u.add_argument("--out", default="prospect-ui", help="folder of the app's concepts and images")
    _model_args(u)
    return parser


def _quiet() -> None:
    """Library chatter (loading bars, optional-dependency notes) would bury our one-line errors:
    "critical", as diffusers logs an error line before raising it and we report the raise in one line
    (``PROSPECT_VERBOSITY=info`` shows it all)."""
    from .verbosity import set_verbosity

    set_verbosity(os.environ.get("PROSPECT_VERBOSITY", "critical"))


def _check_seed(seed: int, count: int = 1) -> None:
    """Image k uses seed + k: every one must be a valid generator seed."""
    if not 0 <= seed <= MAX_SEED - count:
        raise ValueError(f"--seed must be in [0, 2**63 - 1 - number of images], got {seed}")


def _check_device(name: str | None) -> None:
    """A --device that torch does not know, or that this machine lacks, in one line before any work."""
    import torch

    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a torch device; give e.g. cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s); give --device cpu"
                             + (f" or cuda:0..cuda:{count - 1}" if count else ""))
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; give --device cpu")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {name}: unsupported device type {device.type!r}; give cpu, cuda or mps")


def _load(args):
    import torch

    from .distributed import launch_state
    from .loading import load_pipeline, make_scheduler
    from .pipeline import ProSpectPipeline

    device = args.device or str(launch_state().device)  # under a launcher: this process's GPU
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = load_pipeline(args.model, torch_dtype=dtype, config=args.model_config)
    if getattr(args, "scheduler", None):
        pipe.scheduler = make_scheduler(args.scheduler, pipe)
    pipe.set_progress_bar_config(disable=True)
    return ProSpectPipeline(pipe).to(device)


def _train_job(args):
    """Read the images and check the settings of one training run, before any model loads."""
    from .concept import Concept  # noqa: F401  (import errors surface before the model loads)
    from .data import find_images, open_image
    from .files import check_output_folder
    from .inversion import InversionConfig, check_config

    images = [open_image(p) for p in find_images(args.images)]
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out.name}")
    if not out.parent.exists():
        raise ValueError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the concept file to write, e.g. {out / 'concept.safetensors'}")
    check_output_folder(out.parent)
    cfg = config_from(InversionConfig, args)
    check_config(cfg)
    return images, out, cfg


def _train(args, images, out: Path, cfg, accelerator=None):
    """Load the model and invert (data-parallel over the launch's processes unless ``accelerator`` says otherwise)."""
    from .inversion import invert

    pp = _load(args)
    ckpt = out.with_name(out.stem + ".ckpt.safetensors")
    return invert(pp.pipe, images, cfg, checkpoint=ckpt, resume=args.resume, accelerator=accelerator,
                  validate=_validator(pp, args, out.with_name(out.stem + "-validation")))


def _write_concept(concept, out: Path) -> None:
    concept.save(out)
    vectors = f" x {concept.vectors_per_stage} vectors" if concept.vectors_per_stage > 1 else ""
    print(f"wrote {out} ({concept.num_stages} stages{vectors} x {concept.widths}, placeholder {concept.placeholder!r})")


def cmd_train(args) -> None:
    from .distributed import Solo, launch_state

    images, out, cfg = _train_job(args)
    state = launch_state()
    if cfg.batch_size % state.num_processes:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {state.num_processes} processes")
    # launched: data-parallel over the processes (invert's Accelerator); alone: on --device
    solo = Solo(args.device or state.device, cfg.mixed_precision) if state.num_processes == 1 else None
    concept = _train(args, images, out, cfg, accelerator=solo)
    if state.is_main_process:  # every process holds the same result
        _write_concept(concept, out)
    state.wait_for_everyone()  # no process returns before the concept exists


def cmd_train_many(args) -> None:
    from .distributed import Solo, launch_state, shard
    from .inversion import InversionError
    from .jobs import read_jobs

    checked = []
    for name, job in read_jobs(Path(args.jobs), args, _train_args):  # all checked before any model loads
        try:
            checked.append((name, job, *_train_job(job)))
        except (ValueError, InversionError, OSError) as err:
            raise ValueError(f"{name}: {err}") from None
    state, failed = launch_state(), []
    mine = shard(checked, state.process_index, state.num_processes)
    for name, job, images, out, cfg in mine:
        try:  # a job that fails is reported, and the others go on
            # Solo: the jobs are independent, so no process averages its gradients with another's
            solo = Solo(job.device or state.device, cfg.mixed_precision)
            _write_concept(_train(job, images, out, cfg, accelerator=solo), out)
        except (ValueError, InversionError, OSError) as err:
            failed.append(name)
            print(f"prospect: error: {name}: {str(err).splitlines()[0]}", file=sys.stderr)
    state.wait_for_everyone()  # no process returns before every concept exists
    if failed:
        raise InversionError(f"{len(failed)} of the {len(mine)} jobs of this process failed")


def _validator(pp, args, folder: Path):
    """The callback that writes one validation image (same seed each time) during training."""
    import torch

    from .outputs import ensure_dir, save_png

    def validate(step: int, concept) -> None:
        pp.load_concept(concept)
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        image = pp(args.validation_prompt, num_inference_steps=25, generator=gen).images[0]
        print(save_png(image, ensure_dir(folder) / f"step-{step:06d}.png", {"step": step, "prompt": args.validation_prompt}))

    return validate


def _words(args):
    from .spectrum import SpectrumError, load_prospect_words, parse_entries

    if args.prospect_words and args.word:
        raise SpectrumError("give --prospect-words FILE or --word entries, not both")
    if args.prospect_words:
        return load_prospect_words(args.prospect_words)
    if args.word:
        return parse_entries(args.word)
    return None


def _load_concepts(pp, paths, concepts=None) -> list:
    """Add concepts to the pipeline; a concept that does not fit the model is named by its file."""
    from .concept import ConceptError

    loaded = []
    for path, c in zip(paths, concepts or paths):
        try:
            loaded.append(pp.load_concept(c))
        except ValueError as err:  # e.g. a dim that does not fit the model: say which file
            raise ConceptError(err if str(path) in str(err) else f"{path}: {err}") from err
    return loaded


def cmd_generate(args) -> None:
    from .concept import Concept
    from .data import open_image
    from .distributed import generate_share, launch_state
    from .files import check_output_folder
    from .loading import SCHEDULERS
    from .outputs import ensure_dir, make_grid, save_png
    from .pipeline import MAX_IMAGES, GenerationConfig
    from .spectrum import SpectrumError, build_spectrum

    words = _words(args)
    concepts = [Concept.load(c) for c in args.concept]
    stages = concepts[0].num_stages if concepts else 10
    # check everything before the (slow) model load, so bad input fails at once and writes nothing
    try:
        build_spectrum(args.prompt, words, num_stages=stages, placeholders=[c.placeholder for c in concepts],
                       token_for=(lambda p, k: p) if concepts else None, num_inference_steps=args.steps)
    except SpectrumError as err:
        raise SpectrumError(f"{args.prospect_words}: {err}" if args.prospect_words else err) from None
    image = open_image(args.image) if args.image else None
    settings = config_from(GenerationConfig, args)
    settings.check(img2img=image is not None)  # the API's own check, before the model loads
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(f"--num-images must be in [1, {MAX_IMAGES}], got {args.num_images}")
    if args.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise ValueError(f"--batch-size must be in [1, {MAX_BATCH}], got {args.batch_size}")
    _check_seed(args.seed, args.num_images)
    check_output_folder(args.out)
    pp = _load(args)
    _load_concepts(pp, args.concept, concepts)
    folder = ensure_dir(args.out)
    state = launch_state()
    paths = [folder / f"{args.seed}-{k:03d}.png" for k in range(args.num_images)]
    own, params = {}, None  # the images this process made
    for first, result in generate_share(pp, args.num_images, args.seed, state, args.batch_size, prompt=args.prompt,
                                        prospect_words=words, image=image, config=settings):
        params = dict(result.parameters, seed=args.seed, model=args.model or "embedded toy-world",
                      concept_files=args.concept, stage_prompts=result.stage_prompts[0], batch_size=args.batch_size)
        for k, im in enumerate(result.images, first):
            save_png(im, paths[k], dict(params, index=k, generator_seed=args.seed + k))
            own[k] = im
    state.wait_for_everyone()  # every process's images are written
    if state.is_main_process:  # process 0 made image 0, so it has the parameters
        for path in paths:
            print(path)
        images = [own[k] if k in own else open_image(path) for k, path in enumerate(paths)]
        print(save_png(make_grid(images), folder / f"{args.seed}-grid.png", params))
    state.wait_for_everyone()  # no process returns before the grid exists


def cmd_visualize(args) -> None:
    from .concept import Concept
    from .files import check_output_folder
    from .outputs import ensure_dir, save_png
    from .pipeline import GenerationConfig
    from .visualize import visualize

    if not 1 <= args.scale <= MAX_SCALE:
        raise ValueError(f"--scale must be in [1, {MAX_SCALE}], got {args.scale}")
    config_from(GenerationConfig, args).check()
    _check_seed(args.seed)
    check_output_folder(args.out)
    read = Concept.load(args.concept)  # a bad file is refused before the model loads
    pp = _load(args)
    (concept,) = _load_concepts(pp, [args.concept], [read])
    folder = ensure_dir(args.out)
    vis = visualize(pp, concept.placeholder, seed=args.seed, num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale, scale=args.scale, height=args.height, width=args.width)
    print(save_png(vis.grid, folder / f"stages-{args.seed}.png", {"labels": vis.labels, "prospect_words": vis.stage_words}))


def cmd_export(args) -> None:
    from .concept import Concept
    from .exports import export_a1111, export_diffusers
    from .files import check_output_folder
    from .outputs import ensure_dir

    concept = Concept.load(args.concept)
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps must be in [1, 1000] (denoising steps of the A1111 schedule), got {args.steps}")
    check_output_folder(args.out)
    name = args.name if args.name is not None else _export_name(args.concept)
    folder = ensure_dir(args.out)
    if args.format == "diffusers":
        for p in export_diffusers(concept, folder, name=name):
            print(p)
        print(f"tokens: <{name}:s0> ... <{name}:s{concept.num_stages - 1}> (stage 0 = the last denoising steps)")
    elif args.format == "comfyui":
        from .comfyui import export_comfyui

        paths, workflow = export_comfyui(concept, folder, name=name)
        for p in paths:
            print(p)
        print(f"workflow (ComfyUI UI format, open it with Load): {workflow.with_name(workflow.name.replace('_api', ''))}")
        print(f"workflow (ComfyUI API format): {workflow}")
    else:
        paths, prompt = export_a1111(concept, folder, num_inference_steps=args.steps, name=name)
        for p in paths:
            print(p)
        print(f"A1111 prompt for {args.steps} steps: {prompt}")


def _export_name(concept_file: str) -> str:
    """The default export name: the concept file's name, in the characters A1111 prompts and file names take."""
    from .files import safe_name

    return safe_name(Path(concept_file).name.removesuffix(".safetensors")) or "prospect"


def cmd_info(args) -> None:
    from .concept import Concept

    c = Concept.load(args.concept)
    print(f"placeholder {c.placeholder!r}, {c.num_stages} stages over {c.num_train_timesteps} timesteps, dim {c.widths}"
          f"{' (SDXL: clip_l + clip_g)' if c.family == 'sdxl' else ''}")
    print(f"initializer {c.initializer!r}, base model {c.base_model or 'unknown'!r}"
          f"{f' ({c.base_model_fingerprint})' if c.base_model_fingerprint else ''}")
    print(f"{c.vectors_per_stage} vector(s) per stage")
    norms = ", ".join(f"{n:.3f}" for n in c.embeddings.reshape(c.num_stages, -1).norm(dim=1).tolist())
    print(f"row norms (stage 0..{c.num_stages - 1}): {norms}")


def cmd_demo(args) -> None:
    from .toyworld.demo import DemoConfig, run_demo

    from .inversion import InversionConfig, check_config

    cfg = DemoConfig(out=Path(args.out), image=args.image, seed=args.seed)
    if args.steps is not None:
        cfg.inversion_steps = args.steps
    check_config(InversionConfig(steps=cfg.inversion_steps, seed=cfg.seed))  # before any work
    report = run_demo(cfg, load=lambda: _load(args))  # on --device, in --dtype, once the inputs are checked
    for name, k in report.shown.items():
        mark = "NOT SHOWN" if name in report.failed_rows() else "ok"
        print(f"{name}: {k} of {len(report.readings[name])} images show what the row claims ({mark})")
    print(f"figure: {report.figure}\nreport: {report.html}")


def cmd_ui(args) -> None:
    try:
        from .ui import Studio, launch
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the web app needs gradio: pip install 'prospect-spectrum[ui]'") from None
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    studio = Studio(lambda: _load(args), Path(args.out))
    studio.pp  # load the model now: a bad --model fails here, in one line, before the server starts
    print(f"ProSpect UI on http://{args.host}:{args.port} (Ctrl+C stops it)")
    launch(studio, args.host, args.port, args.share)


FOLDER_OUTPUTS = ("generate", "visualize", "export", "demo")  # the commands whose --out is a folder
COMMANDS = {"train": cmd_train, "train-many": cmd_train_many, "generate": cmd_generate, "visualize": cmd_visualize, "export": cmd_export,
            "info": cmd_info, "demo": cmd_demo, "ui": cmd_ui}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or argparse's one-line error
        return done.code if isinstance(done.code, int) else 2
    from .inversion import InversionError

    try:
        _quiet()
        _check_device(getattr(args, "device", None))
        from .files import new_folders_undone_on_failure

        with new_folders_undone_on_failure(args.out if args.command in FOLDER_OUTPUTS else "."):
            COMMANDS[args.command](args)
    except (ValueError, InversionError, OSError) as err:  # OSError: a file or folder we could not use
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"prospect: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prospect: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
