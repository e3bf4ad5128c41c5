"""Plugin configs and recipes: frozen, validated, versioned, serializable, composable with ``+``.

A :class:`PluginConfig` subclass is a frozen dataclass that describes one technique; registering it with
:func:`register_config` gives it a TOML ``type`` name. A :class:`Recipe` is an ordered tuple of configs with a name
and a description. Named recipes ship as TOML files in ``dit_accel/recipes/``::

    name = "fora"
    description = "FORA: reuse attention and MLP outputs every 3 steps"

    [[plugins]]
    type = "fora"
    interval = 3

``"fora+int8"`` composes two recipes; two plugins of the same kind whose scopes (steps, layers) overlap are
rejected with a message that names both.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

RECIPE_FORMAT_VERSION = 1

_CONFIG_TYPES: dict[str, type["PluginConfig"]] = {}


def register_config(type_name: str):
    """Class decorator giving a :class:`PluginConfig` subclass its TOML ``type`` name."""

    def decorator(cls: type["PluginConfig"]) -> type["PluginConfig"]:
        existing = _CONFIG_TYPES.get(type_name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"plugin type {type_name!r} is already registered by {existing.__name__}")
        cls.type_name = type_name
        _CONFIG_TYPES[type_name] = cls
        return cls

    return decorator


def config_types() -> dict[str, type["PluginConfig"]]:
    """Registered plugin config classes by TOML type name."""
    _load_builtin_plugins()
    return dict(_CONFIG_TYPES)


@dataclass(frozen=True)
class PluginConfig:
    """Base of every plugin config.

    Args:
        version: config schema version (bumped when a field's meaning or a default changes; a file of an older
            version is carried forward by the config's :meth:`migrate` where it can be, else refused loudly).
        steps: ``(start, end)``: the plugin acts on steps ``start <= step < end`` only; ``None`` for all steps.
        layers: glob patterns over sub-layer names (``"transformer_blocks.*.attn"``, ``"single_transformer_blocks"``)
            restricting the plugin to those layers; ``None`` for all.
    """

    type_name: ClassVar[str] = "abstract"
    kind: ClassVar[str] = "schedule"
    current_version: ClassVar[int] = 1

    version: int = 1
    steps: tuple[int, int] | None = None
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.version != self.current_version:
            raise ValueError(
                f"{type(self).__name__}.version = {self.version!r} is not supported; this dit_accel reads version "
                f"{self.current_version}"
            )
        if self.steps is not None:
            steps = tuple(self.steps)
            if len(steps) != 2 or not all(isinstance(s, int) and s >= 0 for s in steps) or steps[0] >= steps[1]:
                raise ValueError(
                    f"{type(self).__name__}.steps = {self.steps!r} is invalid; allowed: None or (start, end) with "
                    "integers 0 <= start < end"
                )
            object.__setattr__(self, "steps", steps)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            if not layers or not all(isinstance(p, str) and p for p in layers):
                raise ValueError(
                    f"{type(self).__name__}.layers = {self.layers!r} is invalid; allowed: None or a non-empty list "
                    "of glob patterns such as 'transformer_blocks.*.attn'"
                )
            object.__setattr__(self, "layers", layers)
        self.validate()

    def validate(self) -> None:
        """Subclasses check their own fields here (see :func:`check_range`)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type_name}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """The dict form of a config written at an older ``version``, carried to the current one (fields it did
        not have take the values that reproduce its behaviour). The base class carries nothing: the version check
        then refuses the file loudly."""
        return data


def check_range(config: PluginConfig, name: str, low: float, high: float, *, integer: bool = False) -> None:
    """Raise ``ValueError`` naming the field, the value and the allowed range unless ``low <= value <= high``."""
    value = getattr(config, name)
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    )
    if not ok or not low <= value <= high:
        raise ValueError(f"{type(config).__name__}.{name} = {value!r} is out of range; allowed: {kind} in [{low}, {high}]")


