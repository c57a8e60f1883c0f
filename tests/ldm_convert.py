"""Test-only converter: a diffusers Stable Diffusion pipeline -> one state dict in the original
CompVis/LDM single-file key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*``), the inverse of what ``from_single_file`` reads.

Written for any block count / ``layers_per_block`` (the tiny test models are not SD-sized):
the index arithmetic follows the LDM UNet, where every down level holds ``layers_per_block``
(resnet[, attention]) entries then one downsampler, and every up level ``layers_per_block + 1``
entries, the last carrying the upsampler.
"""

from __future__ import annotations

import torch

_RESNET = (  # diffusers -> LDM names inside one resnet block of the UNet
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_UNET_TOP = (
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),  # SDXL's text-and-size embedding
    ("add_embedding.linear_2.", "label_emb.0.2."),
)


def _rename(rest: str, table) -> str:
    for new, old in table:
        if rest.startswith(new):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    per = layers_per_block + 1
    up_has_attn = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.* -> input_blocks.N.0.op.*
                new = f"input_blocks.{per * (i + 1)}.0.op." + ".".join(parts[5:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                slot = "0." + _rename(rest, _RESNET) if kind == "resnets" else "1." + rest
                new = f"input_blocks.{per * i + j + 1}.{slot}"
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv.* -> output_blocks.N.{1|2}.conv.*
                slot = 2 if i in up_has_attn else 1
                new = f"output_blocks.{per * i + layers_per_block}.{slot}." + ".".join(parts[4:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                slot = "0." + _rename(rest, _RESNET) if kind == "resnets" else "1." + rest
                new = f"output_blocks.{per * i + j}.{slot}"
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            if parts[1] == "resnets":
                new = f"middle_block.{2 * j}." + _rename(rest, _RESNET)
            else:
                new = "middle_block.1." + rest
        else:
            new = _rename(key, _UNET_TOP)
            if new == key:
                raise KeyError(f"no LDM name for UNet weight {key}")
        out["model.diffusion_model." + new] = value
    return out


_VAE_TOP = (("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out."))
_VAE_ATTN = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]  # encoder / decoder / quant_conv / post_quant_conv
        if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
            i, kind, j, rest = int(parts[2]), parts[3], parts[4], ".".join(parts[5:])
            level = i if side == "encoder" else num_blocks - 1 - i  # LDM numbers decoder levels bottom-up
            name = "down" if side == "encoder" else "up"
            if kind == "resnets":
                new = f"{side}.{name}.{level}.block.{j}." + rest.replace("conv_shortcut", "nin_shortcut")
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{side}.{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}." + rest
        elif len(parts) > 2 and parts[1] == "mid_block":
            kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"{side}.mid.block_{j + 1}." + rest.replace("conv_shortcut", "nin_shortcut")
            else:
                new = f"{side}.mid.attn_1." + _rename(rest, _VAE_ATTN)
                if value.ndim == 2:  # LDM's attention uses 1x1 convolutions
                    value = value[:, :, None, None]
        else:
            new = _rename(key, _VAE_TOP)
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str = "cond_stage_model.transformer.") -> dict[str, torch.Tensor]:
    """SD 1.x: the HF CLIPTextModel under ``cond_stage_model.transformer.text_model.`` (SDXL: its first embedder)."""
    out = {}
    for key, value in state.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    ids = prefix + "text_model.embeddings.position_ids"
    if ids not in out:  # SD 1.x files carry this buffer; newer transformers do not save it
        out[ids] = torch.arange(out[ids.replace("position_ids", "position_embedding.weight")].shape[0])[None]
    return out


def clip_to_open_clip(state: dict[str, torch.Tensor], prefix: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """SD 2.x: the text encoder in OpenCLIP's layout under ``cond_stage_model.model.``; SDXL's second embedder
    (a CLIPTextModelWithProjection) carries its projection, transposed as OpenCLIP multiplies by it."""
    projection = state.pop("text_projection.weight", None)
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    width = state["embeddings.token_embedding.weight"].shape[1]
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
        prefix + "text_projection": torch.randn(width, width) if projection is None else projection.T,  # SD 2: unused
        prefix + "logit_scale": torch.tensor(4.6052),
    }
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for n in sorted(layers):
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out


def pipeline_to_ldm(pipe, open_clip: bool = False) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict, with the extra buffers real files carry."""
    state = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block))
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    text = pipe.text_encoder.state_dict()
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: both encoders under conditioner.embedders
        state.update(clip_to_ldm(text, "conditioner.embedders.0.transformer."))
        state.update(clip_to_open_clip(dict(pipe.text_encoder_2.state_dict()), "conditioner.embedders.1.model."))
    else:
        state.update(clip_to_open_clip(text) if open_clip else clip_to_ldm(text))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # LatentDiffusion's schedule buffers
    state["betas"] = betas
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}
