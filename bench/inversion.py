"""Inversion step cost: ``prospect.inversion.invert`` vs the irreducible work of a step, in one process.

The irreducible work of one step is the text encoder forward + backward (to its input embeddings)
over the step's distinct stage prompts and the UNet forward + backward to its text input, with
every weight frozen, at the same batch size and resolution, from fixed inputs. ``invert``'s step
time comes from its ``on_step`` callback (step 0, which carries the setup, is not counted). The
two alternate (invert, irreducible, irreducible, invert, ...) after a warm-up. Also reported:
peak memory (CPU: peak resident set; CUDA: allocator peak), samples/s, model-FLOP utilisation and
what each speed lever does to the irreducible step. Usage (from the repository root):

    python bench/inversion.py            # embedded toy model and random-weight SD 1.5 at 512 px
    python bench/inversion.py --quick    # smoke run, under a minute
    python bench/inversion.py --model sd15 --device cuda --dtype bf16 --peak-tflops 989 --batch 8
    python bench/inversion.py --model sdxl   # random-weight SDXL base at 256 px (about 16 GB of memory)

On SDXL the irreducible text work is both encoders (through the pipeline's ``encode_prompt``, as
``invert`` does) and the UNet also takes the pooled embedding and the size conditioning.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common
from prospect.concept import model_family
from prospect.inversion import InversionConfig, invert

NOMINAL_GFLOP = (803, 803, 26)  # per sample at 512 px, SD 1.5: UNet forward, UNet backward to input, text encoder


@dataclass
class Setting:
    """One benchmarked configuration."""

    model: str  # 'toy', 'sd15', 'sdxl' or a folder
    size: int | None  # pixels; None = the model's default
    batch: int  # samples per step
    steps: int  # invert steps per call; step 0 carries the setup and is not timed
    rounds: int  # invert calls (each paired with steps - 1 irreducible steps)
    levers: bool  # measure the speed levers (on a CPU at 512 px they take longer than the rest)
    lever_iters: int  # timed irreducible steps per lever and round
    lever_rounds: int = 2


PRESETS = {
    "toy": Setting("toy", None, 10, 8, 4, True, 3),
    "sd15": Setting("sd15", 512, 1, 3, 2, False, 1, lever_rounds=1),
    "sdxl": Setting("sdxl", 256, 1, 3, 2, False, 1, lever_rounds=1),  # not in the default run
}
QUICK = Setting("toy", None, 4, 3, 1, True, 1, lever_rounds=1)


class Irreducible:
    """The work no inversion step can avoid, on fixed inputs: text encoder and UNet forward + backward
    to their inputs (the token embeddings, the text states), no weight gradients."""

    def __init__(self, pipe, batch: int, size: int, num_stages: int, device: str, seed: int):
        gen = torch.Generator().manual_seed(seed)
        unique = min(batch, num_stages)  # a stratified step of `batch` samples covers this many stages
        self.prompts = [common.STAGE_PROMPTS[k % len(common.STAGE_PROMPTS)] for k in range(unique)]  # padded: same cost
        tok = pipe.tokenizer
        self.ids = tok(self.prompts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                       return_tensors="pt").input_ids.to(device)
        self.pick = (torch.arange(batch) % unique).to(device)
        side = size // pipe.vae_scale_factor
        shape = (batch, pipe.unet.config.in_channels, side, side)
        dtype = pipe.unet.dtype
        self.noisy = torch.randn(shape, generator=gen).to(device, dtype)
        self.noise = torch.randn(shape, generator=gen).to(device, dtype)
        self.t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
        self.pipe, self.unet, self.text_encoder, self.device = pipe, pipe.unet, pipe.text_encoder, device
        self.xl = model_family(pipe) == "sdxl"
        if self.xl:  # SDXL's size conditioning: original size, crop, target size
            self.time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=dtype, device=device)
        self.autocast = (torch.autocast("cuda", dtype=dtype) if device.startswith("cuda") and dtype != torch.float32
                         else contextlib.nullcontext())

    def __call__(self) -> None:
        leaf = lambda module, args, out: out.detach().requires_grad_()  # noqa: E731  (the gradient stops here)
        handles = [e.get_input_embeddings().register_forward_hook(leaf) for e in common.text_encoders(self.pipe)]
        try:
            with self.autocast:
                if self.xl:
                    states, _, pooled, _ = self.pipe.encode_prompt(self.prompts, device=self.device,
                                                                   do_classifier_free_guidance=False)
                    extra = {"added_cond_kwargs": {"text_embeds": pooled[self.pick], "time_ids": self.time_ids}}
                else:
                    states, extra = self.text_encoder(self.ids)[0], {}
                pred = self.unet(self.noisy, self.t, encoder_hidden_states=states[self.pick], **extra).sample
        finally:
            for handle in handles:
                handle.remove()
        F.mse_loss(pred.float(), self.noise.float()).backward()


def count_flops(fn) -> float:
    """Model FLOPs of one call of ``fn`` (matmuls, convolutions, attention; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    cpu_attention = {  # PyTorch counts the CUDA attention kernels but not the CPU one
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return float(counter.get_total_flops())


def timed_invert(pipe, images, cfg: InversionConfig, device: str) -> tuple[common.Times, float, float]:
    """Times of steps 1.. of one invert call, its setup seconds (estimated), and its peak memory (MiB)."""
    marks: list[tuple[float, float]] = []
    memory = common.PeakMemory(device)

    def on_step(log) -> None:
        common.sync(device)
        if not marks:
            memory.start()  # after step 0: the setup's transient memory (latent caching) is not counted
        marks.append(common.now())

    start = time.perf_counter()
    invert(pipe, images, cfg, on_step=on_step, progress=False)
    steps = common.Times()
    for a, b in zip(marks, marks[1:]):
        steps.add(a, b)
    return steps, marks[0][0] - start - statistics.median(steps.wall), memory.peak_mb()


def timed_steps(fn, n: int, device: str) -> tuple[common.Times, float]:
    """Times of n calls of fn and the peak memory above the level before them (MiB)."""
    memory = common.PeakMemory(device)
    memory.start()
    times = common.Times()
    for _ in range(n):
        times.add(*common.timed(fn, device))
    return times, memory.peak_mb()


def reference_images(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def mixed_precision(device: str, dtype: torch.dtype) -> str:
    if not device.startswith("cuda"):
        return "no"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def run_setting(s: Setting, args) -> None:
    device, dtype = args.device, common.DTYPES[args.dtype]
    began = time.perf_counter()
    pipe = common.load_model(s.model, device, dtype)
    size = s.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    cfg = InversionConfig(steps=s.steps, batch_size=s.batch, resolution=size, checkpoint_every=0, seed=args.seed,
                          mixed_precision=mixed_precision(device, dtype))
    images = reference_images(1, size, args.seed)
    for part in (pipe.unet, pipe.vae, *common.text_encoders(pipe)):  # as invert does; also before its first call
        part.requires_grad_(False)
    irreducible = Irreducible(pipe, s.batch, size, cfg.num_stages, device, args.seed)
    flops = count_flops(irreducible)  # also the irreducible step's warm-up
    got = {"invert": common.Times(), "irreducible": common.Times(), "invert memory": [], "irreducible memory": [],
           "setup": []}
    for r in range(s.rounds):
        for part in ("invert", "irreducible") if r % 2 == 0 else ("irreducible", "invert"):
            if part == "invert":
                steps, setup, peak = timed_invert(pipe, images, replace(cfg, seed=args.seed + r), device)
                got["setup"].append(setup)
            else:
                steps, peak = timed_steps(irreducible, s.steps - 1, device)
            got[part].extend(steps)
            got[part + " memory"].append(peak)
    _report(s, size, args, pipe, flops, got)
    if s.levers:
        _report_levers(s, size, args, pipe, irreducible)
    else:
        print("\nspeed levers: not measured for this setting (add --levers)")
    print(f"\n({s.model}: {time.perf_counter() - began:.0f} s in all, model loading included)")


def _is_sd15_at_512(pipe, size: int) -> bool:
    cfg = pipe.unet.config
    return size == 512 and tuple(cfg.block_out_channels) == (320, 640, 1280, 1280) and cfg.cross_attention_dim == 768


def _report(s: Setting, size: int, args, pipe, flops: float, got: dict) -> None:
    med, spread = statistics.median, common.Spread.of
    inv, irr = got["invert"], got["irreducible"]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    def mfu(seconds: float, work: float) -> str:
        return f"{100 * work / seconds / peak:.1f}%" if peak else "n/a (give --peak-tflops)"

    nominal = sum(NOMINAL_GFLOP) * 1e9 * s.batch if _is_sd15_at_512(pipe, size) else None
    rows = [("wall time per step, s: median [min-max]", spread(inv.wall).fmt(4), spread(irr.wall).fmt(4))]
    if not args.device.startswith("cuda"):  # on a GPU the CPU time is mostly waiting
        rows.append(("CPU time per step, s: median [min-max]", spread(inv.cpu).fmt(4), spread(irr.cpu).fmt(4)))
    rows += [
        ("samples/s", f"{s.batch / med(inv.wall):.2f}", f"{s.batch / med(irr.wall):.2f}"),
        ("peak memory above resting, MiB: median [min-max]",
         spread(got["invert memory"]).fmt(0), spread(got["irreducible memory"]).fmt(0)),
        ("model FLOPs per step (counted), GFLOP", "", f"{flops / 1e9:.2f}"),
        ("MFU, counted FLOPs", mfu(med(inv.wall), flops), mfu(med(irr.wall), flops)),
        ("MFU, nominal 1632 GFLOP/sample (SD 1.5, 512 px)", *((mfu(med(inv.wall), nominal), mfu(med(irr.wall), nominal))
                                                              if nominal else ("n/a (not SD 1.5 at 512 px)", ""))),
        ("invert setup per call (latent caching etc.), s", f"{med(got['setup']):.3f}", ""),
        ("step overhead (invert - irreducible), wall s", f"{med(inv.wall) - med(irr.wall):.4f}", ""),
        ("ratio invert/irreducible, wall (medians)", f"{med(inv.wall) / med(irr.wall):.4f}", ""),
    ]
    if not args.device.startswith("cuda"):
        rows.append(("ratio invert/irreducible, CPU time (medians)", f"{med(inv.cpu) / med(irr.cpu):.4f}", ""))
    title = (f"inversion: {s.model}, {size}x{size} px, batch {s.batch} (distinct stage prompts per step: "
             f"{min(s.batch, 10)}), {args.device} {args.dtype}, target ratio <= 1.15")
    common.print_table(title, ("figure", "invert", "irreducible"), rows)
    processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    print(f"\nUNet attention processors: {', '.join(processors)}; text encoder attention: "
          f"{getattr(pipe.text_encoder.config, '_attn_implementation', 'unknown')}")


@contextlib.contextmanager
def _attention(unet, processor):
    saved = unet.attn_processors
    unet.set_attn_processor(processor)
    try:
        yield
    finally:
        unet.set_attn_processor(saved)


@contextlib.contextmanager
def _channels_last(unet):
    unet.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        unet.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _weight_grads(*modules):
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def _report_levers(s: Setting, size: int, args, pipe, irreducible: Irreducible) -> None:
    """Each lever's irreducible step time, in blocks (one warm-up step, then lever_iters timed) per round."""
    from diffusers.models.attention_processor import AttnProcessor

    default = "default: SDPA attention, contiguous, frozen weights"
    variants = {
        default: contextlib.nullcontext,
        "classic attention (AttnProcessor, no SDPA)": lambda: _attention(pipe.unet, AttnProcessor()),
        "channels_last UNet": lambda: _channels_last(pipe.unet),
        "weight gradients computed (not frozen)": lambda: _weight_grads(pipe.unet, pipe.text_encoder),
    }
    times = {name: common.Times() for name in variants}
    for r in range(s.lever_rounds):
        for name in variants if r % 2 == 0 else list(variants)[::-1]:
            with variants[name]():
                irreducible()  # warm-up: a new memory format or kernel choice
                times[name].extend(timed_steps(irreducible, s.lever_iters, args.device)[0])
    times["VAE encode of the batch (added per step without cached latents)"] = _vae_times(pipe, s.batch, size, args)
    if args.compile:
        times.update(_compile_times(s, args, irreducible))
    med, base, on_cpu = statistics.median, times[default], not args.device.startswith("cuda")
    rows = []
    for name, t in times.items():
        row = (name, common.Spread.of(t.wall).fmt(4), f"{med(t.wall) / med(base.wall):.3f}x")
        rows.append(row + (f"{med(t.cpu):.4f}", f"{med(t.cpu) / med(base.cpu):.3f}x") if on_cpu else row)
    if not args.compile:
        rows.append(("torch.compile(unet)", "not measured (run with --compile)", "") + ("", "") * on_cpu)
    header = ("lever", "wall s: median [min-max]", "wall vs default") + ("CPU s: median", "CPU vs default") * on_cpu
    title = f"speed levers on the irreducible step: {s.model}, {size}x{size} px, batch {s.batch}, {args.device}"
    common.print_table(title, header, rows)


@torch.no_grad()
def _vae_times(pipe, batch: int, size: int, args) -> common.Times:
    """What caching the latents saves: one VAE encode of a batch, as an uncached loop would do each step."""
    pixels = torch.rand(batch, 3, size, size).to(args.device, pipe.vae.dtype) * 2 - 1
    encode = lambda: pipe.vae.encode(pixels)  # noqa: E731
    encode()
    return timed_steps(encode, 2, args.device)[0]


def _compile_times(s: Setting, args, irreducible: Irreducible) -> dict[str, common.Times]:
    eager = irreducible.unet
    irreducible.unet = torch.compile(eager)
    try:
        first = timed_steps(irreducible, 1, args.device)[0].wall[0]  # compiles
        irreducible()
        times = timed_steps(irreducible, max(s.lever_iters, 2), args.device)[0]
    finally:
        irreducible.unet = eager
    return {f"torch.compile(unet) (first step {first:.1f} s, compiling)": times}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense TFLOP/s at --dtype "
                        "(H100 SXM bf16: 989), for model-FLOP utilisation")
    parser.add_argument("--levers", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the speed levers (default: on for the toy model and on a GPU)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile(unet) (slow to compile)")
    args = parser.parse_args(argv)
    common.setup(args)
    print(common.machine(args.device))
    for s in common.settings(args, PRESETS, QUICK):
        levers = (s.levers or args.device.startswith("cuda")) if args.levers is None else args.levers
        run_setting(replace(s, steps=max(2, s.steps), rounds=args.repeats or s.rounds, levers=levers), args)
    print(f"\n{common.load_average()} at the end")


if __name__ == "__main__":
    main()
