"""Flow training throughput: our trainer vs a loop with the official BGAD code's structure, side by side.

The reference mirrors the official ``train_meta_epoch`` minus its backbone call: per level, the 2-D positional
encoding is built and repeated for every image, the vectors are shuffled, and each 4096-vector fiber batch goes
through the FrEIA flow (``flow(x, c=[cond])``) in float32 with one Adam step. To be conservative it takes all
images of a level in one batch (the official loop takes 8 images at a time, which makes its small levels' steps
smaller and slower). Both arms run the same math (phase-1 ML loss, same flows, same step size) on the same
features; ours is ``bgad_core.models.bgad.training.BGADTraining`` as a trial runs it, in fp32 and with bf16
matmuls, with shuffled steps (the paper's) and with position-blocked ones (``cells_per_step``).

Each backbone's rows end with the matmul ceiling: how many times fewer multiply-adds a blocked step does than the
reference for the same function (``matmul_ceiling``). At equal matmul efficiency no fp32 implementation of this
math can be faster than that; only cheaper arithmetic (bf16 hardware, a GPU) can. On a CPU it also prints how
much faster each subnet matmul alone runs in bf16 than in fp32 (the ceiling bf16 can give).

    .venv/bin/python -m benchmarks.bench_flow [--images 32] [--sub-epochs 2] [--device cpu] [--no-bf16]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_accuracy import cpu_flags
from bgad_core.data.features import FeatureSet
from bgad_core.models.bgad.flow import log_likelihood
from bgad_core.models.bgad.losses import ml_loss
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.models.bgad.positional import positional_encoding_2d
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.training import BGADTraining

# Feature widths at strides 4/8/16 (timm features_only channels).
BACKBONE_WIDTHS = {"tf_efficientnet_lite0": (24, 40, 112), "tf_efficientnet_b6": (40, 72, 200)}
GRIDS = ((64, 64), (32, 32), (16, 16))  # 256 px input
FIBER_BATCH = 4096
BLOCK_CELLS = 64  # cells per position-blocked step
TRAINER_ARMS = {  # name: BGADConfig options of our trainer's arms
    "ours fp32": dict(precision="fp32"),
    "ours bf16": dict(precision="bf16"),
    f"ours fp32, blocks of {BLOCK_CELLS} cells": dict(precision="fp32", cells_per_step=BLOCK_CELLS),
}


def random_features(widths: tuple[int, ...], images: int) -> FeatureSet:
    """Normal-only training features shaped like a 256 px backbone output (values do not affect speed)."""
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(images, c, h, w, generator=generator).half() for c, (h, w) in zip(widths, GRIDS)]
    masks = [torch.zeros(images, h, w) for h, w in GRIDS]
    return FeatureSet(features, masks, torch.zeros(images, dtype=torch.long), [str(i) for i in range(images)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_sub_epoch(model: BGADFlows, optimizer: torch.optim.Optimizer, train: FeatureSet, device: torch.device) -> int:
    """One sub-epoch the official way; returns the number of feature vectors trained on."""
    vectors_seen = 0
    for level, feature in enumerate(train.features):
        batch, channels, height, width = feature.shape
        encoding = positional_encoding_2d(model.cond_dim, height, width).to(device).unsqueeze(0).repeat(batch, 1, 1, 1)
        conditions = encoding.reshape(batch, model.cond_dim, -1).transpose(1, 2).reshape(-1, model.cond_dim)
        vectors = feature.to(device).float().reshape(batch, channels, -1).transpose(1, 2).reshape(-1, channels)
        order = torch.randperm(len(vectors), device=device)
        for chunk in order.split(FIBER_BATCH):
            z, log_jac_det = model.flows[level](vectors[chunk], c=[conditions[chunk]])
            loss = ml_loss(log_likelihood(z, log_jac_det) / channels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            vectors_seen += len(chunk)
    return vectors_seen


def measure(
    widths: tuple[int, ...], images: int, sub_epochs: int, device: torch.device, arms: dict[str, dict]
) -> dict[str, float]:
    """Vectors/s of the reference loop and of the trainer's ``arms``, after one warm-up sub-epoch each."""
    train = random_features(widths, images)
    vectors_per_sub_epoch = images * sum(h * w for h, w in GRIDS)
    torch.manual_seed(0)
    reference_model = BGADFlows(widths).to(device)
    optimizer = torch.optim.Adam(reference_model.parameters(), lr=2e-4)
    reference_sub_epoch(reference_model, optimizer, train, device)
    sync(device)
    started = time.perf_counter()
    seen = sum(reference_sub_epoch(reference_model, optimizer, train, device) for _ in range(sub_epochs))
    sync(device)
    rates = {"reference fp32": seen / (time.perf_counter() - started)}
    for arm, options in arms.items():
        torch.manual_seed(0)
        config = BGADConfig(meta_epochs=sub_epochs + 1, sub_epochs=1, normal_epochs=sub_epochs + 1,
                            warmup_epochs=0, **options)
        trainer = BGADTraining(BGADFlows(widths), config, train, device)
        trainer.train_meta_epoch()
        sync(device)
        started = time.perf_counter()
        for _ in range(sub_epochs):
            trainer.train_meta_epoch()
        sync(device)
        rates[arm] = sub_epochs * vectors_per_sub_epoch / (time.perf_counter() - started)
    return rates


