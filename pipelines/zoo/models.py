"""The zoo's model configurations: the transformers, the class conditioner and the schedulers, shared by the
training script and the pipelines so that what is trained is exactly what is shipped."""

from __future__ import annotations

import math

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from dit_accel.pipelines.zoo.shapes import IMAGE_SIZE, NUM_CLASSES

PATCH = 4  # the shipped models: 32 px / 4 = an 8x8 token grid (patch 2 gives 16x16, for GPU-trained models)
GRID = IMAGE_SIZE // PATCH

# DDPM family for zoo:dit: v-prediction on a cosine schedule rescaled to zero terminal SNR, so DDIM with trailing
# spacing starts from pure noise.
DDPM_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    clip_sample=False,
)


def dit_transformer(num_layers: int = 6, width: int = 128, heads: int = 4, patch: int = PATCH
                    ) -> DiTTransformer2DModel:
    """zoo:dit: adaLN-zero DiT in pixel space, class labels 0..9 plus the null class 10 for guidance."""
    return DiTTransformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=patch,
        in_channels=3,
        out_channels=3,
        num_layers=num_layers,
        attention_head_dim=width // heads,
        num_attention_heads=heads,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        activation_fn="gelu-approximate",
        attention_bias=True,
    )


def flowdit_transformer(num_layers: int = 4, width: int = 96, heads: int = 4, patch: int = 2
                        ) -> DiTTransformer2DModel:
    """zoo:flowdit, the evaluation-only model: an adaLN-zero DiT like zoo:dit but trained with flow matching on a
    16x16 token grid (patch 2), 4 blocks of width 96; timestep input 1000 * sigma."""
    return dit_transformer(num_layers=num_layers, width=width, heads=heads, patch=patch)


def ddpm_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**DDPM_CONFIG)


def ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**DDPM_CONFIG, timestep_spacing="trailing", set_alpha_to_one=True)


def mmdit_transformer(num_layers: int = 2, num_single_layers: int = 4, width: int = 128, heads: int = 4,
                      text_dim: int = 64, patch: int = PATCH) -> FluxTransformer2DModel:
    """zoo:mmdit: Flux architecture (dual- then single-stream blocks, RoPE) on packed ``patch`` x ``patch`` pixel
    patches (the patch is read back from ``in_channels = 3 patch^2``, see :func:`patch_of`)."""
    head_dim = width // heads
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=3 * patch * patch,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=False,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


class ClassConditioner(ModelMixin, ConfigMixin):
    """Learned per-class text-like tokens and pooled vectors for zoo:mmdit; class ``num_classes`` is the empty
    (unconditional) prompt."""

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, num_tokens: int = 4, dim: int = 64) -> None:
        super().__init__()
        self.tokens = torch.nn.Parameter(torch.randn(num_classes + 1, num_tokens, dim) * 0.5)
        self.pooled = torch.nn.Parameter(torch.randn(num_classes + 1, dim) * 0.5)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[labels], self.pooled[labels]


def patch_of(transformer: torch.nn.Module) -> int:
    """The pixel patch side of a zoo transformer: DiT's ``patch_size``; for the Flux-architecture model, which
    takes packed patches, the ``p`` of ``in_channels = 3 p^2``."""
    config = transformer.config
    if config.in_channels == 3:
        return int(config.patch_size)
    return math.isqrt(config.in_channels // 3)


def pack(images: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """(B, 3, 32, 32) -> (B, (32/p)^2, 3 p^2): p x p pixel patches as tokens, row-major over the token grid."""
    batch, grid = images.shape[0], IMAGE_SIZE // patch
    patches = images.reshape(batch, 3, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, grid * grid, 3 * patch * patch)


def unpack(tokens: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    batch, grid = tokens.shape[0], IMAGE_SIZE // patch
    patches = tokens.reshape(batch, grid, grid, 3, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, 3, IMAGE_SIZE, IMAGE_SIZE)


def image_ids(device=None, patch: int = PATCH) -> torch.Tensor:
    grid = IMAGE_SIZE // patch
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float().to(device)


def text_ids(num_tokens: int, device=None) -> torch.Tensor:
    return torch.zeros(num_tokens, 3, device=device)
