"""Distance to the nearest normal patch: PatchCore's evidence, as a memory bank any family can hold.

A memory bank keeps a greedy coreset of the patch embeddings (``cells.patch_embeddings``) of training normals; a
cell's anomaly evidence is its embedding's Euclidean distance to the nearest bank entry. PatchCore scores with
nothing else (``bgad_core.models.patchcore``); BGAD may add it to its flows' likelihoods
(``NearestNormal``, ``bgad_core.models.bgad.scoring``), because the two fail differently: on held-out solar cells a
no-label PatchCore read 0.910 test image AUROC where BGAD-FAS's flows read 0.826 on the same features.

Distances are written in operations the ONNX tracer follows (matrix products, ``topk``), so that PyTorch and an
exported graph run the same code.

    >>> import torch
    >>> normals = [torch.randn(16, 8, 8, 8), torch.randn(16, 16, 4, 4)]
    >>> nearest = NearestNormal().fit(normals, coreset_ratio=0.1)
    >>> nearest(normals).shape, nearest.bank.shape
    (torch.Size([16, 8, 8]), torch.Size([102, 24]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bgad_core.data.features import FeatureSet
from bgad_core.errors import ConfigError
from bgad_core.models.components.cells import patch_embeddings

PROJECTION_DIM = 128  # k-center distances are computed on a random projection of this width (enough to rank)
DISTANCE_CHUNK = 8192  # query patches per distance block in eager mode: bounds memory at 8192 x bank size floats


def greedy_coreset(embeddings: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Indices (on the CPU) of ``count`` rows chosen by greedy k-center selection (each pick is the row farthest
    from the set).

    Distances are measured on a Gaussian random projection to ``PROJECTION_DIM`` dims (Johnson-Lindenstrauss: the
    ranking of distances is kept), as in the PatchCore paper, which makes each pick one vector-matrix product. The
    points are held as columns, ``(dims, rows)``: a pick then streams them once, where a matrix of rows times the
    pick took 3.2x as long on one CPU thread (144,384 DeepPCB patches: 3.0 against 9.7 ms a pick;
    ``benchmarks/bench_memory_bank.py`` measures both). The random draws come from a CPU generator, so a seed
    picks the same first row on any device.
    """
    total = embeddings.shape[0]
    if count >= total:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(seed)
    if embeddings.shape[1] > PROJECTION_DIM:
        projection = torch.randn(embeddings.shape[1], PROJECTION_DIM, generator=generator) / PROJECTION_DIM**0.5
        columns = (embeddings @ projection.to(embeddings)).T.contiguous()
    else:
        columns = embeddings.T.contiguous()
    squared = (columns * columns).sum(dim=0)
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = torch.randint(total, (1,), generator=generator)
    nearest = torch.full((total,), float("inf"), dtype=columns.dtype, device=columns.device)
    for i in range(1, count + 1):
        center = columns[:, chosen[i - 1]]
        distance = squared - 2 * (center @ columns) + squared[chosen[i - 1]]
        torch.minimum(nearest, distance, out=nearest)
        if i < count:
            chosen[i] = torch.argmax(nearest)
    return chosen


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances ``(Q, k)`` (ascending) and indices of each query's ``k`` nearest bank rows.

    Eager calls work in blocks of ``DISTANCE_CHUNK`` queries so that the distance matrix stays small; a traced call
    (ONNX export) is one block, as a block count fixed at trace time would fix the batch size too.
    """
    if torch.jit.is_tracing() or queries.shape[0] <= DISTANCE_CHUNK:
        return _nearest_block(queries, bank, k)
    blocks = [_nearest_block(block, bank, k) for block in queries.split(DISTANCE_CHUNK)]
    return torch.cat([d for d, _ in blocks]), torch.cat([i for _, i in blocks])


def _nearest_block(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nearest_distances`` of one block (``squared_distances``), then ``topk``."""
    distances, indices = squared_distances(queries, bank).topk(k, dim=1, largest=False)
    return distances.sqrt(), indices


