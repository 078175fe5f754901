"""Global training batches as sharded arrays, each process building only its own devices' rows."""

from __future__ import annotations

import jax
import numpy as np

from qstar_jax.errors import UserError
from qstar_jax.models import sharding
from qstar_jax.training import data

# A random init trains its tokenizer on at most this many leading training documents.
TOKENIZER_DOCUMENTS = 50_000


class Batches:
    """Global (tokens, segments) batches as sharded arrays, A x B x N; each process builds
    (reads and tokenises) only the rows of its own devices, each once per step."""

    def __init__(self, rows: data.Rows, accum: int, batch: int, mesh):
        if batch <= 0 or accum <= 0 or batch % accum:
            raise UserError(f"batch_size {batch} must be a positive multiple of grad_accum {accum}")
        self.rows, self.accum, self.micro = rows, accum, batch // accum
        self.sharding = sharding.batch_sharding(mesh)
        self.shape = (accum, self.micro, rows.seq_len)
        width = mesh.shape["data"] * mesh.shape["fsdp"]
        if self.micro % width:
            raise UserError(f"micro-batch of {self.micro} sequences does not split over data x fsdp = {width}")

    def __call__(self, step: int) -> tuple[jax.Array, jax.Array]:
        built: dict[int, data.Row] = {}  # devices that share rows (tensor axis) share the work

        def row(index: int) -> data.Row:
            if index not in built:
                built[index] = self.rows[index]
            return built[index]

        def field(name):
            def callback(index):
                acc, rows, _ = (range(*s.indices(n)) for s, n in zip(index, self.shape))
                first = step * self.accum * self.micro
                return np.stack([np.stack([getattr(row(first + a * self.micro + r), name) for r in rows])
                                 for a in acc])
            return callback

        return (jax.make_array_from_callback(self.shape, self.sharding, field("tokens_N")),
                jax.make_array_from_callback(self.shape, self.sharding, field("segments_N")))