def coupling_macs(channels: int, cond_dim: int, condition_rows_per_vector: float) -> float:
    """Multiply-adds per vector of one AllInOneBlock coupling's forward: its subnet's two layers and the permutation.

    The subnet maps ``channels / 2`` features and the ``cond_dim`` condition to ``2 * (channels / 2 + cond_dim)``
    hidden units and back to ``channels``. ``condition_rows_per_vector`` is how many condition rows go through the
    first layer per vector: 1 in the reference, ``cells / vectors`` of a step for ours.
    """
    passive = channels - channels // 2
    hidden = 2 * (passive + cond_dim)
    return passive * hidden + condition_rows_per_vector * cond_dim * hidden + hidden * channels + channels * channels


def matmul_ceiling(widths: tuple[int, ...], images: int, cond_dim: int = 128) -> float:
    """Reference multiply-adds over a blocked step's, per sub-epoch (levels weighted by their vectors, ``GRIDS``).

    A blocked step of ``images`` images holds ``min(images, FIBER_BATCH // BLOCK_CELLS)`` of them, each at
    ``FIBER_BATCH`` / that many cells, and computes the condition term once per cell. Backward costs twice the
    forward in both arms, so the forward's ratio is the whole step's.
    """
    cells = [h * w for h, w in GRIDS]
    condition_rows = 1 / min(images, FIBER_BATCH // BLOCK_CELLS)
    reference = sum(n * coupling_macs(c, cond_dim, 1.0) for c, n in zip(widths, cells))
    blocked = sum(n * coupling_macs(c, cond_dim, condition_rows) for c, n in zip(widths, cells))
    return reference / blocked


def subnet_matmul_speedups(channels: int, vectors: int = FIBER_BATCH, repeats: int = 20) -> dict[str, float]:
    """bf16 / fp32 speed ratio of each matmul of one coupling subnet step (forward and both backward products).

    The subnet of a level with ``channels`` features maps ``channels / 2 + 128`` inputs to twice that many hidden
    units and back to ``channels`` outputs; this shows how much of the flow's work a bf16 matmul unit (AMX) can
    speed up at all, apart from the element-wise passes that stay memory-bound.
    """
    inputs = channels // 2 + 128
    hidden = 2 * inputs
    shapes = {  # name: (left, right) operand shapes of the product
        "forward 1": ((vectors, inputs), (inputs, hidden)),
        "weight grad 1": ((hidden, vectors), (vectors, inputs)),
        "input grad 1": ((vectors, hidden), (hidden, inputs)),
        "forward 2": ((vectors, hidden), (hidden, channels)),
        "weight grad 2": ((channels, vectors), (vectors, hidden)),
        "input grad 2": ((vectors, channels), (channels, hidden)),
    }
    ratios = {}
    for name, (left, right) in shapes.items():
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(left, dtype=dtype), torch.randn(right, dtype=dtype)
            a @ b
            started = time.perf_counter()
            for _ in range(repeats):
                a @ b
            seconds[dtype] = time.perf_counter() - started
        ratios[name] = seconds[torch.float32] / seconds[torch.bfloat16]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="training images (256 px) per sub-epoch")
    parser.add_argument("--sub-epochs", type=int, default=2, help="timed sub-epochs per arm, after one warm-up")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip the bf16 arm and the bf16 matmul table "
                             "(without bf16 hardware they take most of the run)")
    args = parser.parse_args()
    arms = {arm: options for arm, options in TRAINER_ARMS.items()
            if not (args.no_bf16 and options["precision"] == "bf16")}
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_flags()
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.images} images x {sum(h * w for h, w in GRIDS)} vectors per sub-epoch, fiber batch {FIBER_BATCH}")
    print("| backbone widths | arm | vectors/s | vs reference |")
    print("|---|---|---|---|")
    for backbone, widths in BACKBONE_WIDTHS.items():
        rates = measure(widths, args.images, args.sub_epochs, device, arms)
        base = rates["reference fp32"]
        for arm, rate in rates.items():
            print(f"| {backbone} {widths} | {arm} | {rate:,.0f} | {rate / base:.2f}x |", flush=True)
        print(f"| {backbone} {widths} | matmul ceiling of the same math, blocked steps | | "
              f"{matmul_ceiling(widths, args.images):.2f}x |", flush=True)
    if device.type == "cpu" and not args.no_bf16:
        widths = sorted(set(BACKBONE_WIDTHS["tf_efficientnet_lite0"] + BACKBONE_WIDTHS["tf_efficientnet_b6"]))
        print(f"\nbf16 speed-up of the subnet matmuls alone (fp32 time / bf16 time), {FIBER_BATCH} vectors:")
        table = {channels: subnet_matmul_speedups(channels) for channels in widths}
        products = list(table[widths[0]])
        print("| channels | " + " | ".join(products) + " |")
        print("|---" * (len(products) + 1) + "|")
        for channels, ratios in table.items():
            print(f"| {channels} | " + " | ".join(f"{ratio:.1f}x" for ratio in ratios.values()) + " |")


if __name__ == "__main__":
    main()