def check_bool(config: PluginConfig, *names: str) -> None:
    """Raise ``ValueError`` naming the field and its value unless each of ``names`` is ``True`` or ``False``."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{type(config).__name__}.{name} = {value!r} is not allowed; allowed: true, false")


def check_choice(config: PluginConfig, name: str, choices: tuple) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{name} = {value!r} is not allowed; allowed: {', '.join(map(repr, choices))}")


def config_from_dict(data: dict[str, Any]) -> PluginConfig:
    """Build a config from its dict form (``{"type": "fora", "interval": 3}``)."""
    data = dict(data)
    type_name = data.pop("type", None)
    types = config_types()
    if type_name not in types:
        raise ValueError(f"unknown plugin type {type_name!r}; known types: {', '.join(sorted(types)) or '(none)'}")
    cls = types[type_name]
    allowed = cls.field_names()
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"plugin {type_name!r} has no field(s) {', '.join(unknown)}; its fields: {', '.join(allowed)}")
    for key in ("steps", "layers"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and 0 < version < cls.current_version:
        data = cls.migrate(data, version)
    return cls(**data)


def steps_disjoint(a: PluginConfig, b: PluginConfig) -> bool:
    """Whether two configs act on disjoint step ranges."""
    return a.steps is not None and b.steps is not None and (a.steps[1] <= b.steps[0] or b.steps[1] <= a.steps[0])


def _scopes_overlap(a: PluginConfig, b: PluginConfig) -> bool:
    if steps_disjoint(a, b):
        return False
    if a.layers is not None and b.layers is not None and not set(a.layers) & set(b.layers):
        return False  # disjoint patterns may still select the same layers: checked again at install time
    return True


def find_conflict(configs: tuple[PluginConfig, ...]) -> tuple[PluginConfig, PluginConfig] | None:
    """The first pair of configs of the same kind whose scopes overlap, if any."""
    for i, a in enumerate(configs):
        for b in configs[i + 1:]:
            if a.kind == b.kind and _scopes_overlap(a, b):
                return a, b
    return None


def conflict_message(a: PluginConfig, b: PluginConfig, where: str = "") -> str:
    return (
        f"plugins {a.type_name!r} and {b.type_name!r} conflict{where}: both are {a.kind} plugins acting on the same "
        "steps and layers. Keep one, or restrict them to disjoint ranges with steps=(start, end) / layers=[...]"
    )


@dataclass(frozen=True)
class Recipe:
    """An ordered set of plugin configs with a name and a one-line description.

    ``Recipe()`` (and the named recipe ``"none"``) installs the tracking machinery and changes nothing.
    """

    plugins: tuple[PluginConfig, ...] = ()
    name: str = "custom"
    description: str = ""

    def __post_init__(self) -> None:
        plugins = tuple(self.plugins)
        for plugin in plugins:
            if not isinstance(plugin, PluginConfig):
                raise TypeError(f"Recipe.plugins must hold PluginConfig instances, got {type(plugin).__name__}")
        conflict = find_conflict(plugins)
        if conflict:
            raise ValueError(conflict_message(*conflict, where=f" in recipe {self.name!r}"))
        object.__setattr__(self, "plugins", plugins)

    def __add__(self, other: "Recipe | str") -> "Recipe":
        other = load_recipe(other) if isinstance(other, str) else other
        if not isinstance(other, Recipe):
            return NotImplemented
        names = [n for n in (self.name, other.name) if n != "none"]
        return Recipe(
            plugins=self.plugins + other.plugins,
            name="+".join(names) or "none",
            description="; ".join(d for d in (self.description, other.description) if d and d != _NONE_DESCRIPTION),
        )

    def with_overrides(self, **overrides: Any) -> "Recipe":
        """Change plugin fields: ``interval=4`` sets the field of the one plugin that has it; ``fora__interval=4``
        names the plugin when several have the field."""
        plugins = list(self.plugins)
        for key, value in overrides.items():
            type_name, _, field_name = key.rpartition("__")
            candidates = [
                i for i, p in enumerate(plugins)
                if field_name in p.field_names() and (not type_name or p.type_name == type_name.replace("_", "-"))
            ]
            if not candidates:
                known = sorted({f"{p.type_name}: {', '.join(p.field_names())}" for p in plugins})
                raise ValueError(
                    f"override {key}={value!r} matches no plugin field of recipe {self.name!r}; "
                    f"fields: {'; '.join(known) or '(the recipe has no plugins)'}"
                )
            if len(candidates) > 1:
                names = ", ".join(plugins[i].type_name for i in candidates)
                raise ValueError(f"override {key!r} is ambiguous (plugins {names}); write <plugin>__{field_name}=...")
            index = candidates[0]
            if isinstance(value, list):
                value = tuple(value)
            plugins[index] = dataclasses.replace(plugins[index], **{field_name: value})
        return Recipe(plugins=tuple(plugins), name=self.name, description=self.description)

    # ------------------------------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECIPE_FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "plugins": [p.to_dict() for p in self.plugins],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        fmt = data.get("format", RECIPE_FORMAT_VERSION)
        if fmt != RECIPE_FORMAT_VERSION:
            raise ValueError(f"recipe format {fmt!r} is not supported; this dit_accel reads format {RECIPE_FORMAT_VERSION}")
        unknown = sorted(set(data) - {"format", "name", "description", "plugins"})
        if unknown:
            raise ValueError(f"unknown recipe key(s) {', '.join(unknown)}; allowed: format, name, description, plugins")
        plugins = data.get("plugins", [])
        if not isinstance(plugins, list):
            raise ValueError("recipe 'plugins' must be an array of tables ([[plugins]])")
        return cls(
            plugins=tuple(config_from_dict(p) for p in plugins),
            name=str(data.get("name", "custom")),
            description=str(data.get("description", "")),
        )

    def to_toml(self) -> str:
        data = self.to_dict()
        lines = [f"format = {data['format']}", f"name = {_toml_value(self.name)}",
                 f"description = {_toml_value(self.description)}"]
        for plugin in data["plugins"]:
            lines += ["", "[[plugins]]"] + [f"{k} = {_toml_value(v)}" for k, v in plugin.items()]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_toml())
        return path


def parse_value(text: str) -> Any:
    """A field value typed on a command line: ``true``/``false`` (also yes/no/on/off), ``none``, ints, floats,
    ``[a, b]`` lists of those, anything else a string (surrounding quotes dropped)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [parse_value(v) for v in text[1:-1].split(",") if v.strip()]
    low = text.lower()
    if low in {"true", "yes", "on", "false", "no", "off"}:
        return low in {"true", "yes", "on"}
    if low in {"none", "null"}:
        return None
    for kind in (int, float):
        try:
            return kind(low)
        except ValueError:
            continue
    return text.strip("'\"")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (a magcache calibration)
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    bare = key and all(c.isalnum() or c in "-_" for c in key) and key.isascii()
    return key if bare else _toml_value(str(key))


