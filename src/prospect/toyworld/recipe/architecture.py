"""The embedded model's architecture: SD-format components, sized for a 2-core CPU.

32x32 RGB images -> a 2x autoencoder -> 16x16x4 latents (SD's 4 latent channels), a UNet with
four levels and cross-attention at 16x16, 8x8 and 4x4 (text must steer layout at high noise), and a 3-layer CLIP
text encoder over the world's own BPE vocabulary. v-prediction, as Stable Diffusion 2.x: with
epsilon prediction a tiny model learns almost no layout from text at high noise
(shared/reference/TOY_MODEL_TRIAL.md).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

TEXT_DIM = 128  # hidden size of the text encoder = UNet cross-attention dim = concept dim
LATENT_SIZE = 16
# Stable Diffusion's training schedule (same betas, same 1000 timesteps, so stage k covers the same
# t as on SD); build_schedulers rescales it to zero terminal SNR (Lin et al. 2024): with SD's
# schedule the last timestep still leaks the image, and the first model learned to take the
# object's position from the initial noise instead of from the text.
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
)


def build_vae() -> AutoencoderKL:
    """A 2x-downsampling KL autoencoder: 32x32x3 <-> 16x16x4."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
        mid_block_add_attention=False,  # global attention buys nothing on one-object scenes; halves the cost
    )


def build_unet() -> UNet2DConditionModel:
    """The denoiser over 16x16x4 latents: four levels down to 2x2, as SD's 64 -> 8, with text at 16, 8, 4.

    The 2x2 bottleneck is what lets the text place the object: there every position is a corner
    that the convolutions' zero padding tells apart. With three levels (down to 4x4) the first model
    drew the object wherever the noise put it, whatever the caption said.
    """
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96, 96, 96),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_text_encoder(vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    """A 3-layer CLIP text transformer over the world vocabulary."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(config)


def build_schedulers(zero_snr: bool = True) -> tuple[DDPMScheduler, DDIMScheduler]:
    """Training noise schedule and the default sampler (DDIM).

    With ``zero_snr`` the betas are rescaled so that t = 999 is pure noise, and the sampler starts
    there ("trailing" spacing); without it, SD's settings unchanged.
    """
    if zero_snr:
        train = DDPMScheduler(**SCHEDULE, clip_sample=False, rescale_betas_zero_snr=True)
        sample = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                               rescale_betas_zero_snr=True, timestep_spacing="trailing",
                               steps_offset=1)  # unused by "trailing"; 0 is a deprecated config
        return train, sample
    train = DDPMScheduler(**SCHEDULE, clip_sample=False)
    sample = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return train, sample
