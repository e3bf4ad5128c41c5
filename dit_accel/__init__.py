"""dit_accel: training-free acceleration for Hugging Face Diffusers diffusion-transformer pipelines.

    from dit_accel import accelerate_dit, remove_acceleration
    handle = accelerate_dit(pipe, recipe="none")
    image = pipe(...).images[0]
    print(handle.summary())
    remove_acceleration(pipe)
"""

from dit_accel.api import AccelerationHandle, IdlePluginWarning, accelerate_dit, get_handle, remove_acceleration
from dit_accel.recipe import PluginConfig, Recipe, list_recipes, load_recipe

__version__ = "0.1.0"

__all__ = [
    "AccelerationHandle",
    "IdlePluginWarning",
    "PluginConfig",
    "Recipe",
    "accelerate_dit",
    "get_handle",
    "list_recipes",
    "load_recipe",
    "remove_acceleration",
    "__version__",
]
