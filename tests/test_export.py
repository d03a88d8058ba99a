"""The promoted model as one ONNX graph: onnxruntime scores like the registry's pyfunc, in any batch, and a layer
that cannot be exported is named."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from bgad_core.backbone import FeatureExtractor
from bgad_core.engine.checkpoint import load_checkpoint
from bgad_core.data.datasets import load_image
from bgad_core.engine.export import Agreement, ExportableScorer, ExportError, export_onnx
from bgad_core.engine.inference import Scorer
from registry_fixtures import CATEGORY, SWEEP_ID
from sweeper.export import DIGEST_TAG, ONNX_TAG, check_agreement, load_source, main
from sweeper.promote import promote

NAME = "bgad-tiles"
MODEL_URI = f"models:/{NAME}@champion"


@torch.library.custom_op("bgad_test::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    """An operator no ONNX exporter knows."""
    return x.clone()


class Opaque(nn.Module):
    """A backbone layer wrapped in an operator the exporter cannot convert."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return opaque(self.inner(x))


@dataclass(frozen=True)
class Registered:
    version: str  # of the promoted champion
    folder: Path  # its model folder as downloaded after the export: the pyfunc, and onnx/


@pytest.fixture(scope="module")
def registered(recorded, tmp_path_factory) -> Registered:
    """Promote the recorded trial, export the champion with the command line, download the version's folder."""
    version = promote(recorded.tracking_uri, SWEEP_ID, NAME).version
    output = tmp_path_factory.mktemp("export")
    assert main([MODEL_URI, "--format", "onnx", "--output", str(output), "--tracking-uri", recorded.tracking_uri]) == 0
    client = MlflowClient(recorded.tracking_uri, registry_uri=recorded.tracking_uri)
    location = client.get_model_version_download_uri(NAME, version)
    folder = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(output / "download"))
    return Registered(version, Path(folder))


def fresh_scorer(recorded) -> Scorer:
    """The recorded trial's model, built anew (tests below break it on purpose)."""
    checkpoint = load_checkpoint(Path(recorded.root) / "train" / "model.pt")
    return Scorer(checkpoint, FeatureExtractor("tf_efficientnet_lite0", "offline", (4, 8, 16)))


def test_onnxruntime_scores_the_test_images_like_the_registered_pyfunc(recorded, registered):
    paths = sorted(Path(recorded.category_dir, "test").rglob("*.png"))
    images = np.stack([load_image(p, None) for p in paths])
    pyfunc = mlflow.pyfunc.load_model(str(registered.folder))
    expected = pyfunc.predict(pd.DataFrame({"image": [Path(p) for p in paths]}))
    graph = registered.folder / "onnx" / "model.onnx"
    onnx.checker.check_model(str(graph), full_check=True)
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    scores, maps, decisions = session.run(None, {"images": images})
    assert len(paths) >= 7
    # per unit of score, as detector_checks: two float32 paths through the backbone differ in relative terms (a map
    # of nearest-normal distances alone reads scores up to ~13 here, which differed by 1.1e-4)
    scale = max(1.0, float(np.abs(expected["score"].to_numpy()).max()))
    assert np.abs(scores - expected["score"].to_numpy()).max() < 1e-4 * scale
    assert np.abs(maps - np.stack(expected["map"].to_list())).max() < 1e-3 * scale
    # decisions agree wherever the score is clear of the threshold by more than the scores' stated tolerance
    threshold = float({p.key: p.value for p in onnx.load(str(graph)).metadata_props}["bgad.threshold"])
    clear = np.abs(expected["score"].to_numpy() - threshold) > 1e-4 * scale
    assert clear.sum() >= len(paths) - 2
    assert decisions[clear].tolist() == expected["decision"].to_numpy()[clear].tolist()
    alone = np.concatenate([session.run(["score"], {"images": images[i : i + 1]})[0] for i in range(7)])
    seven = session.run(["score"], {"images": images[:7]})[0]
    assert np.abs(alone - seven).max() < 1e-6


