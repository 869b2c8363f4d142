"""Each numbered notebook, run top to bottom by a real Jupyter kernel with tiny parameters.

The executed copies go to a temp dir; ``notebooks/`` is never written. The numbers each
notebook records in its last cell are read back and checked.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import draw_image_folder
from utils_cv.common.notebook import execute, read_records

pytestmark = pytest.mark.notebooks
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run(name: str, tmp_path: Path, **parameters) -> dict:
    def snapshot():  # hidden files are `make notebooks` temporaries, when it runs beside the tests
        return {p: p.stat().st_mtime_ns for p in NOTEBOOKS.rglob("*") if not p.name.startswith(".")}

    before = snapshot()
    out = execute(NOTEBOOKS / f"{name}.ipynb", tmp_path / "executed" / f"{name}.ipynb", parameters, cwd=tmp_path,
                  timeout=600)
    assert snapshot() == before, "notebooks/ must stay untouched"
    return read_records(out)


def test_notebooks_have_a_literal_parameters_cell_and_no_definitions():
    import ast

    import nbformat

    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names, "no notebooks found"
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters'"
        for stmt in ast.parse(tagged[0].source).body:
            assert isinstance(stmt, ast.Assign), f"{path.name}: parameters are assignments"
            ast.literal_eval(stmt.value)  # literals only
        for cell in nb.cells:
            if cell.cell_type == "code":
                tree = ast.parse("\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!"))))
                defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
                assert not defs, f"{path.name}: no def/class in notebooks, put it in utils_cv"
        assert path.stat().st_size <= 2 * 1024 * 1024, f"{path.name} is over 2 MB"


def test_12_fast_retrieval(tmp_path):
    folder = draw_image_folder(tmp_path / "images", per_class=6)
    r = run("12_fast_retrieval", tmp_path, DATA_PATH=str(folder), SYNTHETIC_N=3000, SYNTHETIC_DIM=32,
            NUM_QUERIES=50, HNSW_ON_SYNTHETIC=True, INDEX_DIR=str(tmp_path / "index"))
    assert r["num_images"] == 18 and r["feature_dim"] > 0
    assert r["synthetic_n"] == 3000 and r["exact_qps"] > 0
    assert r["best_approx_backend"] in {"hnsw", "ivfsq", "ivfpq"} and r["best_approx_recall_at_10"] >= 0.95
    assert r["own_class_top5_before_add"] == 0.0 and r["own_class_top5_after_add"] >= 0.2
    assert r["index_len"] == 18 - 2
    assert (tmp_path / "index" / "manifest.json").is_file()


def test_00_webcam_with_a_video_file_as_the_camera(tmp_path):
    import numpy as np

    from conftest import write_video
    from utils_cv.similarity import data

    folder = draw_image_folder(tmp_path / "images")
    paths, labels = data.list_images(folder)
    frame = np.asarray(data.load_image(paths[5]))
    video = write_video(tmp_path / "camera.avi", [frame] * 8)
    r = run("00_webcam", tmp_path, DATA_PATH=str(folder), CAMERA=str(video), TOP_K=4)
    assert r["source"] == "camera" and r["num_reference"] == 11, "the camera-less fallback image is never a reference"
    assert r["top1_label"] == labels[5], "the camera shows one of the folder's images: it is found first"
    assert r["top1_distance"] < 0.3 and r["top1_distance"] <= r["topk_distance"]
    assert len(r["topk_labels"]) == 4


def test_00_webcam_without_a_camera_uses_the_file(tmp_path):
    from utils_cv.similarity import data

    folder = draw_image_folder(tmp_path / "images")
    paths, labels = data.list_images(folder)
    r = run("00_webcam", tmp_path, DATA_PATH=str(folder), CAMERA=None, QUERY_PATH=str(paths[7]), TOP_K=3, BROWSE=True)
    assert r["source"] == "file"
    assert r["num_reference"] == 11, "the fallback query is held out of the reference images"
    assert r["top1_distance"] > 1e-3, "so it does not find itself"
    assert r["top1_label"] == labels[7], "drawn shapes: its nearest image is another of its class"


def test_01_training_and_evaluation_introduction(tmp_path):
    # 10 images per class: the 24 training images leave 2 of a class for the retrieval validation,
    # which chooses the class scores' weight
    folder = draw_image_folder(tmp_path / "images", per_class=10)
    r = run("01_training_and_evaluation_introduction", tmp_path, DATA_PATH=str(folder), EPOCHS=1, FREEZE_EPOCHS=1,
            IMAGE_SIZE=64, TOP_K=4, NUM_NEGATIVES=3, LR_FIND_ITERATIONS=6, MODEL_OUT=str(tmp_path / "model.pth"))
    assert r["num_train"] + r["num_test"] == 30 and r["num_test"] == 6
    assert r["epochs"] == 1 and r["image_size"] == 64 and r["lr_suggestion"] > 0
    for key in ("map_at_r_before", "map_at_r_after", "recall_at_1_before", "recall_at_1_after",
                "sets_recall_at_1_before", "sets_recall_at_1_after", "best_valid_map_at_r", "map_at_r_class_scores",
                "recall_at_1_class_scores"):
        assert 0 <= r[key] <= 1, (key, r[key])
    assert r["class_score_weight"] in [i / 10 for i in range(11)]
    assert 1 <= r["median_rank_before"] <= 4 and 1 <= r["median_rank_after"] <= 4
    # drawn shapes are easy: ImageNet features already rank a same-class image first most of the time
    assert r["recall_at_1_before"] >= 0.5
    assert (tmp_path / "model.pth").is_file() and (tmp_path / "model.pth.json").is_file()


def test_02_state_of_the_art(tmp_path):
    from conftest import draw_image_folder as draw

    same = draw(tmp_path / "same", per_class=8)
    disjoint = draw(tmp_path / "disjoint", classes=("a_circles", "b_squares", "c_stripes", "d_circles2",
                                                    "e_squares2", "f_stripes2"), per_class=5, seed=1)
    r = run("02_state_of_the_art", tmp_path, DATA_PATH=str(same), DISJOINT_PATH=str(disjoint), EPOCHS=1, FREEZE_EPOCHS=0,
            IMAGE_SIZE=48, RERANK_K1=3, RERANK_K2=2, ENSEMBLE_SIZE=64)
    assert r["disjoint_ran"] is True
    # floors: features that carry nothing (random vectors) score the chance level; every
    # model of the notebook must beat it clearly on these easy drawn shapes
    chance = _chance_map_at_r(n_per_class=2, n_classes=3)
    for key in ("same_imagenet_map_at_r", "same_imagenet_flip_map_at_r", "same_softmax_map_at_r",
                "same_normsoftmax_map_at_r", "same_softmax_rerank_map_at_r", "same_imagenet_diffusion_map_at_r",
                "same_softmax_diffusion_map_at_r"):
        assert chance + 0.15 < r[key] <= 1, (key, r[key], chance)
    # one epoch of a metric-learning loss on a new 512-d neck: a real row, not yet a good one
    assert 0 <= r["same_metric_map_at_r"] <= 1 and 0 <= r["disjoint_metric_map_at_r"] <= 1
    # the pipeline for unseen classes ran end to end (these 15 drawn test images of unseen
    # shapes are near chance for every row, the ImageNet features' included)
    assert 0 <= r["disjoint_pipeline_weight"] <= 1 and 1 <= r["disjoint_pipeline_k1"] <= 4  # 5 validation images
    assert 0 <= r["disjoint_pipeline_map_at_r"] <= 1 and 0 <= r["disjoint_pipeline_rerank_map_at_r"] <= 1
    assert 0 <= r["disjoint_pipeline_diffusion_map_at_r"] <= 1 and 0 <= r["disjoint_imagenet_diffusion_map_at_r"] <= 1


def _chance_map_at_r(n_per_class: int, n_classes: int, draws: int = 200) -> float:
    """Mean MAP@R of random features over ``draws`` draws (the chance level)."""
    import numpy as np

    from utils_cv.similarity import metrics

    labels = [c for c in range(n_classes) for _ in range(n_per_class)]
    rng = np.random.default_rng(0)
    return float(np.mean([metrics.evaluate_retrieval(rng.normal(size=(len(labels), 8)), labels)["map@r"]
                          for _ in range(draws)]))


def test_stored_outputs_hold_no_machine_paths_and_no_warnings():
    import json
    import re

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            for out in cell.get("outputs", []):
                text = json.dumps(out)
                assert not re.search(r"/(work|root|home|tmp)/|site-packages", text), (path.name, i, text[:300])
                if out.get("name") == "stderr":
                    assert "Warning" not in "".join(out.get("text", "")), (path.name, i)


def test_11_exploring_hyperparameters(tmp_path):
    folder = draw_image_folder(tmp_path / "images", per_class=8)
    r = run("11_exploring_hyperparameters", tmp_path, DATA_PATH=str(folder), LEARNING_RATES=[5e-3], IMAGE_SIZES=[32],
            EPOCHS=[], BACKBONES=[], EMBEDDING_DIMS=[], BASE={"epochs": 1, "freeze_epochs": 0, "image_size": 48})
    assert r["num_runs"] == 3 and r["runs"] == ["base", "lr=0.005", "image_size=32"]
    assert _chance_map_at_r(n_per_class=2, n_classes=3) + 0.15 < r["base_map_at_r"] <= 1
    assert r["best_run"] in r["runs"] and r["total_train_seconds"] > 0


def test_13_near_duplicates(tmp_path):
    from utils_cv.similarity import data, dedup

    dataset = data.default_dataset()
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in dataset.rglob("*.jpg"))
    r = run("13_near_duplicates", tmp_path, WORK_DIR=str(tmp_path / "demo"), NUM_IMAGES=12, NUM_EDITED=2)
    assert r["num_images"] == 12 + 2 * 5 and r["planted_pairs"] == 2 * 5
    assert r["threshold"] == dedup.DEFAULT_THRESHOLD and r["strict_threshold"] < r["threshold"]
    # byte copies are found by their hashes, and by their features at distance ~0
    assert r["num_exact_groups"] == 2 and r["found_by_edit"]["copy"] == 1.0
    assert r["found_by_edit"]["flipped"] == 1.0, "a mirror image lies well within the default threshold"
    assert r["planted_recall"] >= 0.8 and r["false_pairs"] == 0
    assert r["strict_planted_recall"] <= r["planted_recall"]
    assert r["num_groups"] >= 2 and r["num_suggested_remove"] >= r["planted_found"] - r["num_groups"]
    # nothing is deleted: the demo folder still holds every file, the data set is only read
    assert r["files_unchanged"] is True
    assert len(list((tmp_path / "demo" / "images").iterdir())) == r["num_images"]
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in dataset.rglob("*.jpg")) == before
    assert (tmp_path / "demo" / "index" / "collection.json").is_file()
