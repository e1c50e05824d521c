"""Model-carried render settings: `video_settings.json` in a model folder, and where each value comes from.

A model folder may carry the DualParal settings it renders best with (steps, block, cat, cfg, flow_shift,
sampler, fps, size). The CLI, the API and the app take each setting from, in order: the user (a flag, an argument,
a field), the model's `video_settings.json`, the model itself (its scheduler's shift and class, an expert's canvas
size), and finally Wan2.1 T2V's published defaults (50 steps, CFG 5, shift 3, the UniPC sampler, 16 fps, 480x832)
with DualParal's block 8, context 4. The file is read as JSON alone, so a bad value is a one-line UsageError
before anything loads:

    {"steps": 10, "block": 4, "cat": 2, "cfg": 3.0, "flow_shift": 1.0, "sampler": "unipc", "fps": 16, "size": 16}

`size` is one number (square) or [height, width] in pixels. Every key is optional.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ddm import UsageError
from parallel_infer.config import SAMPLERS
from parallel_infer.loader import ModelInfo
from parallel_infer.render import VideoSettings

SETTINGS_FILE = "video_settings.json"
# Wan2.1 T2V 1.3B at 480p (its model card and diffusers' WanPipeline example), and DualParal's block/context.
WAN_DEFAULTS = {"steps": 50, "block": 8, "cat": 4, "cfg": 5.0, "flow_shift": 3.0, "sampler": "unipc", "fps": 16}
SCHEDULER_SAMPLERS = {"UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "euler"}
WAN_SOURCE = "Wan2.1 default"
_INTEGERS = ("steps", "block", "cat", "fps")
_NUMBERS = ("cfg", "flow_shift")
KEYS = (*_INTEGERS, *_NUMBERS, "sampler", "size")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_model_settings(model_dir: str | Path) -> dict:
    """The checked contents of `model_dir/video_settings.json` ({} when there is none); size as (height, width)."""
    path = Path(model_dir) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object with keys among {', '.join(KEYS)}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r}; keys are {', '.join(KEYS)}")
    for key, value in data.items():
        if key in _INTEGERS and not _positive_int(value):
            raise UsageError(f"{path}: {key} must be a positive integer, got {value!r}")
        if key in _NUMBERS and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise UsageError(f"{path}: {key} must be a number > 0, got {value!r}")
    if "sampler" in data and data["sampler"] not in SAMPLERS:
        raise UsageError(f"{path}: sampler must be one of {', '.join(SAMPLERS)}, got {data['sampler']!r}")
    if "cat" in data and data["cat"] >= data.get("block", WAN_DEFAULTS["block"]):
        raise UsageError(f"{path}: cat {data['cat']} must be smaller than block {data.get('block', WAN_DEFAULTS['block'])}")
    if "size" in data:
        size = data["size"]
        size = [size, size] if _positive_int(size) else size
        if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(v) for v in size)):
            raise UsageError(f"{path}: size must be a positive integer or [height, width], got {data['size']!r}")
        data["size"] = tuple(size)
    return data


def resolve_settings(info: ModelInfo, settings: VideoSettings) -> tuple[VideoSettings, dict[str, str]]:
    """`settings` with every unset (None) value filled in, and {setting: where its value came from}."""
    carried = read_model_settings(info.path)
    carried_from = str(Path(info.path) / SETTINGS_FILE)
    values, sources = {}, {}
    for key, fallback in WAN_DEFAULTS.items():
        given = getattr(settings, key)
        if given is not None:
            values[key], sources[key] = given, "given"
        elif key in carried:
            values[key], sources[key] = carried[key], carried_from
        elif key == "flow_shift" and info.flow_shift is not None:
            values[key], sources[key] = info.flow_shift, _model_source(info, "flow_shift")
        elif key == "sampler" and (info.scheduler or {}).get("_class_name") in SCHEDULER_SAMPLERS:
            values[key], sources[key] = SCHEDULER_SAMPLERS[info.scheduler["_class_name"]], _model_source(info, key)
        else:
            values[key], sources[key] = fallback, WAN_SOURCE
    for key, index in (("height", 0), ("width", 1)):
        given = getattr(settings, key)
        if given is not None:
            values[key], sources[key] = given, "given"
        elif "size" in carried:
            values[key], sources[key] = carried["size"][index], carried_from
        else:
            values[key], sources[key] = info.size[index], _model_source(info, "size")
    return replace(settings, **values), sources


def _model_source(info: ModelInfo, key: str) -> str:
    if info.kind == "expert":
        return f"{info.path / 'expert.json'} ({'canvas' if key == 'size' else 'training flow shift'})"
    if key == "flow_shift" and info.scheduler is not None and (info.scheduler.get("shift") or info.scheduler.get("flow_shift")):
        return str(info.path / "scheduler" / "scheduler_config.json")
    if key == "sampler" and info.scheduler is not None:
        return str(info.path / "scheduler" / "scheduler_config.json")
    return WAN_SOURCE


def describe_sources(settings: VideoSettings, sources: dict[str, str]) -> str:
    """One line per source: 'steps 10, block 4 (from DIR/video_settings.json)'."""
    by_source: dict[str, list[str]] = {}
    for key, source in sources.items():
        label = key.replace("_", " ")
        by_source.setdefault(source, []).append(f"{label} {getattr(settings, key)}")
    return "\n".join(f"settings {', '.join(items)} ({'as given' if src == 'given' else 'from ' + src})"
                     for src, items in by_source.items())


def prompt_hints(info: ModelInfo) -> str:
    """What prompts a model understands, for a UI: its vocabulary, its precomputed prompts, or free text."""
    if info.vocabulary is not None:
        return f"words this model knows: {' '.join(info.vocabulary)}"
    if info.known_prompts is not None:
        shown = [p for p in info.known_prompts if p][:20]
        more = len([p for p in info.known_prompts if p]) - len(shown)
        return "prompts with precomputed embeddings: " + "; ".join(shown) + (f" (and {more} more)" if more > 0 else "")
    return "free text (UMT5 text encoder)"
