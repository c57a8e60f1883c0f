"""Generation cost: ProSpectPipeline with ten distinct stage prompts vs stock StableDiffusionPipeline.

Three contenders: stock, ProSpect with ten distinct stage prompts, and ProSpect with stock's
prompt in every stage (our loop's own cost, without the distinct prompts). They run in this one
process on the same model, seed, scheduler (DDIM), steps, guidance and batch, interleaved
(A B C, C B A, ...) after a warm-up; the table gives medians, ranges and ratios to stock, on the
wall clock and in process CPU time. ProSpect encodes the stage prompts that the
call's timesteps reach (all ten at 50 steps) plus the negative prompt. Forward hooks on the text
encoder and the UNet (supported PyTorch extension points) count their calls and time the text
encoding. Usage (from the repository root):

    python bench/generation.py            # embedded toy model and random-weight SD 1.5 at 512 px
    python bench/generation.py --quick    # smoke run, under a minute
    python bench/generation.py --model sdxl   # random-weight SDXL base at 256 px (about 15 GB of memory)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import torch
from diffusers import DDIMScheduler

import common
from prospect.pipeline import ProSpectPipeline


@dataclass
class Setting:
    """One benchmarked configuration."""

    model: str  # 'toy', 'sd15', 'sdxl' or a folder
    size: int | None  # pixels; None = the model's default
    steps: int  # DDIM steps
    batch: int  # images per call (num_images_per_prompt)
    guidance: float = 5.0  # classifier-free guidance scale
    repeats: int = 5  # timed calls of each pipeline


PRESETS = {
    "toy": Setting("toy", None, 50, 4, repeats=5),
    "sd15": Setting("sd15", 512, 3, 1, repeats=3),
    "sdxl": Setting("sdxl", 256, 3, 1, repeats=3),  # not in the default run: 14 GB of fp32 weights
}
QUICK = Setting("toy", None, 8, 2, repeats=2)


class Probe:
    """Counts a module's calls and input rows and sums their wall time, via forward (pre-)hooks."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.device, self.calls, self.rows, self.seconds, self._start = device, 0, 0, 0.0, 0.0
        self.handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _before(self, module, args):
        common.sync(self.device)
        self.calls += 1
        self.rows += args[0].shape[0] if args else 0
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        common.sync(self.device)
        self.seconds += time.perf_counter() - self._start

    def take(self) -> tuple[int, int, float]:
        """(calls, rows, seconds) since the last take."""
        out = (self.calls, self.rows, self.seconds)
        self.calls, self.rows, self.seconds = 0, 0, 0.0
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Counts:
    """What the probes saw during one pipeline call."""

    text_calls: int  # text-encoder forward calls
    text_rows: int  # sequences encoded
    text_seconds: float  # wall time inside the text encoder
    unet_calls: int
    unet_seconds: float  # wall time inside the UNet


