"""The ensemble: router + any subset of experts, seen by a sampler as ONE diffusers DiT.

v(x_t, t) = sum_k w_k(x_t, t) v_k(x_t, t), w = strategy(softmax(r(x_t, t)) over the experts present).
Routing is per sample: each expert runs only on the rows that give it non-zero weight (gather/scatter),
so top-1 costs one expert + the router per sample, not K experts.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ddm import UsageError
from ddm.models.experts import load_expert
from ddm.io import atomic_write_json, load_pretrained, replaced_dir, replacing_dir, verify_owned
from router.model import RouterModel
from router.strategies import DEFAULT_STRATEGY, parse_strategy

ENSEMBLE_FORMAT = "ddm-ensemble/1"
# Expert config keys that must agree for the experts to be interchangeable on one sample.
SHAPE_KEYS = ("sample_size", "in_channels", "out_channels", "patch_size", "num_embeds_ada_norm")


def load_router(path: str | Path, device=None, dtype=None) -> RouterModel:
    """The router of a folder `ddm train-router` wrote: files checked against their SHA-256, safetensors only."""
    path = replaced_dir(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"not a router directory (no config.json): {path}")
    verify_owned(path, "router")
    check_router_config(path)
    router = load_pretrained(RouterModel, path, "router", torch_dtype=dtype)
    return router.to(device).eval().requires_grad_(False)


def check_router_config(path: Path) -> None:
    """The keys that size the router must be positive integers (a hand-edited config gets one line)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot load router from {path}: config.json: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"cannot load router from {path}: config.json is not an object")
    for key in ("num_experts", "sample_size", "in_channels", "patch_size", "hidden_dim", "num_layers", "num_heads"):
        value = config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"cannot load router from {path}: config.json has {key}={value!r}, not a positive integer")


def check_experts(metas: list[dict], configs: list[dict], paths: list) -> None:
    """Experts must come from one partition, one noise path and one sample shape (UsageError naming the odd one)."""
    from ddm.data.vae import check_same_vae


    for meta, path in zip(metas, paths):
        missing = [key for key in ("island", "k", "manifest_fingerprint", "flow", "num_classes") if key not in meta]
        if missing:
            raise UsageError(f"expert {path}: expert.json has no {', '.join(map(repr, missing))} (an image expert needs them)")
    first, first_cfg = metas[0], configs[0]
    seen = set()
    for meta, cfg, path in zip(metas, configs, paths):
        check_same_vae(meta.get("vae"), f"expert {path}", first.get("vae"), f"expert {paths[0]}")
        for key in ("k", "manifest_fingerprint", "flow", "num_classes"):
            if meta.get(key) != first.get(key):
                raise UsageError(f"expert {path} has {key}={meta.get(key)!r} but {paths[0]} has {first.get(key)!r}")
        for key in SHAPE_KEYS:
            if cfg.get(key) != first_cfg.get(key):
                raise UsageError(f"expert {path} has {key}={cfg.get(key)!r} but {paths[0]} has {first_cfg.get(key)!r}")
        island = meta.get("island")
        if not isinstance(island, int) or not 0 <= island < first["k"]:
            raise UsageError(f"expert {path}: island {island!r} is outside 0..{first['k'] - 1}")
        if island in seen:
            raise UsageError(f"expert {path}: island {island} is given twice")
        seen.add(island)


