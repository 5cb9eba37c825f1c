"""Where tensors live: one code path for CPU and CUDA (bf16 autocast, pinned non-blocking copies on CUDA)."""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    """A resolved compute device and how to run on it."""

    torch_device: torch.device

    @property
    def is_cuda(self) -> bool:
        """True on a GPU."""
        return self.torch_device.type == "cuda"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast on CUDA for training; plain float32 on CPU, where bf16 matmuls are slower and less exact.

        Inference (soft labels, embeddings, calibration, evaluation) stays float32 on both: bf16 keeps about 3
        digits, enough to reorder close candidates and to make cached soft labels depend on the device.
        """
        if self.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield

    def move(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy a batch of CPU tensors here; pinned and non-blocking on CUDA so copies overlap compute."""
        if not self.is_cuda:
            return batch
        return {k: v.pin_memory().to(self.torch_device, non_blocking=True) for k, v in batch.items()}


def resolve_device(name: str = "auto") -> Device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error the user can act on."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {name!r}")
    return Device(torch.device(name))
