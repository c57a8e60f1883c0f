"""The recipe that reproduces the embedded model from scratch: autoencoder, then UNet + text.

Run: ``python -m prospect.toyworld.recipe.train --work runs/toy --out src/prospect/toyworld/model``.
Every phase checkpoints atomically and resumes where it stopped (`--work` holds the state).
Per-step randomness is derived from (seed, step), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import world
from ...checkpoint import load_checkpoint, save_checkpoint
from . import architecture
from .tokenizer import write_tokenizer


@dataclass
class ToyTrainConfig:
    """Settings of the embedded model's training (defaults reproduce the shipped weights)."""

    seed: int = 0  # everything random derives from it
    vae_steps: int = 1200  # autoencoder optimisation steps
    vae_batch: int = 32  # renders per autoencoder step
    vae_lr: float = 2e-3  # AdamW learning rate of the autoencoder
    vae_kl_weight: float = 1e-6  # KL weight, as Stable Diffusion's autoencoder
    bank_size: int = 40000  # random scenes encoded once into latents for the UNet phase
    unet_steps: int = 2400  # UNet + text encoder optimisation steps
    unet_batch: int = 48  # latents per UNet step
    unet_lr: float = 1e-3  # AdamW peak learning rate (linear warm-up, cosine decay)
    warmup: int = 200  # warm-up steps of the UNet phase
    ema_decay: float = 0.999  # the shipped UNet/text encoder are the EMA weights
    p_uncond: float = 0.1  # caption dropout, so classifier-free guidance works
    p_omit: float = 0.15  # each attribute left out of a caption with this probability
    # Composable captions: below an attribute's timestep the image already shows it, and its word is
    # redrawn at random with probability p_swap, so the model learns to follow x_t there, not the text,
    # and a prompt switched late changes only what is still open (see the model card)
    p_swap: float = 0.0
    layout_open_from: int = 500  # position, shape and background words are redrawn at t below this
    colour_open_from: int = 300  # colour words are redrawn at t below this; texture words never
    zero_snr: bool = True  # rescale SD's betas to zero terminal SNR (see architecture.build_schedulers)
    high_t_fraction: float = 0.25  # share of each batch drawn from t >= high_t_from (layout is learned there)
    high_t_from: int = 800
    eval_every: int = 300  # steps between quick accuracy checks of the EMA model (0 = never)
    eval_captions: int = 40  # captions per quick check (DDIM 20 steps, CFG 5)
    checkpoint_every: int = 200  # steps between checkpoints (the most a kill can lose)
    max_minutes: float = 0.0  # stop (after a checkpoint) when this much time is used; 0 = no limit
    threads: int = 0  # torch threads; 0 = torch's default
    init_from: str = ""  # a model folder to continue from: its autoencoder is kept, UNet + text warm-start


