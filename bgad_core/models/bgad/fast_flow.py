"""The same conditional flow as ``flow.build_flow``, evaluated faster on position-conditioned feature vectors.

FrEIA's ``AllInOneBlock`` feeds ``cat(x1, c)`` to its subnet's first ``Linear`` in every coupling. Here the
condition ``c`` is a 2-D positional encoding, so it takes only H*W distinct values, while a training step holds
thousands of vectors (and an evaluation batch repeats every position once per image). Splitting that ``Linear``
as ``W_x x1 + (W_c c + b)`` lets the condition term be computed once per distinct position and gathered, which
is the same function of the same parameters with most of the subnet's FLOPs (and their backward) gone. The
flow's parameters stay those of the FrEIA model: checkpoints and the FrEIA definition are unchanged, and the
tests check output and log-det against FrEIA.

Optionally the subnets' matmuls run in bfloat16 while the coupling, the permutation, the log-determinant and the
log-likelihood stay float32: the feature path and log|det J| carry no bf16 rounding (with the permutation in bf16
too, the error on log p(x) grew tenfold for about 10 % more speed).
"""

from __future__ import annotations

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import nn

from bgad_core.models.bgad.flow import log_likelihood

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_supported(flow: Ff.SequenceINN) -> None:
    """Fail loudly if ``flow`` is not the AllInOneBlock stack that ``positioned_log_likelihood`` reproduces."""
    for index, block in enumerate(flow.module_list):
        subnet = getattr(block, "subnet", None)
        supported = (
            isinstance(block, Fm.AllInOneBlock)
            and not block.GIN
            and not block.householder
            and not block.reverse_pre_permute
            and isinstance(subnet, nn.Sequential)
            and len(subnet) == 3
            and isinstance(subnet[0], nn.Linear)
            and isinstance(subnet[1], nn.ReLU)
            and isinstance(subnet[2], nn.Linear)
        )
        if not supported:
            layers = [type(m).__name__ for m in subnet] if isinstance(subnet, nn.Sequential) else type(subnet).__name__
            raise TypeError(
                f"fast evaluation supports the AllInOneBlock flow of build_flow only, got block {index}: "
                f"{type(block).__name__} with subnet {layers}"
            )


def positioned_log_likelihood(
    flow: Ff.SequenceINN,
    vectors: torch.Tensor,
    conditions: torch.Tensor,
    index: torch.Tensor,
    precision: str = "fp32",
) -> torch.Tensor:
    """log p(x) of ``(N, C)`` vectors whose condition is ``conditions[index]``; equals FrEIA's ``flow(x, c=[...])``.

    Args:
        flow: a flow from ``build_flow`` (its parameters are used as they are, gradients flow into them).
        vectors: feature vectors, float32.
        conditions: ``(P, cond_dim)`` distinct conditions (positional encodings), P usually << N.
        index: ``(N,)`` row of ``conditions`` for each vector.
        precision: "fp32", or "bf16" for bfloat16 subnet matmuls (feature path and log-det stay float32).
    """
    dtype = PRECISIONS[precision]
    x = vectors
    log_det = vectors.new_zeros(vectors.shape[0])
    for block in flow.module_list:
        x1, x2 = x.split(block.splits, dim=1)
        # subnet(cat(x1, c)): the x1 term is accumulated in place into the gathered condition term (the
        # out-of-place addmm would first copy that (N, hidden) tensor, which costs as much as the bf16 matmul)
        hidden = gather_rows(condition_term(block, conditions, dtype), index)
        hidden = hidden.addmm_(x1.to(dtype), input_weight(block).to(dtype).t()).relu_()
        x, block_log_det = coupling_output(block, x1, x2, hidden, dtype)
        log_det = log_det + block_log_det
    return log_likelihood(x, log_det)