def run_setting(s: Setting, device: str, dtype: torch.dtype, seed: int) -> None:
    began = time.perf_counter()
    pipe = common.load_model(s.model, device, dtype)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prospect = ProSpectPipeline(pipe)
    size = s.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    kwargs = dict(height=size, width=size, guidance_scale=s.guidance, num_images_per_prompt=s.batch)
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731  (CPU generator, as diffusers' docs)
    contenders = {
        "stock": lambda steps: pipe(common.STAGE_PROMPTS[0], num_inference_steps=steps, generator=gen(), **kwargs),
        "prospect": lambda steps: prospect("*", prospect_words=common.STAGE_PROMPTS, num_inference_steps=steps,
                                           generator=gen(), **kwargs),
        # the same call with stock's prompt in every stage: what our loop costs, without the distinct prompts
        "one prompt": lambda steps: prospect(common.STAGE_PROMPTS[0], num_inference_steps=steps, generator=gen(),
                                             **kwargs),
    }
    common.interleaved({k: (lambda f=f: f(1)) for k, f in contenders.items()}, 1, device)  # warm-up
    texts, unet = [Probe(e, device) for e in common.text_encoders(pipe)], Probe(pipe.unet, device)
    counts: dict[str, list[Counts]] = {name: [] for name in contenders}

    def read(name: str) -> None:  # SDXL: both text encoders' calls, sequences and seconds summed
        unet_calls, _, unet_seconds = unet.take()
        counts[name].append(Counts(*map(sum, zip(*(t.take() for t in texts))), unet_calls, unet_seconds))

    times = common.interleaved({k: (lambda f=f: f(s.steps)) for k, f in contenders.items()}, s.repeats, device, read)
    for probe in (*texts, unet):
        probe.remove()
    _report(s, size, device, times, counts)
    print(f"\n({s.model}: {time.perf_counter() - began:.0f} s in all, model loading included)")


def _report(s: Setting, size: int, device: str, times: dict, counts: dict[str, list[Counts]]) -> None:
    med, spread = statistics.median, common.Spread.of
    stock = times["stock"]
    text = {k: [c.text_seconds for c in counts[k]] for k in counts}
    outside = {k: [w - c.text_seconds - c.unet_seconds for w, c in zip(times[k].wall, counts[k])] for k in counts}
    once = {k: counts[k][0] for k in counts}  # calls and rows are the same in every repeat
    names = list(times)

    def each(fn) -> tuple:
        return tuple(fn(k) for k in names)

    def ratio(fn) -> tuple:
        return ("",) + tuple(fn(k) for k in names[1:])

    def paired(k: str, drop_text: bool) -> str:
        values = [(p - tp * drop_text) / (q - tq * drop_text)
                  for p, q, tp, tq in zip(times[k].wall, stock.wall, text[k], text["stock"])]
        return spread(values).fmt(4)

    rows = [
        ("wall time per call, s: median [min-max]", *each(lambda k: spread(times[k].wall).fmt())),
        ("CPU time per call, s: median [min-max]", *each(lambda k: spread(times[k].cpu).fmt())),
        ("text-encoder calls per call", *each(lambda k: once[k].text_calls)),
        ("text-encoder sequences per call", *each(lambda k: once[k].text_rows)),
        ("text-encoder wall time, s (median)", *each(lambda k: f"{med(text[k]):.4f}")),
        ("text-encoder share of the call", *each(lambda k: common.percent(med(text[k]), med(times[k].wall)))),
        ("UNet calls per call", *each(lambda k: once[k].unet_calls)),
        ("UNet wall time, s (median)", *each(lambda k: f"{med([c.unet_seconds for c in counts[k]]):.4f}")),
        ("wall time outside text encoder and UNet, s (median)", *each(lambda k: f"{med(outside[k]):.4f}")),
        ("ratio to stock, wall (medians)", *ratio(lambda k: f"{med(times[k].wall) / med(stock.wall):.4f}")),
        ("ratio to stock, CPU time (medians)", *ratio(lambda k: f"{med(times[k].cpu) / med(stock.cpu):.4f}")),
        ("paired wall ratio: median [min-max]", *ratio(lambda k: paired(k, False))),
        ("paired wall ratio without text encoding", *ratio(lambda k: paired(k, True))),
    ]
    title = (f"generation: {s.model}, {size}x{size} px, {s.steps} DDIM steps, CFG {s.guidance}, batch {s.batch}, "
             f"{device}; ProSpect: 10 distinct stage prompts; one prompt: stock's prompt in every stage")
    common.print_table(title, ("figure", "stock diffusers", "ProSpect", "ProSpect, one prompt"), rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    common.setup(args)
    print(common.machine(args.device))
    print(f"dtype {args.dtype}; target: ratio <= 1.02")
    for s in common.settings(args, PRESETS, QUICK):
        run_setting(replace(s, repeats=args.repeats or s.repeats), args.device, common.DTYPES[args.dtype], args.seed)
    print(f"\n{common.load_average()} at the end")


if __name__ == "__main__":
    main()