_NONE_DESCRIPTION = "No acceleration: installs the tracker and attention interception, changes nothing"


def _named_recipe_files() -> dict[str, Any]:
    folder = resources.files("dit_accel") / "recipes"
    return {entry.name[: -len(".toml")]: entry for entry in folder.iterdir() if entry.name.endswith(".toml")}


def list_recipes() -> list[Recipe]:
    """The named recipes shipped with dit_accel, sorted by name (``none`` first)."""
    files = _named_recipe_files()
    recipes = [_load_named(name, files) for name in files]
    return sorted(recipes, key=lambda r: (r.name != "none", r.name))


def _load_named(name: str, files: dict[str, Any]) -> Recipe:
    data = tomllib.loads(files[name].read_text())
    recipe = Recipe.from_dict(data)
    if recipe.name != name:
        raise ValueError(f"recipe file {name}.toml declares name {recipe.name!r}")
    return recipe


def load_recipe(recipe: "str | Path | Recipe" = "none", **overrides: Any) -> Recipe:
    """Resolve a recipe: a :class:`Recipe`, a name (``"fora"``), a composition (``"fora+int8"``) or a path to a
    ``.toml`` file; then apply ``overrides`` (see :meth:`Recipe.with_overrides`)."""
    _load_builtin_plugins()
    if isinstance(recipe, Recipe):
        resolved = recipe
    elif isinstance(recipe, Path) or (isinstance(recipe, str) and recipe.endswith(".toml")):
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"recipe file {str(path)!r} is not valid TOML: {error}") from None
        resolved = Recipe.from_dict(_resolve_paths(data, path.parent))
    elif isinstance(recipe, str):
        files = _named_recipe_files()
        parts = [part.strip() for part in recipe.split("+")]
        missing = [part for part in parts if part not in files]
        if missing or not parts:
            raise ValueError(
                f"unknown recipe {missing[0] if missing else recipe!r}; named recipes: {', '.join(sorted(files))} "
                "(compose with '+', or pass a path to a .toml file or a Recipe)"
            )
        resolved = _load_named(parts[0], files)
        for part in parts[1:]:
            resolved = resolved + _load_named(part, files)
    else:
        raise TypeError(f"recipe must be a name, a path to a .toml file or a Recipe, got {type(recipe).__name__}")
    return resolved.with_overrides(**overrides) if overrides else resolved


def _resolve_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative file paths in the fields a config names in ``path_fields`` (magcache's calibration file) are
    relative to the recipe file, not to the working directory."""
    types = config_types()
    plugins = []
    for plugin in data.get("plugins", []) if isinstance(data.get("plugins"), list) else []:
        cls = types.get(plugin.get("type")) if isinstance(plugin, dict) else None
        if cls is not None:
            plugin = dict(plugin)
            for name in getattr(cls, "path_fields", ()):
                value = plugin.get(name)
                if isinstance(value, str) and value and not Path(value).is_absolute():
                    plugin[name] = str(folder / value)
        plugins.append(plugin)
    return {**data, "plugins": plugins} if "plugins" in data else data


def _load_builtin_plugins() -> None:
    # Plugin modules register their configs on import; they are imported lazily to keep `import dit_accel` light.
    import dit_accel.plugins  # noqa: F401
