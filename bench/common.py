"""Shared helpers of the benchmark scripts: the machine, models, interleaved timing, tables.

Run the scripts from the repository root (``python bench/generation.py``); Python puts
``bench/`` on the import path, so they import this file as ``common``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# Ten distinct stage prompts; world words, so the embedded model's tokenizer knows them too.
STAGE_PROMPTS = [
    "a red circle", "a green square", "a blue triangle", "a yellow circle", "a purple square",
    "a striped red triangle", "a dotted green circle", "a checkered blue square",
    "a red circle on the left", "a blue square, dark background",
]
DEFAULT_MODELS = ("toy", "sd15")  # sdxl only when asked: its fp32 weights alone take 14 GB
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_common_arguments(parser) -> None:
    """The flags both scripts share: models, device, dtype, threads, repeats, --quick."""
    parser.add_argument("--model", action="append", help="'toy' (embedded), 'sd15' / 'sdxl' (SD 1.5 / SDXL base "
                        "architecture, random weights) or a local diffusers folder; repeat for several (default: toy "
                        "and sd15)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of under a minute (toy model, tiny settings)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights' dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of each contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, help="override the preset's batch")
    parser.add_argument("--size", type=int, help="override the preset's size in pixels")
    parser.add_argument("--steps", type=int, help="override the preset's steps")


def settings(args, presets: dict, quick) -> list:
    """The settings to run: one per --model (default: the DEFAULT_MODELS presets; --quick: the quick one on the toy
    model), with the shared overrides --batch, --size and --steps applied."""
    from dataclasses import replace

    out = []
    for name in args.model or (["toy"] if args.quick else [p for p in presets if p in DEFAULT_MODELS]):
        base = quick if args.quick else presets.get(name, presets["toy"])
        out.append(replace(base, model=name, size=args.size or base.size, batch=args.batch or base.batch,
                           steps=args.steps or base.steps))
    return out


def setup(args) -> None:
    """Apply --threads, quieten library logs and refuse a device that is not there."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.device == "cpu" and args.dtype != "fp32":
        print(f"note: {args.dtype} on a CPU without native support can be slower than fp32, the CPU reference")


def machine(device: str) -> str:
    """One line naming the hardware and software the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import diffusers

    parts = [f"CPU {cpu}", f"{os.cpu_count()} logical cores ({usable} usable)", f"torch {torch.__version__}",
             f"diffusers {diffusers.__version__}", f"{torch.get_num_threads()} torch threads"]
    if device.startswith("cuda"):
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    return "machine: " + ", ".join(parts) + f", {load_average()} at start"


def load_average() -> str:
    """The 1-minute load average: other work on the machine inflates wall times (not CPU times) by it."""
    try:
        return f"load average {os.getloadavg()[0]:.2f}"
    except OSError:
        return "load average unknown"


def load_model(name: str, device: str, dtype: torch.dtype):
    """A stock pipeline: 'toy' (embedded), 'sd15' / 'sdxl' (random SD 1.5 / SDXL weights) or a folder."""
    if name == "sd15":
        pipe = random_sd15()
    elif name == "sdxl":
        pipe = random_sdxl()
    else:
        from prospect.loading import load_pipeline

        pipe = load_pipeline(None if name == "toy" else name)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def random_sd15():
    """Stable Diffusion 1.5's architecture with random weights, from the configs shipped in the package."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from prospect.loading import CONFIG_DIR

    folder = CONFIG_DIR / "sd-v1"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(folder / "scheduler"))
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def random_sdxl():
    """SDXL base 1.0's architecture (both text encoders) with random weights, from the package's SDXL configs."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from prospect.loading import CONFIG_DIR, _tokenizer

    folder = CONFIG_DIR / "sdxl"
    torch.manual_seed(0)
    text = lambda name: CLIPTextConfig.from_pretrained(folder / name, local_files_only=True)  # noqa: E731
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")).eval(),
        text_encoder=CLIPTextModel(text("text_encoder")).eval(),
        text_encoder_2=CLIPTextModelWithProjection(text("text_encoder_2")).eval(),
        tokenizer=_tokenizer(folder), tokenizer_2=_tokenizer(folder, "tokenizer_2"),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).eval(),
        scheduler=DDIMScheduler.from_config(DDIMScheduler.load_config(folder / "scheduler")))


def text_encoders(pipe) -> list:
    """The pipeline's text encoders (SDXL: both), as a concept has rows in them."""
    from prospect.concept import text_encoders as pairs

    return [encoder for _, encoder in pairs(pipe)]


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer reads what the work cost."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def now() -> tuple[float, float]:
    """(wall, process CPU) seconds. CPU time counts only this process's work, so other load on the
    machine disturbs it less than the wall clock (with several threads it sums over them)."""
    return time.perf_counter(), time.process_time()


@dataclass
class Times:
    """Seconds of repeated runs: wall clock and this process's CPU time."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        self.wall.append(end[0] - start[0])
        self.cpu.append(end[1] - start[1])

    def extend(self, other: "Times") -> None:
        self.wall += other.wall
        self.cpu += other.cpu


def timed(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """Run fn; return (start, end) clock readings around it, queued GPU work included."""
    sync(device)
    start = now()
    fn()
    sync(device)
    return start, now()


def interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int, device: str, after: Callable[[str], None] | None = None
) -> dict[str, Times]:
    """Times of each contender per repeat, run in turn (A B, then B A, ...) so drift hits all alike.

    ``after(name)`` runs after each timed call, outside the timing (to read counters).
    """
    times = {name: Times() for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].add(*timed(contenders[name], device))
            if after is not None:
                after(name)
    return times


@dataclass
class Spread:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values), len(values))

    def fmt(self, digits: int = 3) -> str:
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}] (n={self.n})"


def print_table(title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    """A Markdown table under a heading (pastes into the README as is)."""
    print(f"\n### {title}\n")
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def proc_status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM) in MiB; NaN elsewhere."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Make VmHWM restart from the current resident set (Linux: write 5 to clear_refs); False if it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the resident set counts live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the level at ``start()``: the CUDA allocator's peak, or on CPU the peak
    resident set (VmHWM after resetting it; freed heap handed back first so reuse is not hidden)."""

    def __init__(self, device: str):
        self.device, self.base, self.ok = device, 0.0, True

    def start(self) -> None:
        if self.device.startswith("cuda"):
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        _release_free_heap()
        self.ok = reset_peak_rss()
        self.base = proc_status_mb("VmRSS")

    def peak_mb(self) -> float:
        """MiB above the start level (NaN where the platform cannot tell)."""
        if self.device.startswith("cuda"):
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        return proc_status_mb("VmHWM") - self.base if self.ok else float("nan")
