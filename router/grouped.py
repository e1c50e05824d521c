"""K experts of one architecture run as ONE model on rows sorted by expert, with no host sync.

Each weight-bearing layer of the experts (Linear, Embedding, the patch Conv2d) is stacked over the experts, and
a copy of the architecture runs with those layers replaced by grouped ones: a grouped matmul
(`torch._grouped_mm`) whose per-expert row offsets are computed on the device. Everything else in a DiT (norms
without affine, attention, activations) acts within one sample, so output row r is expert e(r) applied to row r.
The step then costs one expert's kernel launches and the FLOPs of the rows routed, and no tensor shape depends
on the routing, so nothing waits for the device. The experts keep their weights as views into the stacks, so
memory is not doubled; moving or replacing an expert's weights makes `is_current()` false and the ensemble
rebuilds.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class RowGroups:
    """Per call: the expert of every (sorted) sample row, and each expert's cumulative row count."""

    expert: torch.Tensor  # (R,) int64, non-decreasing
    ends: torch.Tensor  # (K,) int64, ends[k] = rows routed to experts 0..k


ALIGN = 8  # the sync-free CUDA kernel needs 16-byte aligned rows: a multiple of 8 bf16 values


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """x (R * per, in) with rows grouped by expert, per = rows per sample; weight (K, out, in) -> (R * per, out)."""
    per = x.shape[0] // groups.expert.shape[0]
    offs = (groups.ends * per).to(torch.int32)
    out_features, in_features = weight.shape[1:]
    pad_in, pad_out = -in_features % ALIGN, -out_features % ALIGN
    if pad_in or pad_out:  # narrow layers only (a patch of few channels, the output projection): small copies
        x, weight = F.pad(x, (0, pad_in)), F.pad(weight, (0, pad_in, 0, pad_out))
    y = torch._grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=offs)
    return y[:, :out_features] if pad_out else y


class GroupedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, groups: RowGroups):
        super().__init__()
        self.weight, self.bias, self.groups = weight, bias, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        y = grouped_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.groups).reshape(rows, -1, self.weight.shape[1])
        if self.bias is not None:
            y = y + self.bias[self.groups.expert][:, None]
        return y.reshape(*x.shape[:-1], -1)


class GroupedEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, groups: RowGroups):
        super().__init__()
        self.weight, self.groups = weight, groups

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.weight[self.groups.expert, labels]


class GroupedPatchConv(nn.Module):
    """A Conv2d with stride = kernel (patchify), as a grouped matmul on the flattened patches."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, patch: int, groups: RowGroups):
        super().__init__()
        self.weight, self.bias, self.patch, self.groups = weight, bias, patch, groups  # weight (K, out, C * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * p * p)
        y = grouped_matmul(patches, self.weight, self.groups).reshape(b, -1, self.weight.shape[1])
        if self.bias is not None:
            y = y + self.bias[self.groups.expert][:, None]
        return y.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2)


def is_patch_conv(m: nn.Conv2d) -> bool:
    return (m.kernel_size == m.stride and m.kernel_size[0] == m.kernel_size[1] and m.padding == (0, 0)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def groupable(experts: list[nn.Module]) -> bool:
    """Same class and config, one device and dtype, and weights only in Linear / Embedding / patch Conv2d layers."""
    first = experts[0]

    def config(model):  # without diffusers' bookkeeping keys (`_name_or_path` differs per directory)
        return {k: v for k, v in dict(getattr(model, "config", {})).items() if not k.startswith("_")}

    if any(type(e) is not type(first) or config(e) != config(first) for e in experts):
        return False
    if len({(p.device, p.dtype) for e in experts for p in e.parameters()}) != 1:
        return False
    for m in first.modules():
        if next(m.parameters(recurse=False), None) is None:
            continue
        if isinstance(m, nn.Conv2d) and not is_patch_conv(m) or isinstance(m, nn.Embedding) and m.max_norm is not None:
            return False
        if not isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            return False
    buffers = [dict(e.named_buffers()) for e in experts]  # e.g. fixed position tables: the copy holds expert 0's
    return all(b.keys() == buffers[0].keys() and all(torch.equal(v, buffers[0][n]) for n, v in b.items()) for b in buffers)


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this build's `_grouped_mm` runs on this device and dtype (an empty group included)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a, w = torch.ones(4, 8, device=device, dtype=dtype), torch.ones(2, 16, 8, device=device, dtype=dtype)
        out = torch._grouped_mm(a, w.transpose(1, 2), offs=torch.tensor([0, 4], device=device, dtype=torch.int32))
        return bool((out == 8).all())  # once, when the grouped model is built; not inside a step
    except (RuntimeError, NotImplementedError):
        return False


class GroupedExperts:
    """Not an nn.Module on purpose: the ensemble's state dict, `.to()` and saving see only the experts."""

    def __init__(self, experts: list[nn.Module]):
        with torch.inference_mode(False), torch.no_grad():  # the experts' weights must stay ordinary tensors
            self.build(experts)

    def build(self, experts: list[nn.Module]) -> None:
        self.groups = RowGroups()
        self.model = copy.deepcopy(experts[0])
        self.views: list[tuple[nn.Parameter, int]] = []  # (expert parameter, the data_ptr it must keep)
        for name, module in list(self.model.named_modules()):
            if not isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
                continue
            originals = [e.get_submodule(name) for e in experts]
            weight = self.stack([m.weight for m in originals])
            bias = self.stack([m.bias for m in originals]) if getattr(module, "bias", None) is not None else None
            if isinstance(module, nn.Linear):
                grouped = GroupedLinear(weight, bias, self.groups)
            elif isinstance(module, nn.Embedding):
                grouped = GroupedEmbedding(weight, self.groups)
            else:
                grouped = GroupedPatchConv(weight.flatten(2), bias, module.kernel_size[0], self.groups)
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, grouped)
        self.model.eval().requires_grad_(False)

    def stack(self, params: list[nn.Parameter]) -> torch.Tensor:
        """Stack one weight over the experts and make each expert's parameter a view of its slice."""
        stacked = torch.stack([p.detach() for p in params])
        for k, p in enumerate(params):
            p.data = stacked[k]
            self.views.append((p, p.data_ptr()))
        return stacked

    def is_current(self) -> bool:
        return all(p.data_ptr() == ptr for p, ptr in self.views)

    def __call__(self, hidden_states, timestep, class_labels, expert: torch.Tensor, counts: torch.Tensor, **kwargs):
        """Rows sorted by `expert` (R,); counts (K,) rows per expert. Returns the experts' outputs, row for row."""
        self.groups.expert, self.groups.ends = expert, counts.cumsum(0)
        try:
            return self.model(hidden_states, timestep, class_labels, **kwargs).sample
        finally:
            self.groups.expert = self.groups.ends = None
