"""WINA's output-preserving transform: make the key and gate projections column-orthogonal.

Why: WINA's criterion ``|x_i| * ||W[:, i]||`` is the optimal (output-error-minimising) choice when
the columns of W are orthogonal. For the input group of the attention (q/k/v) and of the MLP
(gate/up) we

1. fold the RMSNorm scale ``g`` into the following linears (``W <- W diag(g)``, norm weight 1);
2. take the SVD of the folded key (gate) projection, ``W_k = U S V^T``, and rotate the whole
   group's input by ``Q = V``: every linear of the group becomes ``W' = W Q`` and reads
   ``x' = Q^T x``, so ``W' x' = W x`` exactly (Q orthogonal), and ``W_k' = U S`` has orthogonal
   columns with norms ``S``.

SliceGPT folds such rotations into the residual stream (embedding, output projections and
shortcut matrices between blocks). Here the rotation is applied to the input of the group (the
wrapper's ``input_rotation``, one ``K x K`` matmul per group and token), which keeps the HF
module graph unchanged at the price of that matmul; see docs/ACTIVATION_SPARSITY.md.
"""

from __future__ import annotations

import torch
from torch import nn

# (norm attribute, linears reading its output, the one whose SVD defines the rotation)
TRANSFORM_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.k_proj"),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_proj"),
)


def group_rotation(folded_key: torch.Tensor) -> torch.Tensor:
    """``V`` (float64 ``[K, K]``, orthogonal) of the SVD ``W = U S V^T``: ``W V = U S`` has orthogonal columns.

    Columns beyond the rank of W complete the basis (their norms in ``W V`` are zero).
    """
    _, _, vh = torch.linalg.svd(folded_key.double(), full_matrices=True)
    return vh.t().contiguous()


def transform_layer(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Fold the norms and rotate the q/k/v and gate/up weights of one decoder layer in place.

    The linears must be plain ``nn.Linear`` (dense). Returns ``{child name: rotation [K, K]}``
    (float64; the same matrix for every member of a group): each linear must then be fed
    ``x @ R`` (the wrapper's ``input_rotation``) for the layer to compute what it computed before.
    """
    rotations: dict[str, torch.Tensor] = {}
    for norm_name, members, key in TRANSFORM_GROUPS:
        norm = getattr(layer, norm_name)
        linears = {name: layer.get_submodule(name) for name in members}
        for name, lin in linears.items():
            if type(lin) is not nn.Linear:
                raise TypeError(f"the WINA transform needs dense nn.Linear {name}, got {type(lin).__name__} "
                                "(put quantization after the transform)")
        scale = norm.weight.detach().double()
        folded = {name: lin.weight.detach().double() * scale for name, lin in linears.items()}
        rotation = group_rotation(folded[key])
        with torch.no_grad():
            for name, lin in linears.items():
                lin.weight.copy_((folded[name] @ rotation).to(lin.weight.dtype))
                rotations[name] = rotation
            norm.weight.fill_(1.0)
    return rotations
