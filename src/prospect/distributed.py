"""Several processes in one job (``accelerate launch`` or ``torchrun``): who does which part.

ProSpect uses them three ways:

- inversion is data-parallel: :func:`prospect.inversion.invert` draws the global batch of step s
  from (seed, s), each process takes its slice and the concept rows' gradients are averaged, so
  the result equals one process's run with the same global batch;
- generation and independent training jobs are sharded round-robin (item i goes to process
  i % world) and each item is computed exactly as a single process computes it; results meet in
  the output folder (files), nothing is pickled between processes;
- independent jobs train with :class:`Solo`, so no process averages its gradients with another
  process's unrelated concept.

Without a launcher everything here describes one process, and nothing communicates.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence, TypeVar

import torch

if TYPE_CHECKING:
    from .pipeline import GenerationResult

T = TypeVar("T")


def launch_state():
    """This process's place in the launch (``accelerate.PartialState``); one process when not launched."""
    from accelerate import PartialState

    # accelerate only treats a CPU launch as distributed (gloo) when told cpu=True
    return PartialState(cpu=not torch.cuda.is_available())


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The items of process ``rank`` out of ``world``: item i goes to process i % world."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"process {rank} of {world} does not exist")
    return list(items[rank::world])


def seeded_calls(pp, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 1, state=None,
                 **call) -> Iterator[tuple[int, GenerationResult]]:
    """Image i is ``prompts[i]`` drawn from its own generator seeded ``seeds[i]``: (first index, result) per call
    of ``batch_size`` consecutive images, call c on process c % world (this process's calls only).

    Every image is the same whatever the batching and the number of processes. ``call`` takes the
    pipeline's other arguments. The one batched, seeded generation of the project: the CLI, the benchmark
    and the embedded model's measurements all use it.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts or batch_size < 1:
        raise ValueError(f"give at least one prompt and a batch_size >= 1, got {len(prompts)} and {batch_size}")
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    calls = [range(k, min(k + batch_size, len(prompts))) for k in range(0, len(prompts), batch_size)]
    for ks in shard(calls, rank, world):
        gens = [torch.Generator(device="cpu").manual_seed(int(seeds[k])) for k in ks]
        yield ks[0], pp([prompts[k] for k in ks], generator=gens, **call)


def seeded_images(pp, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 50, **call) -> list:
    """All images of :func:`seeded_calls` in this process, in order."""
    return [im for _, result in seeded_calls(pp, prompts, seeds, batch_size, **call) for im in result.images]


def generate_share(pp, num_images: int, seed: int, state=None, batch_size: int = 1, prompt: str = "*",
                   **call) -> Iterator[tuple[int, GenerationResult]]:
    """This process's part of a ``num_images`` run of one prompt: image k draws from seed + k."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    return seeded_calls(pp, [prompt] * num_images, range(seed, seed + num_images), batch_size, state, **call)


class Solo:
    """The part of ``accelerate.Accelerator`` that :func:`~prospect.inversion.invert` uses, for this process alone.

    Inside a launch, ``Accelerator()`` would average gradients over all processes; independent
    jobs (``prospect train-many``) pass ``Solo(device)`` instead, which never communicates.
    """

    num_processes = 1
    process_index = 0
    is_main_process = True

    def __init__(self, device: str | torch.device = "cpu", mixed_precision: str = "no"):
        self.device = torch.device(device)
        if mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
        # as accelerate: autocast on GPUs only, CPU always runs fp32
        self.mixed_precision = mixed_precision if self.device.type == "cuda" else "no"

    def autocast(self):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return tensor

    def wait_for_everyone(self) -> None:
        pass
