"""`ddm train --init-from EXPERT`: start a run from an expert's EMA weights instead of a random init (a fine-tune).

Only the weights come from the expert: the optimizer, the learning-rate schedule, the EMA and the step count start
fresh, and the data is this run's manifest. The architecture must be the one this run builds (same modality,
preset and module configs); a Wan video expert may move to another canvas or clip length, since its weights do not
depend on them. The run's config records the SHA-256 of the weight files, so a resume must name the same weights,
and expert.json also records where they came from.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ddm import UsageError

WEIGHTS = "diffusion_pytorch_model.safetensors"
EXTRA_MODULES = ("prompt_encoder",)  # trainable modules a modality saves in a sub-folder beside the denoiser


class InitWeights:
    """The EMA weights of expert `path` per child module of the training network, checked against their recorded
    SHA-256 before they are read."""

    def __init__(self, path: Path, modality: str):
        from safetensors.torch import load_file

        from ddm.io import read_owner, sha256_file, verify_owned
        from ddm.models.experts import load_expert, read_expert_meta

        self.path = Path(path)
        if not (self.path / "expert.json").is_file():
            raise UsageError(f"--init-from {path}: not an expert folder (no expert.json)")
        meta = read_expert_meta(self.path)
        if meta.get("modality", "image") != modality:
            raise UsageError(f"--init-from {path}: a {meta.get('modality', 'image')} expert cannot start a --modality {modality} run")
        denoiser, _ = load_expert(self.path)  # checks the files against the SHA-256 that expert.json lists
        self.modules = {"denoiser": (dict(denoiser.config), denoiser.state_dict())}
        # the checked digests, hashed again only where none was recorded
        self.digests = {WEIGHTS: meta.get("files", {}).get(WEIGHTS) or sha256_file(self.path / WEIGHTS)}
        for name in EXTRA_MODULES:
            if meta.get(name):
                folder = self.path / meta[name]
                verify_owned(folder, name.replace("_", " "))
                self.modules[name] = (json.loads((folder / "config.json").read_text()), load_file(folder / WEIGHTS))
                recorded = (read_owner(folder) or {}).get("files") or {}
                self.digests[f"{meta[name]}/{WEIGHTS}"] = recorded.get(WEIGHTS) or sha256_file(folder / WEIGHTS)
        self.step = meta.get("step")

    def provenance(self) -> dict:
        """What expert.json records: the folder, the expert's step, and the SHA-256 of the files read."""
        return {"path": str(self.path.resolve()), "step": self.step, "files": self.digests}

    def load_into(self, net: nn.Module) -> None:
        """Copy the weights into the freshly built `net`; UsageError naming the first difference in architecture."""
        trained = {name for name, module in net.named_children() if next(module.parameters(), None) is not None}
        if set(self.modules) != trained:
            raise UsageError(f"--init-from {self.path}: it has the modules {sorted(self.modules)}, this run trains {sorted(trained)}")
        for name, (config, state) in self.modules.items():
            module = getattr(net, name)
            ours = json.loads(json.dumps(dict(module.config)))  # tuples as the config.json lists
            for key in sorted(set(ours) | set(config)):
                if not key.startswith("_") and ours.get(key) != config.get(key):
                    raise UsageError(f"--init-from {self.path}: its {name} has {key}={config.get(key)!r}, this run builds "
                                     f"{key}={ours.get(key)!r} (give the --preset it was trained with)")
            own = module.state_dict()
            for key in sorted(set(own) | set(state)):
                if key not in own or key not in state or own[key].shape != state[key].shape:
                    raise UsageError(f"--init-from {self.path}: {name}.{key} has shape {_shape(state, key)} there, "
                                     f"{_shape(own, key)} in this run")
            module.load_state_dict(state)


def _shape(state: dict[str, torch.Tensor], key: str) -> str:
    return str(tuple(state[key].shape)) if key in state else "(absent)"