def test_the_version_records_the_file_its_digest_and_a_readme(recorded, registered):
    version = MlflowClient(recorded.tracking_uri).get_model_version(NAME, registered.version)
    graph = registered.folder / "onnx" / "model.onnx"
    assert version.tags[ONNX_TAG] == "onnx/model.onnx"
    assert version.tags[DIGEST_TAG] == hashlib.sha256(graph.read_bytes()).hexdigest()
    properties = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
    assert float(properties["bgad.threshold"]) == pytest.approx(float(version.tags["bgad.threshold"]))
    assert properties["bgad.source"] == f"models:/{NAME}/{registered.version} (alias champion)"
    inputs = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).get_inputs()
    assert [(i.name, i.type, i.shape) for i in inputs] == [("images", "tensor(uint8)", ["batch", 64, 64, 3])]
    readme = (registered.folder / "onnx" / "README.md").read_text()
    assert "`[batch, 64, 64, 3]` (NHWC), RGB" in readme
    assert f"`score >= {properties['bgad.threshold']}`" in readme


def test_a_backbone_layer_the_exporter_cannot_convert_is_named(recorded, tmp_path):
    scorer = fresh_scorer(recorded)
    block = scorer.extractor.model.blocks[1][0]
    block.conv_pw = Opaque(block.conv_pw)
    with pytest.raises(ExportError) as failure:
        export_onnx(ExportableScorer(scorer), tmp_path / "model.onnx")
    message = str(failure.value)
    assert "layer 'scorer.extractor.model.blocks.1.0.conv_pw' (Opaque, in the backbone)" in message
    assert "bgad_test::opaque" in message and "\n" not in message
    assert not (tmp_path / "model.onnx").exists()
    assert (tmp_path / "model.onnx.export.log").stat().st_size > 0


def test_a_flow_the_export_cannot_reproduce_is_refused_naming_its_block(recorded):
    scorer = fresh_scorer(recorded)
    scorer.detector.flows.flows[1].module_list[1].subnet[1] = nn.GELU()
    with pytest.raises(ExportError, match=r"flow of level 1 \(flows\.flows\.1\).*block 1.*'GELU'"):
        ExportableScorer(scorer)


def test_agreement_is_judged_per_unit_of_score(tmp_path):
    # a distances-alone model scores ~13 on the generated images; float32 paths then differ by ~1e-4 (test above)
    close = Agreement(images=3, score_error=1.1e-4, map_error=5e-3, decisions_equal=True, batch_error=1e-6,
                      score_scale=13.0)
    check_agreement(close, tmp_path / "model.onnx")
    refused = r"scores differ by up to 0\.002 \(tolerance 0\.0013: 0\.0001 x scores up to 13\)"
    with pytest.raises(ExportError, match=refused):
        check_agreement(close._replace(score_error=2e-3), tmp_path / "model.onnx")
    with pytest.raises(ExportError, match=r"maps differ by up to 0\.005 \(tolerance 0\.001\)"):
        check_agreement(close._replace(score_scale=1.0, score_error=0.0), tmp_path / "model.onnx")


def test_a_run_id_and_a_checkpoint_file_give_the_same_model(recorded, tmp_path):
    by_run = load_source(recorded.best_run_id, recorded.tracking_uri, None, None, tmp_path / "run")
    by_file = load_source(str(Path(recorded.root) / "train" / "model.pt"), recorded.tracking_uri, "offline", None,
                          tmp_path / "file")
    assert by_run.description == f"run {recorded.best_run_id}, category {CATEGORY}"
    assert by_file.publish is None
    image = np.full((1, 64, 64, 3), 90, dtype=np.uint8)
    assert by_run.scorer.score(image).scores == pytest.approx(by_file.scorer.score(image).scores, abs=1e-6)
    graph, readme = tmp_path / "model.onnx", tmp_path / "README.md"
    graph.write_bytes(b"graph")
    readme.write_text("readme")
    (tmp_path / "unrelated.txt").write_text("not logged")
    assert by_run.publish(graph, readme) == f"runs:/{recorded.best_run_id}/onnx/{CATEGORY}"
    logged = MlflowClient(recorded.tracking_uri).list_artifacts(recorded.best_run_id, f"onnx/{CATEGORY}")
    assert sorted(Path(a.path).name for a in logged) == ["README.md", "model.onnx"]


@pytest.mark.parametrize(("source", "expected"), [
    ("not-a-model", "expected models:/NAME@ALIAS"),
    ("models:/no-such-model@champion", "models:/no-such-model@champion: not in the registry"),
    ("0123456789abcdef0123456789abcdef", "run 0123456789abcdef0123456789abcdef: no such run"),
])
def test_unknown_sources_fail_with_one_line_naming_them(recorded, tmp_path, capsys, source, expected):
    code = main([source, "--output", str(tmp_path), "--tracking-uri", recorded.tracking_uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert expected in err[-1] and err[-1].startswith("error: ")
    assert "Traceback" not in "\n".join(err)
