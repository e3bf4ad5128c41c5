"""The zoo's model configurations: the transformers, the class conditioner and the schedulers, shared by the
training script and the pipelines so that what is trained is exactly what is shipped."""

from __future__ import annotations

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

PATCH = 4  # 32 px / 4 = an 8x8 token grid
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


def dit_transformer(num_layers: int = 6, width: int = 128, heads: int = 4) -> DiTTransformer2DModel:
    """zoo:dit: adaLN-zero DiT in pixel space, class labels 0..9 plus the null class 10 for guidance."""
    return DiTTransformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=PATCH,
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


def ddpm_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**DDPM_CONFIG)


def ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**DDPM_CONFIG, timestep_spacing="trailing", set_alpha_to_one=True)


def mmdit_transformer(num_layers: int = 2, num_single_layers: int = 4, width: int = 128, heads: int = 4,
                      text_dim: int = 64) -> FluxTransformer2DModel:
    """zoo:mmdit: Flux architecture (dual- then single-stream blocks, RoPE) on packed 4x4 pixel patches."""
    head_dim = width // heads
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=3 * PATCH * PATCH,
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


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) -> (B, 64, 48): 4x4 pixel patches as tokens, row-major over the 8x8 grid."""
    batch = images.shape[0]
    patches = images.reshape(batch, 3, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, GRID * GRID, 3 * PATCH * PATCH)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    batch = tokens.shape[0]
    patches = tokens.reshape(batch, GRID, GRID, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, 3, IMAGE_SIZE, IMAGE_SIZE)


def image_ids(device=None) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float().to(device)


def text_ids(num_tokens: int, device=None) -> torch.Tensor:
    return torch.zeros(num_tokens, 3, device=device)
