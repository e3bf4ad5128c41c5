"""Imports the built-in plugin modules so that their configs and plugins register themselves.

Each technique lives in its own module under ``dit_accel/caching/`` or ``dit_accel/attention/`` and registers its
config (``@register_config``) and plugin (``@register_plugin``) on import; list new modules here.
"""

import importlib

BUILTIN_PLUGIN_MODULES: tuple[str, ...] = (
    "dit_accel.caching.fora",
    "dit_accel.caching.taylorseer",
    "dit_accel.caching.first_block",
    "dit_accel.caching.delta_dit",
    "dit_accel.caching.cfg_share",
    "dit_accel.caching.cfg_cache",
    "dit_accel.caching.toca",
    "dit_accel.caching.magcache",
    "dit_accel.caching.speca",
    "dit_accel.caching.clusca",
    "dit_accel.caching.freqca",
    "dit_accel.attention.todo",
    "dit_accel.attention.proxy",
    "dit_accel.attention.hilbert",
    "dit_accel.attention.window_residual",
    "dit_accel.attention.gna",
    "dit_accel.attention.svg2",
    "dit_accel.attention.psa",
    "dit_accel.attention.int8",
    "dit_accel.parallel.patch",
)

for _module in BUILTIN_PLUGIN_MODULES:
    importlib.import_module(_module)
