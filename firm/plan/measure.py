"""Memory of a forward (and backward) of the real model classes, measured without memory: fake tensors.

A model built on the meta device is given fake CPU tensors in place of its parameters, buffers and tensor attributes
(:func:`fake_weights`); under ``FakeTensorMode`` every op then runs its shape rules only. :class:`PeakCounter`, a
dispatch mode, sees every tensor an op creates and adds its storage's bytes until the storage is freed, the way
``torch.distributed._tools.mem_tracker.MemTracker`` counts (storages, weak references, views counted once), and keeps
the peak. Activation checkpointing, autocast and the attention kernel are the ones the real run takes: the CPU's
flash attention for ``scaled_dot_product_attention``, whose saved state (output and log-sum-exp) is the size of
CUDA's flash / memory-efficient kernels'.

Why not MemTracker itself: in torch 2.13 it installs a gradient hook on every parameter it meets, which raises on the
frozen base weights of a LoRA model, and it updates the peak of every module seen so far at every op, which takes
minutes on a 60-block transformer (this counter: seconds). tests/plan/test_measure.py checks that both give the same
peak on the tiny models, and that the counter agrees with the allocator's peak of a real CPU run (torch.profiler).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class PeakCounter(TorchDispatchMode):
    """Live bytes of the tensor storages that ops create (or that :meth:`add` registers), and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._known = WeakIdKeyDictionary()

    def add(self, *tensors: Any) -> None:
        """Count the storages of ``tensors`` (nested lists / dicts / modules allowed) from now until they are freed."""
        for t in _tensors(tensors):
            st = t.untyped_storage()
            if st in self._known:
                continue
            n = st.nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)
            self._known[st] = weakref.ref(st, lambda _, n=n: self._freed(n))

    def _freed(self, n: int) -> None:
        self.live -= n

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        out = func(*args, **(kwargs or {}))
        self.add(out)
        return out


def _tensors(tree: Any) -> Iterable[torch.Tensor]:
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            yield leaf
        elif isinstance(leaf, nn.Module):
            yield from leaf.parameters()
            yield from leaf.buffers()
            for m in leaf.modules():
                yield from (v for v in vars(m).values() if isinstance(v, torch.Tensor))


def fake_weights(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Replace, in place, every parameter, buffer and tensor attribute of ``module`` (meta or real) by an empty fake
    CPU tensor of the same shape, strides, dtype and ``requires_grad``; returns ``module``.

    Module conversions (``.to()``) must happen before: ``nn.Module._apply`` cannot swap fake parameters.
    """
    with mode:
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = nn.Parameter(_empty_like(p), requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = _empty_like(b)
            for name, v in list(vars(m).items()):  # e.g. RoPE tables kept as plain attributes
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                    setattr(m, name, _empty_like(v))
    return module


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")


def peak_above(fn: Callable[[], Any], *resident: Any, counter: PeakCounter | None = None) -> int:
    """Bytes that ``fn()`` adds at its peak on top of ``resident`` (modules and tensors that exist before it runs).

    Whatever ``fn`` returns is released before this returns.
    """
    c = counter or PeakCounter()
    c.add(*resident)
    base = c.live
    c.reset_peak()
    with c:
        out = fn()
    del out
    return c.peak - base