def _batch_images(rng: np.random.Generator, n: int) -> torch.Tensor:
    scenes = [world.random_scene(rng) for _ in range(n)]
    arr = np.stack([world.render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] measured on the [0, 1] scale."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def train_vae(cfg: ToyTrainConfig, work: Path) -> "architecture.AutoencoderKL":
    """Phase 1: the autoencoder (MSE + L1 + a small KL), resumable; taken as is with ``init_from``."""
    if cfg.init_from:
        vae = architecture.AutoencoderKL.from_pretrained(cfg.init_from, subfolder="vae")
        return vae.eval().requires_grad_(False)
    ckpt = work / "vae.ckpt.safetensors"
    torch.manual_seed(cfg.seed)
    vae = architecture.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="autoencoder")
    for step in bar:
        rng = np.random.default_rng([cfg.seed, 1, step])
        x = _batch_images(rng, cfg.vae_batch)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{_psnr(rec.detach(), x):.1f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            save_checkpoint({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_bank(cfg: ToyTrainConfig, vae, work: Path) -> dict:
    """Render ``bank_size`` scenes once and keep their latents (posterior means) and attributes."""
    path = work / "bank.safetensors"
    if path.exists():
        return load_checkpoint(path)
    rng = np.random.default_rng([cfg.seed, 2])
    scenes = [world.random_scene(rng) for _ in range(cfg.bank_size)]
    latents = []
    for i in tqdm(range(0, len(scenes), 500), desc="encoding"):
        arr = np.stack([world.render(s) for s in scenes[i : i + 500]]).astype(np.float32) / 127.5 - 1.0
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
        latents.append(vae.encode(x).latent_dist.mean)
    lat = torch.cat(latents)
    # Stable Diffusion's scaling_factor, measured the same way; a continued UNet keeps its model's scale
    scale = float(vae.config.scaling_factor) if cfg.init_from else 1.0 / lat.std().item()
    codes = torch.tensor([[world.CHOICES[a].index(getattr(s, a)) for a in world.ATTRIBUTES] for s in scenes])
    # contiguous, as a reloaded bank is: the encoder's output has channels-last strides, and conv
    # kernels round differently on them, so a resumed run would not equal an uninterrupted one
    bank = {"latents": (lat * scale).contiguous(), "codes": codes, "scaling_factor": scale}
    save_checkpoint(bank, path)
    return bank


def settled(cfg: ToyTrainConfig, t: int) -> tuple[str, ...]:
    """The attributes whose word is redrawn at timestep ``t`` (the image decides them there)."""
    out = ("position", "shape", "background") if t < cfg.layout_open_from else ()
    return out + (("colour",) if t < cfg.colour_open_from else ())


def _captions(codes: torch.Tensor, t: torch.Tensor, rng: np.random.Generator, cfg: ToyTrainConfig) -> list[str]:
    out = []
    for row, step in zip(codes.tolist(), t.tolist()):
        scene = world.Scene(**{a: world.CHOICES[a][k] for a, k in zip(world.ATTRIBUTES, row)})
        if rng.random() < cfg.p_uncond:
            out.append("")
            continue
        if cfg.p_swap > 0:  # draws nothing when off, so the recipe without it is unchanged
            redrawn = {a: world.CHOICES[a][rng.integers(len(world.CHOICES[a]))]
                       for a in settled(cfg, step) if rng.random() < cfg.p_swap}
            scene = scene.with_(**redrawn)
        out.append(world.random_caption(scene, rng, cfg.p_omit))
    return out


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def train_unet(cfg: ToyTrainConfig, bank: dict, tokenizer, work: Path):
    """Phase 2: UNet + text encoder with v-prediction on SD's schedule, EMA kept."""
    ckpt = work / "unet.ckpt.safetensors"
    torch.manual_seed(cfg.seed + 1)
    unet = architecture.build_unet()
    text = architecture.build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    if cfg.init_from:
        unet.load_state_dict(architecture.UNet2DConditionModel.from_pretrained(cfg.init_from, subfolder="unet").state_dict())
        text.load_state_dict(architecture.CLIPTextModel.from_pretrained(cfg.init_from, subfolder="text_encoder").state_dict())
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    noise_sched, _ = architecture.build_schedulers(cfg.zero_snr)
    start = 0
    if ckpt.exists():
        s = load_checkpoint(ckpt)
        unet.load_state_dict(s["unet"]), text.load_state_dict(s["text"])
        ema_unet.load_state_dict(s["ema_unet"]), ema_text.load_state_dict(s["ema_text"])
        opt.load_state_dict(s["opt"])
        start = s["step"]
    latents, codes = bank["latents"], bank["codes"]
    t0 = time.time()
    bar = tqdm(range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps, desc="unet")
    for step in bar:
        rng = np.random.default_rng([cfg.seed, 3, step])
        gen = torch.Generator().manual_seed(cfg.seed * 104729 + step)
        idx = torch.from_numpy(rng.integers(0, len(latents), cfg.unet_batch))
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = _timesteps(cfg, len(x0), noise_sched.config.num_train_timesteps, gen)
        ids = tokenizer(_captions(codes[idx], t, rng, cfg), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        noisy = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        warm = min(1.0, (step + 1) / cfg.warmup)
        lr = cfg.unet_lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.unet_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        pred = unet(noisy, t, text(ids)[0]).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = cfg.ema_decay if cfg.init_from else min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text, decay)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        last = step + 1 == cfg.unet_steps
        out_of_time = cfg.max_minutes > 0 and (time.time() - t0) / 60 > cfg.max_minutes
        if (step + 1) % cfg.checkpoint_every == 0 or last or out_of_time:
            state = {"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                     "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": step + 1}
            save_checkpoint(state, ckpt)
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last) and step + 1 > start:
            scores = quick_accuracy(cfg, bank, tokenizer, ema_unet, ema_text)
            line = {"step": step + 1, "loss": round(loss.item(), 4), **scores}
            with open(work / "eval.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            tqdm.write("eval " + json.dumps(line))
        if out_of_time:
            print(f"stopping at step {step + 1}: --max-minutes reached (resume to continue)")
            break
    return ema_unet.eval(), ema_text.eval()


def _timesteps(cfg: ToyTrainConfig, n: int, total: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, with a share ``high_t_fraction`` redrawn from [high_t_from, total)."""
    t = torch.randint(0, total, (n,), generator=gen)
    high = torch.randint(cfg.high_t_from, total, (n,), generator=gen)
    pick = torch.rand(n, generator=gen) < cfg.high_t_fraction
    return torch.where(pick, high, t)


@torch.no_grad()
def quick_accuracy(cfg: ToyTrainConfig, bank: dict, tokenizer, unet, text) -> dict[str, float]:
    """Attribute accuracy of the current EMA model on a few fixed captions (a learning curve)."""
    from diffusers import StableDiffusionPipeline

    from ..reader import read_batch

    vae = bank["vae"]
    vae.register_to_config(scaling_factor=float(bank["scaling_factor"]))
    _, sampler = architecture.build_schedulers(cfg.zero_snr)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=sampler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng([cfg.seed, 5])
    scenes = [world.random_scene(rng) for _ in range(cfg.eval_captions)]
    out = pipe([world.caption(s) for s in scenes], num_inference_steps=20, guidance_scale=5.0, height=32,
               width=32, generator=torch.Generator().manual_seed(cfg.seed), output_type="np").images
    readings = read_batch(list((out * 255).round().astype(np.uint8)))
    return {a: round(float(np.mean([r.matches(s)[a] for r, s in zip(readings, scenes)])), 3)
            for a in world.ATTRIBUTES}


def export(vae, unet, text, tokenizer, scaling_factor: float, out: Path, cfg: ToyTrainConfig, minutes: float) -> None:
    """Save the components as a Stable Diffusion pipeline folder (safetensors)."""
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    _, sampler = architecture.build_schedulers(cfg.zero_snr)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sampler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the slow-tokenizer files, for older transformers
        shutil.copy(Path(tokenizer.name_or_path) / name, out / "tokenizer" / name)
    (out / "training.json").write_text(json.dumps(provenance(cfg, minutes), indent=2) + "\n")


def provenance(cfg: ToyTrainConfig, minutes: float) -> dict:
    """What ``training.json`` records: this run's settings and, for a continuation, its base model's record."""
    info = {"recipe": asdict(cfg), "train_minutes": round(minutes, 1), "torch": torch.__version__}
    base = Path(cfg.init_from) / "training.json" if cfg.init_from else None
    if base is not None and base.exists():
        info["continued_from"] = json.loads(base.read_text())
    return info


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the embedded toy-world model from scratch (resumable).")
    parser.add_argument("--work", type=Path, default=Path("runs/toy-model"), help="state folder (resume here)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the diffusers model folder")
    for name, value in asdict(ToyTrainConfig()).items():
        kind = _flag if isinstance(value, bool) else type(value)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    args = parser.parse_args(argv)
    cfg = ToyTrainConfig(**{k: getattr(args, k) for k in asdict(ToyTrainConfig())})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(args.work / "tokenizer"))
    vae = train_vae(cfg, args.work)
    bank = encode_bank(cfg, vae, args.work)
    bank["vae"] = vae
    unet, text = train_unet(cfg, bank, tokenizer, args.work)
    export(vae, unet, text, tokenizer, float(bank["scaling_factor"]), args.out, cfg, (time.time() - start) / 60)
    print(f"model written to {args.out}")


if __name__ == "__main__":
    main()
