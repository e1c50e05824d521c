"""The ensemble: router + any subset of experts, seen by a sampler as ONE diffusers DiT (class-conditional experts)
or ONE PixArt transformer (text-conditional experts; the router then also takes `pooled_projections`).

v(x_t, t) = sum_k w_k(x_t, t) v_k(x_t, t), w = strategy(softmax(r(x_t, t)) over the experts present).
Routing is per sample: each expert runs only on the rows that give it non-zero weight, so top-1 costs one
expert + the router per sample, not K experts. Two ways to run the rows (`dispatch`):
  gather   one call per expert on its rows (their count is read on the host). Experts may sit on different
           devices (`device_map`): rows travel to their expert's device and back.
  grouped  all experts as one model on rows sorted by expert (router/grouped.py): no host sync, one expert's
           kernel launches. Needs experts of one config on one device.
"auto" takes grouped on a CUDA device where torch's grouped matmul has its sync-free kernel (bf16, sm90+),
gather elsewhere (on a CPU the host read costs nothing, and gather measured as fast; docs/BENCHMARKS.md).
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
from ddm.models.experts import NO_EXTRA_CONDITIONS, load_expert, read_expert_meta
from ddm.io import atomic_write_json, replaced_dir, replacing_dir, verify_owned
from router.grouped import GroupedExperts, groupable, grouped_mm_works
from router.members import SHAPE_KEYS, check_experts, conditioning, load_router
from router.model import RouterModel
from router.strategies import DEFAULT_STRATEGY, draw_one, parse_strategy

ENSEMBLE_FORMAT = "ddm-ensemble/1"
DISPATCH = ("auto", "gather", "grouped")


def check_device(name) -> torch.device:
    """A device that exists on this machine (UsageError naming it otherwise)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"device {name!r} is not a device name (use cpu or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(f"device {name!r} is not present: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"device {name!r}: use cpu or cuda:N")
    return device


def parse_device_map(device_map, islands: list[int]) -> dict[int, torch.device]:
    """{island: device} from a dict, a list (one device per expert, in island order) or a CLI string
    ("cuda:0,cuda:1,..." in island order, or "0=cuda:0,2=cuda:1"). Islands not named use the first device."""
    if isinstance(device_map, str):
        items = [item.strip() for item in device_map.split(",") if item.strip()]
        if items and all("=" in item for item in items):
            pairs = [item.split("=", 1) for item in items]
            bad = [i for i, _ in pairs if not i.strip().isdigit()]
            if bad:
                raise UsageError(f"device map {device_map!r}: {bad[0]!r} is not an island number")
            device_map = {int(i): d.strip() for i, d in pairs}
        elif any("=" in item for item in items):
            raise UsageError(f"device map {device_map!r}: give either devices in island order or island=device pairs, not both")
        else:
            device_map = items
    if isinstance(device_map, dict):
        unknown = [i for i in device_map if i not in islands]
        if unknown:
            raise UsageError(f"device map gives a device to island {unknown[0]}, which is not among the experts given ({islands})")
        named = {i: check_device(d) for i, d in device_map.items()}
        first = named[min(named)] if named else torch.device("cpu")
        return {i: named.get(i, first) for i in islands}
    devices = [check_device(d) for d in device_map]
    if len(devices) != len(islands):
        raise UsageError(f"device map lists {len(devices)} device(s) for {len(islands)} experts (islands {islands})")
    return dict(zip(sorted(islands), devices))


def grouped_is_fast(device: torch.device, dtype: torch.dtype) -> bool:
    """Where torch's grouped matmul runs without a host sync: bf16 on sm90+ CUDA devices."""
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


