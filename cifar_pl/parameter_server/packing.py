"""A model's state as a few flat tensors, the form parameters and gradients travel in.

The order is fixed by the module (``named_parameters`` then persistent buffers), which the handshake's
model signature checks, so both ends agree on where each tensor's slice lies without naming them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class FlatState:
    """Packs and unpacks a module's parameters, gradients and buffers as flat tensors.

    Parameters and floating-point buffers (BatchNorm running statistics) travel as float32; integer buffers
    (BatchNorm's batch counters) as int64.
    """

    def __init__(self, module: nn.Module) -> None:
        self.params = [p for _, p in module.named_parameters()]
        persistent = set(module.state_dict().keys())
        buffers = [(name, b) for name, b in module.named_buffers() if name in persistent]
        self.float_buffers = [b for _, b in buffers if b.is_floating_point()]
        self.int_buffers = [b for _, b in buffers if not b.is_floating_point()]
        self.num_params = sum(p.numel() for p in self.params)
        self.num_float_buffers = sum(b.numel() for b in self.float_buffers)
        self.num_int_buffers = sum(b.numel() for b in self.int_buffers)

    @staticmethod
    def _flatten(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        if not tensors:
            return torch.zeros(0, dtype=dtype)
        with torch.no_grad():
            flat = torch.cat([t.reshape(-1) for t in tensors])  # reshape copies only the channels-last ones
        return flat.to("cpu", dtype)

    @staticmethod
    def _assign(tensors: Sequence[Tensor], flat: Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    def params_flat(self) -> Tensor:
        return self._flatten(self.params, torch.float32)

    def grads_flat(self) -> Tensor:
        """Gradients, zeros where a parameter got none."""
        return self._flatten(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params], torch.float32
        )

    def buffers_flat(self) -> tuple[Tensor, Tensor]:
        return self._flatten(self.float_buffers, torch.float32), self._flatten(self.int_buffers, torch.int64)

    def load_params(self, flat: Tensor) -> None:
        self._assign(self.params, flat)

    def load_buffers(self, floats: Tensor, ints: Tensor) -> None:
        self._assign(self.float_buffers, floats)
        self._assign(self.int_buffers, ints)

    def set_grads(self, flat: Tensor) -> None:
        """Write ``flat`` into every parameter's ``.grad``, allocated where missing with the parameter's own
        memory layout (channels-last for convolutions): gradient-norm clipping then reduces in the same
        order as backward-produced gradients, so results match DDP's bit for bit."""
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(flat[offset : offset + n].view(p.shape))
            offset += n

    def shapes_match(self, grads: Tensor, floats: Tensor, ints: Tensor) -> bool:
        """Whether a worker's flat tensors have this model's sizes and dtypes."""
        return (
            grads.dtype == torch.float32
            and grads.shape == (self.num_params,)
            and floats.dtype == torch.float32
            and floats.shape == (self.num_float_buffers,)
            and ints.dtype == torch.int64
            and ints.shape == (self.num_int_buffers,)
        )