class DDMEnsemble(ModelMixin, ConfigMixin):
    """Same forward signature and output as `DiTTransformer2DModel`.

    `routing_weights` holds the (B, K) weights of every forward call since the last `reset_routing`
    (zeros for experts that are missing or not chosen), for plots and the UI.
    """

    config_name = "ensemble.json"

    def __init__(self, router: RouterModel, experts: list[nn.Module], metas: list[dict], strategy: str = DEFAULT_STRATEGY):
        super().__init__()
        if not experts:
            raise UsageError("an ensemble needs at least one expert, got none")
        metas, experts = zip(*sorted(zip(metas, experts), key=lambda p: p[0]["island"]))
        self.metas = list(metas)
        k = router.config.num_experts
        if self.metas[0]["k"] != k:
            raise UsageError(f"router has K={k} but the experts' manifest has K={self.metas[0]['k']}")
        rc, ec = router.config, experts[0].config
        if rc.get("vae_hash") != (self.metas[0].get("vae") or {}).get("hash"):
            raise UsageError(f"router was trained on latents of VAE {rc.get('vae_hash')}, the experts on those of "
                             f"{(self.metas[0].get('vae') or {}).get('hash')} (None: pixel space)")
        if (rc.sample_size, rc.in_channels) != (ec.sample_size, ec.in_channels):
            raise UsageError(
                f"router expects {rc.in_channels}x{rc.sample_size}x{rc.sample_size} samples, "
                f"experts make {ec.in_channels}x{ec.sample_size}x{ec.sample_size}"
            )
        for key in ("flow", "manifest_fingerprint"):
            if rc.get(key) is not None and rc.get(key) != self.metas[0].get(key):
                raise UsageError(f"router was trained for {key}={rc.get(key)!r}, the experts have {self.metas[0].get(key)!r}")
        if rc.num_classes and rc.num_classes != self.metas[0]["num_classes"]:
            raise UsageError(f"router has {rc.num_classes} classes, the experts {self.metas[0]['num_classes']}")
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.islands = [m["island"] for m in self.metas]
        self.strategy = parse_strategy(strategy, k)
        self.register_to_config(
            strategy=str(self.strategy), islands=self.islands, num_experts=k, **{key: ec.get(key) for key in SHAPE_KEYS}
        )
        self.register_buffer("present", torch.tensor(self.islands), persistent=False)
        self.routing_weights: list[torch.Tensor] = []
        self.routing_generator: torch.Generator | None = None
        self.eval()

    @classmethod
    def from_dirs(cls, router_dir, expert_dirs, strategy: str = DEFAULT_STRATEGY, device=None, dtype=None) -> "DDMEnsemble":
        """Router directory + any subset of expert directories (a failed island is simply not given)."""
        expert_dirs = list(expert_dirs)
        if not expert_dirs:
            raise UsageError("an ensemble needs at least one expert directory, got none")
        router = load_router(router_dir, device, dtype)
        parse_strategy(strategy, router.config.num_experts)  # fail before loading the experts
        loaded = [load_expert(p, device=device, dtype=dtype) for p in expert_dirs]
        metas = [m for _, m in loaded]
        check_experts(metas, [dict(model.config) for model, _ in loaded], expert_dirs)
        return cls(router, [model for model, _ in loaded], metas, strategy)

    @property
    def flow_shift(self) -> float:
        """The experts' SD3 shift (they share one noise path); the sampler's scheduler must use it."""
        return self.metas[0]["flow"]["shift"]

    def set_strategy(self, strategy: str) -> None:
        self.strategy = parse_strategy(strategy, self.config.num_experts)
        self.register_to_config(strategy=str(self.strategy))

    def reset_routing(self, generator: torch.Generator | None = None) -> None:
        """Start a generation: clear the routing record; `sample:K` draws from a generator seeded by the sampler's."""
        self.routing_weights = []
        self.routing_generator = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            self.routing_generator = torch.Generator(generator.device).manual_seed(seed)

    def route(self, hidden_states, timestep, class_labels=None) -> torch.Tensor:
        """(B, P) weights over the experts present (router probabilities renormalized over them, then the strategy)."""
        logits = self.router(hidden_states, timestep, class_labels)[:, self.present]
        return self.strategy.weights(logits.float().softmax(dim=1), self.routing_generator)

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict=True):
        batch = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        timestep = timestep.expand(batch) if timestep.dim() == 0 else timestep
        weights = self.route(hidden_states, timestep, class_labels)
        self.routing_weights.append(
            torch.zeros(batch, self.config.num_experts, dtype=weights.dtype, device=weights.device).index_copy_(1, self.present, weights)
        )
        chosen = weights > 0
        counts = chosen.sum(0).tolist()  # the per-expert batch sizes: the only host syncs of a step (+ nonzero)
        rows_by_expert = chosen.t().nonzero()[:, 1].split(counts)
        out = hidden_states.new_zeros(batch, self.config.out_channels, *hidden_states.shape[2:])
        for expert, rows, w, n in zip(self.experts, rows_by_expert, weights.t(), counts):
            if n == 0:
                continue
            if n == batch:  # the whole batch: no gather, so one routed expert reproduces the expert exactly
                v = expert(hidden_states, timestep, class_labels, cross_attention_kwargs).sample
                out += v * w.view(-1, 1, 1, 1).to(v.dtype)
            else:
                labels = None if class_labels is None else class_labels[rows]
                v = expert(hidden_states[rows], timestep[rows], labels, cross_attention_kwargs).sample
                out.index_add_(0, rows, v * w[rows].view(-1, 1, 1, 1).to(v.dtype))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """router/ + expert_<island>/ (EMA weights + expert.json) + ensemble.json naming them and the strategy.

        Replaces `save_directory` only if it is absent, empty or an ensemble ddm wrote (ddm.io.replacing_dir)."""
        from ddm.io import tree_digests
        from ddm.models.experts import write_expert_meta

        with replacing_dir(Path(save_directory), "ensemble", "ensemble folder") as staging:
            self.router.save_pretrained(staging / "router")
            names = []
            for expert, meta in zip(self.experts, self.metas):
                name = f"expert_{meta['island']}"
                expert.save_pretrained(staging / name)
                write_expert_meta(staging / name, meta, type(expert).__name__, tree_digests(staging / name))
                names.append(name)
            atomic_write_json(staging / self.config_name, {"format": ENSEMBLE_FORMAT, "router": "router", "experts": names, "strategy": str(self.strategy)})

    @classmethod
    def from_pretrained(cls, path, strategy: str | None = None, device=None, torch_dtype=None, **kwargs) -> "DDMEnsemble":
        path = replaced_dir(path)
        try:
            spec = json.loads((path / cls.config_name).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"not an ensemble directory ({cls.config_name} unreadable): {path}: {e}") from None
        if not isinstance(spec, dict) or spec.get("format") != ENSEMBLE_FORMAT:
            found = spec.get("format") if isinstance(spec, dict) else None
            raise UsageError(f"{path / cls.config_name}: unknown format {found!r}, expected {ENSEMBLE_FORMAT}")
        parts = [spec.get("router"), *(spec.get("experts") or [None])]
        if not all(isinstance(p, str) for p in parts) or not isinstance(spec.get("strategy"), str):
            raise UsageError(f"{path / cls.config_name}: 'router', 'experts' and 'strategy' must name folders and a strategy")
        verify_owned(path, "ensemble")
        return cls.from_dirs(
            path / spec["router"], [path / e for e in spec["experts"]], strategy or spec["strategy"], device, torch_dtype
        )