def grid_log_likelihood(
    flow: Ff.SequenceINN, vectors: torch.Tensor, tables: list[torch.Tensor], precision: str = "fp32"
) -> torch.Tensor:
    """log p(x), float32, of ``(B * P, C)`` vectors: B images, each with one vector per position, in table order.

    The blocked form of ``positioned_log_likelihood``: every image holds the same P positions, so each block's
    condition term (``condition_tables``, ``(P, hidden)``) is added to its images by broadcasting instead of a
    gather, and its gradient is a sum over images. For trained flows over a whole grid the tables are constants,
    which makes this a plain function of the features: it is what evaluation, the served model and the exported
    ONNX graph all compute. Training's position-blocked steps (a few cells of many images) use it too.

    Args:
        flow: a flow from ``build_flow``.
        vectors: float32 feature vectors, image-major (row ``i * P + p`` is image i at position p).
        tables: each block's condition term for the P positions, in ``precision``'s dtype.
        precision: "fp32", or "bf16" for bfloat16 subnet matmuls (feature path and log-det stay float32).
    """
    dtype = PRECISIONS[precision]
    x = vectors
    log_det: torch.Tensor | float = 0.0
    for block, table in zip(flow.module_list, tables):
        x1, x2 = x.split(block.splits, dim=1)
        hidden = F.linear(x1.to(dtype), input_weight(block).to(dtype)).view(-1, *table.shape)
        # Evaluation adds the table in place (no (N, hidden) copy). Training adds out of place and runs the ReLU in
        # place on that new tensor, never on a view: autograd records an in-place op on a view as a copy of the
        # whole base (CopySlices), which made training steps 4x slower.
        hidden = hidden.add_(table) if not torch.is_grad_enabled() else hidden + table
        hidden = hidden.relu_().view(-1, table.shape[1])
        x, block_log_det = coupling_output(block, x1, x2, hidden, dtype)
        log_det = log_det + block_log_det
    return log_likelihood(x, log_det)


def condition_tables(flow: Ff.SequenceINN, conditions: torch.Tensor, precision: str = "fp32") -> list[torch.Tensor]:
    """Each block's condition term ``W_c c + b`` for ``(P, cond_dim)`` conditions (see ``condition_term``)."""
    return [condition_term(block, conditions, PRECISIONS[precision]) for block in flow.module_list]


def condition_term(block: Fm.AllInOneBlock, conditions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W_c c + b``: the part of the block's first subnet layer that depends on the condition only, ``(P, hidden)``."""
    first = block.subnet[0]
    weight_c = first.weight[:, block.splits[0] :]
    return F.linear(conditions.to(dtype), weight_c.to(dtype), first.bias.to(dtype))


def input_weight(block: Fm.AllInOneBlock) -> torch.Tensor:
    """``W_x``: the columns of the block's first subnet layer that multiply the coupling's passive half x1."""
    return block.subnet[0].weight[:, : block.splits[0]]


def coupling_output(
    block: Fm.AllInOneBlock, x1: torch.Tensor, x2: torch.Tensor, hidden: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's output and log|det J| from its halves and its subnet's hidden layer ``relu(W_x x1 + W_c c + b)``.

    The subnet's second layer runs in ``dtype``; the coupling, the permutation and the log-determinant in float32.
    """
    second = block.subnet[2]
    split_x, split_2 = block.splits
    # FrEIA scales the subnet output by 0.1; scaling the weights instead spares a pass over (N, C)
    a = F.linear(hidden, (0.1 * second.weight).to(dtype), (0.1 * second.bias).to(dtype)).float()
    log_scale = block.clamp * torch.tanh(a[:, :split_2])
    x2 = x2 * torch.exp(log_scale) + a[:, split_2:]
    # global affine then soft permutation, (cat(x1, x2) * s + o) @ W.T, as y @ (W * s).T + W @ o without the cat
    scale = block.global_scale_activation(block.global_scale)
    mixing = (block.w_perm * scale).t()
    x = torch.addmm(block.w_perm @ block.global_offset[0], x1, mixing[:split_x]).addmm_(x2, mixing[split_x:])
    return x, log_scale.sum(dim=1) + torch.log(scale).sum()


class _GatherRows(torch.autograd.Function):
    """``table[index]`` whose backward sums the gradients of repeated rows in float32.

    Autograd's own backward of a gather (a scatter-add in the table's dtype) is slow on CPU and, in bfloat16,
    sums a position's dozens of gradient rows with 8-bit mantissas.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        summed = grad.new_zeros((ctx.rows, grad.shape[1]), dtype=torch.float32)
        return summed.index_add_(0, index, grad.float()).to(grad.dtype), None


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``table``, differentiable in ``table`` (see ``_GatherRows``)."""
    return _GatherRows.apply(table, index)


def distinct_positions(cells: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a ``(H*W, cond_dim)`` position table used by ``cells`` and each cell's row among them."""
    used, index = torch.unique(cells, return_inverse=True)
    return table[used], index