def squared_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``(Q, B)`` squared Euclidean distances ``|q|^2 - 2 q.b + |b|^2`` by one matrix product (what ``torch.cdist``
    does for large inputs, in operators every ONNX runtime has), clamped at 0 against rounding. The product is
    written into ``|b|^2`` and the rest added in place: one ``(Q, B)`` matrix, where three temporaries took 2.5x as
    long (8,192 DeepPCB patches against 14,438 bank rows, one thread: 0.7 against 1.8 s)."""
    squared = torch.addmm((bank * bank).sum(dim=1), queries, bank.T, alpha=-2)
    return squared.add_((queries * queries).sum(dim=1, keepdim=True)).clamp_min_(0)


def left_out_distances(patches: torch.Tensor, images: int, bank: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Each cell's distance to the nearest bank row that another image gave: what a new normal image would read.

    ``patches``: ``(images * cells, C)``, image by image; ``sources``: ``(B,)`` the image each bank row came from.
    A cell of an image that gave every bank row reads ``inf``.
    """
    cells = patches.shape[0] // images
    per_block = max(1, DISTANCE_CHUNK // cells)
    blocks = []
    for first in range(0, images, per_block):
        rows = torch.arange(first, min(images, first + per_block), device=patches.device)
        squared = squared_distances(patches[first * cells:(first + len(rows)) * cells], bank)
        own = rows.repeat_interleave(cells)[:, None] == sources[None, :]
        blocks.append(squared.masked_fill_(own, float("inf")).min(dim=1).values.sqrt())
    return torch.cat(blocks)


EMBEDDING_BATCH = 64  # images per patch-embedding pass while filling a bank (bounds memory on large sets)


def flat_patches(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(N * H * W, C)`` patch embeddings of every cell of every image (all levels, at the finest grid), image by
    image, ``EMBEDDING_BATCH`` images at a time."""
    images = torch.arange(features[0].shape[0])
    embeddings = [patch_embeddings([level[batch.to(level.device)] for level in features])
                  for batch in images.split(EMBEDDING_BATCH)]
    return torch.cat([e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]) for e in embeddings])


def bank_size(patches: torch.Tensor, coreset_ratio: float) -> int:
    """How many of ``patches``' rows a bank keeping ``coreset_ratio`` of them holds (at least one)."""
    return max(1, round(patches.shape[0] * coreset_ratio))


def _normal_patches(normals: Sequence[torch.Tensor], coreset_ratios: Sequence[float]) -> tuple[torch.Tensor, int]:
    """``flat_patches`` of the training normals and their number, once the shares are checked."""
    for ratio in coreset_ratios:
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"nearest-normal coreset_ratio must lie in (0, 1], got {ratio}")
    images = normals[0].shape[0]
    if images == 0:
        raise ConfigError("nearest-normal distances need at least one training normal")
    return flat_patches(normals), images


class NearestNormal(nn.Module):
    """Each cell's distance to the nearest training-normal patch, standardised: ``(d - mean) / std``.

    ``bank``: a greedy coreset (``coreset_ratio`` of the patches, PatchCore's 1 % by default) of the patch
    embeddings of every training normal, PatchCore's bank. ``mean`` and ``std``: of every training normal's cells'
    distances to the bank rows the *other* images gave (``left_out_distances``), which is what a new normal image
    reads: a training normal's distance to a bank that holds it is zero and would say nothing about a new one. (A
    single training normal calibrates on itself.) The standardised distance reads like BGAD's standardised
    log-likelihoods, "how many normal deviations above a normal cell", so the two can be averaged.
    ``calibration_distances``: after ``fit``, those standardised distances, flat (kept for training, which sets
    thresholds on them; not saved).

    Why every normal in the bank: an earlier bank left every 8th training normal out to calibrate on, and on DeepPCB
    board_a (141 training normals, every image a different board region) its map read test image AUROC / pixel
    AUROC / PRO 0.697 / 0.844 / 0.567 where PatchCore's read 0.741 / 0.871 / 0.595; with every normal in the bank
    (same features, coreset and blur) 0.731 / 0.871 / 0.595, PatchCore's map (its image score differs by its
    re-weighting). Where normal images differ from each other, each one left out is evidence lost. At the 1 %
    coreset which patches are sampled still moves the map either way (board_b: 0.847 test pixel AUROC with every
    normal, 0.912 without every 8th, 0.927 at a 10 % coreset; ``benchmarks/bench_memory_bank.py``).
    """

    bank: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bank", torch.empty(0))
        self.register_buffer("mean", torch.tensor(0.0))
        self.register_buffer("std", torch.tensor(1.0))
        self.calibration_distances = torch.empty(0)

    @torch.no_grad()
    def fit(self, normals: Sequence[torch.Tensor], coreset_ratio: float = 0.01, seed: int = 0) -> NearestNormal:
        """Fill the bank and measure the calibration from every level's ``(N, C_l, H_l, W_l)`` features of N
        training normals (on their device)."""
        patches, images = _normal_patches(normals, (coreset_ratio,))
        return self._fill(patches, images, greedy_coreset(patches, bank_size(patches, coreset_ratio), seed))

    def _fill(self, patches: torch.Tensor, images: int, chosen: torch.Tensor) -> NearestNormal:
        """The bank of the ``chosen`` rows of ``images`` normals' ``patches`` (``flat_patches``), and its
        calibration."""
        chosen = chosen.to(patches.device)
        self.bank = patches[chosen].contiguous()
        distances = left_out_distances(patches, images, self.bank, chosen // (patches.shape[0] // images))
        distances = distances[distances.isfinite()]
        if distances.numel() == 0:  # one image gave the whole bank (a single normal): it calibrates on itself
            distances = nearest_distances(patches, self.bank)[0]
        self.mean = distances.mean().reshape(())
        self.std = distances.std().clamp_min(1e-6).reshape(()) if distances.numel() > 1 else torch.ones_like(self.mean)
        self.calibration_distances = ((distances - self.mean) / self.std).flatten().cpu()
        return self

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Standardised nearest-normal distances ``(B, H, W)`` at the finest level's grid, in float32."""
        if self.bank.numel() == 0:
            raise ConfigError("nearest-normal distances: fit() the memory bank before scoring")
        embedding = patch_embeddings(features)
        batch, channels, height, width = embedding.shape
        distance = nearest_distances(embedding.permute(0, 2, 3, 1).reshape(-1, channels), self.bank)[0]
        return (distance.reshape(batch, height, width) - self.mean) / self.std

    @torch.no_grad()
    def predict(self, split: FeatureSet, device: torch.device | str = "cpu", batch_size: int = 32) -> torch.Tensor:
        """``forward`` over every row of ``split`` in batches, returned on the CPU."""
        return torch.cat([self([f[start:start + batch_size].to(device) for f in split.features]).cpu()
                          for start in range(0, len(split), batch_size)])

    def to_dict(self) -> dict[str, torch.Tensor | float]:
        """The bank (a tensor) and the calibration (floats), for a ``weights_only`` checkpoint."""
        return {"bank": self.bank.detach().cpu(), "mean": float(self.mean), "std": float(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, torch.Tensor | float]) -> NearestNormal:
        """The inverse of ``to_dict``."""
        nearest = cls()
        nearest.bank = torch.as_tensor(values["bank"], dtype=torch.float32)
        nearest.mean = torch.tensor(float(values["mean"]))
        nearest.std = torch.tensor(float(values["std"]))
        return nearest


@torch.no_grad()
def fit_banks(normals: Sequence[torch.Tensor], coreset_ratios: Sequence[float], seed: int = 0) -> list[NearestNormal]:
    """One ``NearestNormal`` per share in ``coreset_ratios``, from one greedy run.

    Greedy k-center's first k picks do not depend on how many follow, so a smaller bank is the first rows of the
    larger one's coreset, the very rows its own run would pick: a 1 % and a 10 % bank cost the 10 % bank's fill and
    two calibrations. (A share that keeps every row takes every row.)
    """
    patches, images = _normal_patches(normals, coreset_ratios)
    sizes = [bank_size(patches, ratio) for ratio in coreset_ratios]
    greedy = [size for size in sizes if size < patches.shape[0]]
    picks = greedy_coreset(patches, max(greedy), seed) if greedy else torch.empty(0, dtype=torch.long)
    return [NearestNormal()._fill(patches, images, picks[:size] if size < patches.shape[0]
                                  else torch.arange(patches.shape[0])) for size in sizes]
