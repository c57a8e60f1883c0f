"""The trainable token rows of an inversion: how the N stages' tokens are parameterised.

``free``: N independent rows per vector; ``shared``: a token every stage shares plus each stage's
difference; ``mapper``: the official ProSpect code's form, a small transformer block from the
initializer's embedding to the N rows. ``ConceptRows`` puts them in a text encoder's place of its
input embeddings, so the frozen encoder reads them as ordinary tokens.
"""

from __future__ import annotations

import torch


class ConceptRows(torch.nn.Module):
    """Input-embedding layer: the frozen table, with the concept's rows read from trainable tensors.

    ``stages`` > 0 couples the stages (``parameterization="shared"``): row (k, v) = shared[v] + delta[k, v],
    so what every stage needs is learned from the whole batch and each stage learns only its difference.
    With a ``mapper`` (``parameterization="mapper"``) the rows are its output.
    """

    def __init__(self, base: torch.nn.Embedding, token_ids: list[int], rows: torch.Tensor, stages: int = 0,
                 mapper: torch.nn.Module | None = None):
        super().__init__()
        self.base = base
        self.mapper = mapper  # parameterization="mapper": the rows are its output
        if mapper is not None:
            self.shared = self.delta = None
        elif stages:
            per_stage = rows.reshape(stages, -1, rows.shape[-1])
            self.shared = torch.nn.Parameter(per_stage.mean(0).clone())
            self.delta = torch.nn.Parameter((per_stage - per_stage.mean(0)).reshape(rows.shape).clone())
        else:
            self.shared = None
            self.delta = torch.nn.Parameter(rows.clone())
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long)
        slot[torch.tensor(token_ids)] = torch.arange(len(token_ids))
        self.register_buffer("slot", slot, persistent=False)

    @property
    def rows(self) -> torch.Tensor:
        """The concept's rows, in ``Concept.tokens()`` order."""
        if self.mapper is not None:
            return self.mapper()
        if self.shared is None:
            return self.delta
        vectors = self.shared.shape[0]
        return (self.delta.reshape(-1, vectors, self.delta.shape[-1]) + self.shared).reshape(self.delta.shape)

    def parts(self) -> dict[str, torch.nn.Parameter]:
        """The trainable tensors by checkpoint name: the rows (free), the shared part and the deltas, or the mapper's."""
        if self.mapper is not None:
            return {f"mapper.{name}": p for name, p in self.mapper.named_parameters()}
        return {"rows": self.delta} if self.shared is None else {"shared": self.shared, "delta": self.delta}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        slot = self.slot.to(input_ids.device)[input_ids]
        picked = self.rows.to(out.dtype)[slot.clamp(min=0)]
        return torch.where((slot >= 0).unsqueeze(-1), picked, out)


class StageMapper(torch.nn.Module):
    """The official code's form of the learned tokens: one transformer block maps the initial rows (the initializer's
    embedding), each with a learned position, to the N x V rows. The output layer starts at zero, so training starts
    from the initializer exactly as the free rows do."""

    def __init__(self, start: torch.Tensor):
        super().__init__()
        width = start.shape[-1]
        self.register_buffer("start", start.detach().clone(), persistent=False)
        self.position = torch.nn.Parameter(torch.randn_like(start) * start.norm(dim=-1).mean() * 0.1)
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attention = torch.nn.MultiheadAttention(width, 1, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))
        self.out = torch.nn.Linear(width, width)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self) -> torch.Tensor:
        h = (self.start + self.position)[None]
        x = self.norm1(h)
        h = h + self.attention(x, x, x, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.start + self.out(h)[0]


def roughness(rows: torch.Tensor, num_stages: int) -> torch.Tensor:
    """Mean squared distance between the tokens of neighbouring stages (each vector to its own), 0 for one stage."""
    per_stage = rows.reshape(num_stages, -1, rows.shape[-1]).float()
    return (per_stage[1:] - per_stage[:-1]).pow(2).sum(-1).mean() if num_stages > 1 else per_stage.sum() * 0