class DDMEnsemble(ModelMixin, ConfigMixin):
    """Same forward signature and output as `DiTTransformer2DModel`.

    `routing_weights` holds the (B, K) weights of every forward call since the last `reset_routing`
    (zeros for experts that are missing or not chosen), for plots and the UI.
    """

    config_name = "ensemble.json"

    def __init__(self, router: RouterModel, experts: list[nn.Module], metas: list[dict], strategy: str = DEFAULT_STRATEGY,
                 dispatch: str = "auto"):
        super().__init__()
        if dispatch not in DISPATCH:
            raise UsageError(f"dispatch {dispatch!r}: use {', '.join(DISPATCH)}")
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
        self.text = conditioning(self.metas[0]) == "text"
        if self.text and not rc.get("text_dim"):
            raise UsageError("the router was trained without text, but the experts are text-conditional: "
                             "train the router on these experts (ddm train-router)")
        if not self.text and rc.get("text_dim"):
            raise UsageError("the router is conditioned on text, but the experts are class-conditional")
        text_hash = (self.metas[0].get("text_encoder") or {}).get("hash")
        if self.text and rc.get("text_encoder_hash") != text_hash:
            raise UsageError(f"the router was trained with text encoder {rc.get('text_encoder_hash')}, the experts with {text_hash}")
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.islands = [m["island"] for m in self.metas]
        self.strategy = parse_strategy(strategy, k)
        self.register_to_config(
            strategy=str(self.strategy), islands=self.islands, num_experts=k, **{key: ec.get(key) for key in SHAPE_KEYS},
            conditioning=conditioning(self.metas[0]), caption_channels=ec.get("caption_channels"),
        )
        self.register_buffer("present", torch.tensor(self.islands), persistent=False)
        self.dispatch = dispatch
        self.grouped: GroupedExperts | None = None
        self.routing_weights: list[torch.Tensor] = []
        self.routing_generator: torch.Generator | None = None
        self.guidance_pairs = 0
        self.trajectory_draw: torch.Tensor | None = None
        self.eval()

    @classmethod
    def from_dirs(cls, router_dir, expert_dirs, strategy: str = DEFAULT_STRATEGY, device=None, dtype=None, device_map=None,
                  dispatch: str = "auto") -> "DDMEnsemble":
        """Router directory + any subset of expert directories (a failed island is simply not given).

        `device_map` puts experts on several devices (see `parse_device_map`); the router goes on the first.
        """
        expert_dirs = list(expert_dirs)
        if not expert_dirs:
            raise UsageError("an ensemble needs at least one expert directory, got none")
        devices = [device] * len(expert_dirs)
        if device_map is not None:  # checked before any weights load
            islands = [read_expert_meta(p).get("island") for p in expert_dirs]
            placement = parse_device_map(device_map, islands)
            devices = [placement[i] for i in islands]
            device = placement[min(placement)]
        router = load_router(router_dir, device, dtype)
        parse_strategy(strategy, router.config.num_experts)  # fail before loading the experts
        text_experts = [p for p in expert_dirs if conditioning(read_expert_meta(p)) == "text"]
        if text_experts and not router.config.get("text_dim"):
            raise UsageError(f"the router {router_dir} was trained without text, but expert {text_experts[0]} is "
                             "text-conditional: train the router on these experts (ddm train-router)")
        loaded = [load_expert(p, device=d, dtype=dtype) for p, d in zip(expert_dirs, devices)]
        metas = [m for _, m in loaded]
        check_experts(metas, [dict(model.config) for model, _ in loaded], expert_dirs)
        return cls(router, [model for model, _ in loaded], metas, strategy, dispatch)

    @property
    def flow_shift(self) -> float:
        """The experts' SD3 shift (they share one noise path); the sampler's scheduler must use it."""
        return self.metas[0]["flow"]["shift"]

    def set_strategy(self, strategy: str) -> None:
        self.strategy = parse_strategy(strategy, self.config.num_experts)
        self.register_to_config(strategy=str(self.strategy))

    def reset_routing(self, generator: torch.Generator | None = None, guidance_pairs: int = 0) -> None:
        """Start a generation: clear the routing record and the trajectory draws; random routing (`sample:K`,
        `trajectory`) draws from a generator seeded by the sampler's. `guidance_pairs` = n: in every call of this
        generation rows i and n + i are one sample's conditional and null-label rows, and the null-label row uses
        the conditional row's weights (the pipeline's `guidance_routing="conditional"`)."""
        self.routing_weights = []
        self.routing_generator = None
        self.guidance_pairs = guidance_pairs
        self.trajectory_draw = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            self.routing_generator = torch.Generator(generator.device).manual_seed(seed)

    def route(self, hidden_states, timestep, class_labels=None, pooled_text=None) -> torch.Tensor:
        """(B, P) weights over the experts present (router probabilities renormalized over them, then the strategy)."""
        n = self.guidance_pairs
        if not n:
            return self.route_rows(hidden_states, timestep, class_labels, pooled_text)
        if hidden_states.shape[0] != 2 * n:
            raise UsageError(f"routing was reset for {n} guided samples (2 x {n} rows), got {hidden_states.shape[0]} rows")
        first = [None if c is None else c[:n] for c in (class_labels, pooled_text)]
        weights = self.route_rows(hidden_states[:n], timestep[:n], *first)
        return torch.cat([weights, weights])

    def route_rows(self, hidden_states, timestep, class_labels, pooled_text=None) -> torch.Tensor:
        strategy = self.strategy

        def probs():
            text = (pooled_text,) if self.text else ()  # a class router takes no text argument
            logits = self.router(hidden_states, timestep, class_labels, *text)[:, self.present]
            return logits.float().softmax(dim=1)

        if strategy.name != "trajectory":
            return strategy.weights(probs(), self.routing_generator)
        first = None
        if self.trajectory_draw is None:  # the first step (sigma = 1): p(k | x_1, c) is the (class-given) prior
            first = probs()
            self.trajectory_draw = draw_one(first, self.routing_generator)
        elif self.trajectory_draw.shape[0] != hidden_states.shape[0]:
            raise UsageError(f"trajectory routing drew experts for {self.trajectory_draw.shape[0]} rows, got "
                             f"{hidden_states.shape[0]}: call reset_routing() before a new generation")
        if strategy.then is None:
            return self.trajectory_draw
        # the hybrid runs the router every step, so no step branches on a device value
        later = strategy.then.weights(probs() if first is None else first, self.routing_generator)
        low_noise = timestep < strategy.handover * 1000  # timestep = 1000 sigma
        return torch.where(low_noise[:, None], later, self.trajectory_draw)

    def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict=True,
                encoder_hidden_states=None, encoder_attention_mask=None, pooled_projections=None, added_cond_kwargs=None):
        """The expert's arguments: DiT's (class_labels) or PixArt's (encoder_hidden_states, encoder_attention_mask,
        added_cond_kwargs), plus `pooled_projections` (B, P), the prompts' pooled embeddings the text router reads."""
        batch = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        timestep = timestep.expand(batch) if timestep.dim() == 0 else timestep
        weights = self.route(hidden_states, timestep, class_labels, pooled_projections)
        self.routing_weights.append(
            torch.zeros(batch, self.config.num_experts, dtype=weights.dtype, device=weights.device).index_copy_(1, self.present, weights)
        )
        # per-row conditions (sliced with the rows) and whole-call options
        if self.text:
            rows_cond = {"encoder_hidden_states": encoder_hidden_states, "encoder_attention_mask": encoder_attention_mask}
            options = {"added_cond_kwargs": added_cond_kwargs or NO_EXTRA_CONDITIONS}
        else:
            rows_cond, options = {"class_labels": class_labels}, {}
        rows_cond = {k: v for k, v in rows_cond.items() if v is not None}
        if cross_attention_kwargs is not None:
            options["cross_attention_kwargs"] = cross_attention_kwargs
        if len(self.experts) == 1:  # the weight is 1: the expert itself, bit for bit
            out = self.experts[0](hidden_states, timestep=timestep, **rows_cond, **options).sample
        elif (grouped := self.grouped_experts()) is not None:
            out = self.forward_grouped(grouped, hidden_states, timestep, class_labels, weights, cross_attention_kwargs)
        else:
            out = self.forward_gather(hidden_states, timestep, rows_cond, options, weights)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def grouped_experts(self) -> GroupedExperts | None:
        """The stacked experts when this step runs grouped, else None (gather)."""
        if self.text and self.dispatch == "grouped":
            raise UsageError("dispatch 'grouped' stacks DiT experts; text-conditional (PixArt) experts run with 'gather'")
        if self.text or self.dispatch == "gather" or self.strategy.experts_per_row(len(self.experts)) is None:
            return None  # threshold: a row's expert count depends on the weights, so its shapes cannot be fixed
        first = next(self.experts[0].parameters())
        if self.dispatch == "auto" and not grouped_is_fast(first.device, first.dtype):
            return None
        if self.grouped is None or not self.grouped.is_current():
            if not groupable(list(self.experts)) or not grouped_mm_works(first.device, first.dtype):
                if self.dispatch == "grouped":
                    raise UsageError("dispatch 'grouped' needs experts of one config on one device, and torch._grouped_mm there")
                self.dispatch = "gather"  # "auto" resolved for good: these experts cannot be stacked
                return None
            self.grouped = GroupedExperts(list(self.experts))
        return self.grouped

    def forward_grouped(self, grouped, hidden_states, timestep, class_labels, weights, cross_attention_kwargs):
        """Each row's m = experts_per_row slots, sorted by expert, through the grouped model: fixed shapes throughout."""
        batch, present = weights.shape
        m = self.strategy.experts_per_row(present)
        if m == present:
            w, slots = weights, torch.arange(present, device=weights.device).expand(batch, present)
        else:
            w, slots = weights.topk(m, dim=1)  # the m kept experts (zero weights only where fewer are kept)
        expert = slots.reshape(-1)
        order = expert.argsort(stable=True)
        rows = order // m
        # not F.one_hot: it checks the index range on the host
        counts = (expert[:, None] == torch.arange(present, device=expert.device)).sum(0)
        labels = None if class_labels is None else class_labels[rows]
        kwargs = {} if cross_attention_kwargs is None else {"cross_attention_kwargs": cross_attention_kwargs}
        v = grouped(hidden_states[rows], timestep[rows], labels, expert[order], counts, **kwargs)
        v = v[order.argsort()].view(batch, m, *v.shape[1:])
        return (v * w.view(batch, m, *[1] * (v.dim() - 2)).to(v.dtype)).sum(1)

    def forward_gather(self, hidden_states, timestep, rows_cond: dict, options: dict, weights):
        """One call per expert on its rows, on the expert's device."""
        batch = hidden_states.shape[0]
        chosen = weights > 0
        counts = chosen.sum(0).tolist()  # the per-expert batch sizes: the host read of this path (+ nonzero)
        rows_by_expert = chosen.t().nonzero()[:, 1].split(counts)
        out = hidden_states.new_zeros(batch, self.config.out_channels, *hidden_states.shape[2:])
        for expert, rows, w, n in zip(self.experts, rows_by_expert, weights.t(), counts):
            if n == 0:
                continue
            device = next(expert.parameters()).device
            if n == batch:  # the whole batch: no gather, so one routed expert reproduces the expert exactly
                cond = {k: v.to(device) for k, v in rows_cond.items()}
                v = expert(hidden_states.to(device), timestep=timestep.to(device), **cond, **options).sample.to(out.device)
                out += v * w.view(-1, 1, 1, 1).to(v.dtype)
            else:
                cond = {k: v[rows].to(device) for k, v in rows_cond.items()}
                v = expert(hidden_states[rows].to(device), timestep=timestep[rows].to(device), **cond, **options).sample
                out.index_add_(0, rows, v.to(out.device) * w[rows].view(-1, 1, 1, 1).to(v.dtype))
        return out

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
    def from_pretrained(cls, path, strategy: str | None = None, device=None, torch_dtype=None, device_map=None, **kwargs) -> "DDMEnsemble":
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
            path / spec["router"], [path / e for e in spec["experts"]], strategy or spec["strategy"], device, torch_dtype, device_map
        )
