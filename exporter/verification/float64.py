"""A float64 forward of an fp32 eager model without a float64 copy of it: the noise floor of verification.

``float64_forward(model)`` makes the model compute in float64 while active:
- each decoder layer (every module inside an ``nn.ModuleList``) casts its own parameters and buffers to float64
  just before its forward and back to float32 right after (float32 -> float64 -> float32 is exact), so at most
  one layer is held in float64; the modules outside the layers (embedding, final norm, lm_head, rotary) are cast
  for the duration (they are used once per forward, some of them shared);
- model code that asks for float32 (``.float()``, ``.to(torch.float32)``, ``dtype=torch.float32``: RMSNorm's
  upcast, rotary tables) gets float64 instead, so nothing is rounded to float32 on the way.
The weights are the fp32 checkpoint's; only the arithmetic is float64. Peak extra memory: the non-layer weights and
one layer in float64.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def _to_float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double() if tensor.is_floating_point() else tensor


def _to_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype == torch.float64 else tensor


class _KeepFloat64(TorchFunctionMode):
    """Requests for float32 (casts and factory dtypes) are served in float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float:
            return args[0].double()
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        if func in (torch.Tensor.to, torch.Tensor.type):
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.float32:
                args = (args[0], torch.float64, *args[2:])  # .to(other_float32_tensor)
        return func(*args, **kwargs)


def _layers(model: nn.Module) -> list[nn.Module]:
    """The entries of the outermost ``nn.ModuleList``s (decoder layers; experts inside them are not separate)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        for layer in module:
            found.append(layer)
            inside.update(id(m) for m in layer.modules())
    return found


@contextlib.contextmanager
def float64_forward(model: nn.Module):
    """While active, ``model(...)`` computes in float64 (see the module notes); the model is left exactly as it was
    (float32 weights) afterwards, also on error."""
    layers = _layers(model)
    in_layers = {id(p) for layer in layers for p in (*layer.parameters(), *layer.buffers())}
    outside = [m for m in model.modules()
               if any(id(t) not in in_layers for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))]
    # MoE experts: transformers' grouped_mm / batched_mm kernels take no float64; the per-expert loop ("eager") is
    # the same math and does
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_experts_implementation_internal", None) not in (None, "eager")}
    experts = {key: config._experts_implementation_internal for key, config in configs.items()}
    hooks = []
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(lambda module, args: module._apply(_to_float64) and None))
        hooks.append(layer.register_forward_hook(lambda module, args, out: module._apply(_to_float32) and None))
    try:
        for config in configs.values():
            config._experts_implementation_internal = "eager"
        for module in outside:
            module._apply(_to_float64, recurse=False)
        with _KeepFloat64():
            yield model
    finally:
        for hook in hooks:
            hook.remove()
        for key, config in configs.items():
            config._experts_implementation_internal = experts[key]
        model._apply(_to_float32)
