"""The command line end to end on folders the tests write: index (plain and labelled folders,
bad files, incremental re-runs), query, train, evaluate, demo, exit codes."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import _draw, draw_image_folder
from utils_cv.similarity import cli, collection, dedup


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree_state(root: Path) -> dict:
    """Every file under root with its bytes and modification time: to prove nothing was touched."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """A plain folder (no class sub-folders) of real-looking files, with the awkward cases:
    a truncated JPEG, a TIFF, a GIF, a blank transparent PNG and a symlinked sub-folder."""
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i, kind in enumerate(["circles", "squares", "stripes", "circles", "squares"]):
        _draw(kind, rng, size=96).save(root / f"photo_{i}.jpg", quality=92)
    _draw("stripes", rng, size=96).save(root / "scan.tif")
    _draw("circles", rng, size=96).save(root / "anim.gif")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(root / "blank.png")
    good = (root / "photo_0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _draw("squares", rng, size=96).save(elsewhere / "linked.jpg", quality=92)
    os.symlink(elsewhere, root / "linked_folder")
    return root


def test_help_lists_the_subcommands_with_examples():
    proc = subprocess.run([sys.executable, "-m", "utils_cv.similarity", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for name in ("index", "query", "train", "evaluate", "demo"):
        assert name in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "utils_cv.similarity", "query", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert "examples:" in proc.stdout and "--json" in proc.stdout


def test_usage_errors_exit_2_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["query", str(tmp_path), "x.jpg", "-k", "0"])
    assert exc.value.code == 2
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["index", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "m.pth", "--backbone", "resnet18"])
    assert exc.value.code == 2


def test_index_a_plain_folder_with_bad_files_then_query_it(photo_folder, tmp_path, capsys):
    before = tree_state(photo_folder)
    out = tmp_path / "photos.idx"
    code, stdout, err = run(capsys, "index", photo_folder, "--out", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    indexed = {e["path"] for e in json.loads((out / "collection.json").read_text())["entries"]}
    assert "scan.tif" in indexed and "anim.gif" in indexed and "linked_folder/linked.jpg" in indexed
    assert "truncated.jpg" not in indexed
    assert any(s["path"].endswith("truncated.jpg") for s in report["skipped"])
    assert report["total"] == len(indexed) == 9  # 5 jpg + tif + gif + blank png + the linked one
    assert tree_state(photo_folder) == before, "the image folder must never be written"

    code, stdout, err = run(capsys, "query", out, photo_folder / "photo_2.jpg", "-k", "3", "--json",
                            "--figure", tmp_path / "q.png")
    assert code == 0, err
    answer = json.loads(stdout)["queries"][0]
    first = answer["neighbours"][0]
    assert Path(first["path"]) == photo_folder / "photo_2.jpg" and first["distance"] < 1e-3
    assert [h["distance"] for h in answer["neighbours"]] == sorted(h["distance"] for h in answer["neighbours"])
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_reindexing_embeds_only_what_changed_and_equals_a_fresh_build(tmp_path, capsys):
    folder = draw_image_folder(tmp_path / "images", per_class=3)
    out = tmp_path / "idx"
    code, stdout, _ = run(capsys, "index", folder, "--out", out, "--json")
    assert code == 0 and json.loads(stdout)["embedded"] == 9

    code, stdout, _ = run(capsys, "index", folder, "--out", out, "--json")
    assert json.loads(stdout)["embedded"] == 0 and json.loads(stdout)["reused"] == 9

    rng = np.random.default_rng(7)
    _draw("circles", rng).save(folder / "circles" / "new.jpg", quality=95)          # added
    _draw("squares", rng).save(folder / "squares" / "squares_0.jpg", quality=95)    # changed
    (folder / "stripes" / "stripes_1.jpg").unlink()                                  # deleted
    # touched but identical content: same sha256, so not embedded again
    os.utime(folder / "stripes" / "stripes_2.jpg", ns=(1, 1))
    code, stdout, _ = run(capsys, "index", folder, "--out", out, "--json")
    report = json.loads(stdout)
    assert (report["embedded"], report["reused"], report["removed"], report["total"]) == (2, 7, 1, 9)

    fresh = tmp_path / "fresh"
    run(capsys, "index", folder, "--out", fresh, "--json")
    a, b = collection.open_collection(out), collection.open_collection(fresh)
    order_a = {e["path"]: i for i, e in enumerate(a.entries)}
    assert sorted(order_a) == sorted(e["path"] for e in b.entries)
    for i, e in enumerate(b.entries):
        np.testing.assert_allclose(a.features[order_a[e["path"]]], b.features[i], atol=1e-5)
        assert a.entries[order_a[e["path"]]]["phash"] == e["phash"]  # perceptual hashes kept or made anew alike
    assert all(len(e["phash"]) == 16 for e in b.entries)


def test_hashes_of_an_older_definition_are_ignored_then_recomputed(tmp_path, capsys, caplog):
    folder = draw_image_folder(tmp_path / "images", per_class=2)
    out = tmp_path / "idx"
    assert run(capsys, "index", folder, "--out", out, "--json")[0] == 0
    manifest = out / "collection.json"
    doc = json.loads(manifest.read_text())
    right = {e["path"]: e["phash"] for e in doc["entries"]}
    del doc["phash_version"]  # as written before the hash definition changed
    for e in doc["entries"]:
        e["phash"] = "0123456789abcdef"
    manifest.write_text(json.dumps(doc))
    old = collection.open_collection(out)
    assert all("phash" not in e for e in old.entries)
    with caplog.at_level(logging.WARNING, logger="utils_cv.similarity.collection"):
        old.duplicate_groups()
    assert "6 of the 6 images" in caplog.text and "no perceptual hash" in caplog.text
    code, stdout, _ = run(capsys, "index", folder, "--out", out, "--json")
    assert code == 0 and json.loads(stdout)["embedded"] == 0  # the embeddings are kept, the hashes made anew
    again = collection.open_collection(out)
    assert {e["path"]: e["phash"] for e in again.entries} == right
    assert json.loads(manifest.read_text())["phash_version"] == dedup.PHASH_VERSION


def test_index_with_an_exported_runtime_equals_torch(tmp_path, capsys, cache_dir):
    pytest.importorskip("onnxruntime")
    folder = draw_image_folder(tmp_path / "images", per_class=2)
    assert run(capsys, "index", folder, "--out", tmp_path / "eager", "--json")[0] == 0
    code, stdout, _ = run(capsys, "index", folder, "--out", tmp_path / "onnx", "--runtime", "onnx", "--json")
    assert code == 0 and json.loads(stdout)["embedded"] == 6
    a, b = collection.open_collection(tmp_path / "eager"), collection.open_collection(tmp_path / "onnx")
    assert [e["path"] for e in a.entries] == [e["path"] for e in b.entries] and a.model == b.model
    assert (a.features * b.features).sum(1).min() >= 0.9999
    code, _, err = run(capsys, "index", folder, "--out", tmp_path / "bad", "--runtime", "openvino", "--precision",
                       "int8")
    assert code == 1 and "'precision'" in err and "['fp32', 'bf16']" in err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as exc:
        run(capsys, "index", folder, "--out", tmp_path / "ray", "--engine", "ray", "--runtime", "onnx")
    assert exc.value.code == 2 and "--engine local" in capsys.readouterr().err


def test_train_then_evaluate_with_intervals(tmp_path, capsys):
    folder = draw_image_folder(tmp_path / "images", per_class=6)
    model = tmp_path / "model.pth"
    code, stdout, err = run(capsys, "train", folder, "--out", model, "--epochs", "1", "--freeze-epochs", "1",
                            "--image-size", "64", "--batch-size", "8")
    assert code == 0, err
    assert model.is_file() and "model:" in stdout
    code, stdout, err = run(capsys, "evaluate", folder, "--model", model, "--json", "--bootstrap", "200")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["queries"] == 18
    for name, row in result["metrics"].items():
        lo, hi = row["ci95"]
        assert lo <= row["value"] <= hi, name
    assert result["metrics"]["map@r"]["ci95"][1] - result["metrics"]["map@r"]["ci95"][0] > 0


def test_train_validating_on_held_out_classes_with_class_scores_and_the_starting_features(tmp_path, capsys):
    folder = draw_image_folder(tmp_path / "images", classes=("circles", "squares", "stripes", "bars"), per_class=6)
    model = tmp_path / "model.pth"
    code, stdout, err = run(capsys, "train", folder, "--out", model, "--epochs", "1", "--freeze-epochs", "0",
                            "--image-size", "64", "--batch-size", "8", "--valid-classes", "--class-scores", "--ensemble")
    assert code == 0, err
    assert "starting features kept at weight" in stdout
    meta = json.loads((tmp_path / "model.pth.json").read_text())
    assert meta.get("score_weight", 0.0) == pytest.approx(float(stdout.split("class scores at weight ")[1][:3]))
    assert len(meta["classes"]) == 2, "2 of the 4 classes are held out for the validation, not trained on"
    weight = float(stdout.split("kept at weight ")[1][:3])
    assert meta.get("ensemble_weight", 0.0) == pytest.approx(weight)
    code, _, err = run(capsys, "train", draw_image_folder(tmp_path / "three", per_class=3), "--out", model,
                       "--valid-classes")
    assert code == 1 and "at least 4 are needed" in err
    # refused before training, not after it
    code, _, err = run(capsys, "train", folder, "--out", tmp_path / "metric.pth", "--head", "metric", "--valid-classes",
                       "--class-scores")
    assert code == 1 and "gives no class logits" in err and not (tmp_path / "metric.pth").exists()


def test_train_with_a_metric_learning_loss_by_name(tmp_path, capsys):
    pytest.importorskip("pytorch_metric_learning")
    folder = draw_image_folder(tmp_path / "images", per_class=6)
    model = tmp_path / "model.pth"
    code, stdout, err = run(capsys, "train", folder, "--out", model, "--head", "metric", "--loss", "proxyanchor",
                            "--epochs", "1", "--freeze-epochs", "0", "--image-size", "64", "--batch-size", "8")
    assert code == 0, err
    assert "metric head, proxyanchor" in stdout
    meta = json.loads((tmp_path / "model.pth.json").read_text())
    assert meta["head"] == "metric" and meta["loss"] == "proxyanchor"
    with pytest.raises(SystemExit) as exc:
        run(capsys, "train", folder, "--out", tmp_path / "other.pth", "--loss", "nope")
    assert exc.value.code == 2 and "--loss" in capsys.readouterr().err and not (tmp_path / "other.pth").exists()


def test_labels_needed_errors_say_how_to_lay_out_the_folder(photo_folder, tmp_path, capsys):
    code, _, err = run(capsys, "evaluate", photo_folder)
    assert code == 1 and "one sub-folder per class" in err
    one = draw_image_folder(tmp_path / "one", classes=("circles",), per_class=3)
    code, _, err = run(capsys, "evaluate", one)
    assert code == 1 and "single class" in err


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    code, _, err = run(capsys, "query", tmp_path / "nope", tmp_path / "x.jpg")
    assert code == 1 and err.count("\n") == 1 and "collection.json is missing" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    folder = draw_image_folder(tmp_path / "images", per_class=2)
    code, _, err = run(capsys, "index", folder, "--out", blocker / "sub")
    assert code == 1 and "Traceback" not in err


def test_demo_runs_on_a_folder_and_saves_the_figure(image_folder, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "utils_cv.similarity", "demo", "--data", str(image_folder), "--epochs", "0",
         "--k", "3", "--queries", "2", "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "12 images, 3 classes" in proc.stdout
    assert "| map@r |" in proc.stdout and "| recall@8 |" in proc.stdout
    png = out / "demo_neighbors.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp")), "no temporary file left behind"
    assert "\r" not in proc.stderr, "no progress bar when not on a terminal"


def test_demo_reports_a_missing_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "utils_cv.similarity", "demo", "--data", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr


def _table_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("|") or line.strip().startswith(("0:", "query"))]


def test_demo_trains_evaluates_saves_a_loadable_model_and_repeats_itself_exactly(tmp_path):
    """The whole pipeline twice with the same seed: the same tables, neighbours and weights."""
    import torch

    from utils_cv.similarity import train

    folder = draw_image_folder(tmp_path / "images", per_class=10)
    runs = []
    for name in ("out1", "out2"):
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "utils_cv.similarity", "demo", "--data", str(folder), "--epochs", "1",
             "--freeze-epochs", "1", "--image-size", "64", "--k", "3", "--queries", "2", "--output", str(out),
             "--no-progress"],
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        runs.append((out, proc.stdout))
    (out, stdout), (out2, stdout2) = runs
    assert "| ImageNet (no training, 224 px) |" in stdout
    assert "| fine-tuned softmax (64 px) |" in stdout
    assert "validation MAP@R" in stdout
    module, transform = train.load(out / "model.pth")
    assert module.metadata["classes"] == ["circles", "squares", "stripes"]
    assert (out / "demo_neighbors.png").stat().st_size > 1000
    assert (out / "training_log.png").read_bytes()[:4] == b"\x89PNG"
    # determinism: same seed, same machine -> the same numbers and the same weights
    assert _table_lines(stdout) == _table_lines(stdout2) and len(_table_lines(stdout)) >= 6
    a = torch.load(out / "model.pth", weights_only=True)["state_dict"]
    b = torch.load(out2 / "model.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_utf8_names_and_parquet_export(tmp_path, capsys):
    import pyarrow.parquet as pq

    folder = draw_image_folder(tmp_path / "images", per_class=2)
    odd = os.fsencode(str(folder / "circles")) + b"/caf\xe9_\xff.jpg"  # not valid UTF-8
    with open(odd, "wb") as f:
        f.write((folder / "circles" / "circles_0.jpg").read_bytes())
    out, export = tmp_path / "idx", tmp_path / "emb.parquet"
    code, stdout, err = run(capsys, "index", folder, "--out", out, "--export", export)
    assert code == 0, err
    code, stdout, err = run(capsys, "query", out, os.fsdecode(odd), "-k", "3", "--figure", tmp_path / "q.png")
    assert code == 0, err
    assert "caf\\xe9" in stdout and "Traceback" not in err  # shown escaped, not a crash
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    table = pq.read_table(export)
    col = collection.open_collection(out)
    assert table.num_rows == len(col.entries) == 7 and odd in table.column("path_bytes").to_pylist()
    emb = np.asarray(table.column("embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(emb, col.features, atol=1e-6)


def test_duplicates_groups_copies_marks_identical_files_and_touches_nothing(tmp_path, capsys):
    folder = draw_image_folder(tmp_path / "images", per_class=3)
    shutil.copyfile(folder / "circles" / "circles_0.jpg", folder / "circles" / "copy_of_0.jpg")
    before = tree_state(folder)
    code, stdout, err = run(capsys, "duplicates", folder, "--index", tmp_path / "idx", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    group = next(g for g in result["groups"] if any(h["path"].endswith("copy_of_0.jpg") for h in g))
    assert {Path(h["path"]).name for h in group} >= {"circles_0.jpg", "copy_of_0.jpg"}
    assert result["exact"][result["groups"].index(group)] is True
    assert len([p for p in result["remove"] if Path(p).name in ("circles_0.jpg", "copy_of_0.jpg")]) == 1
    assert tree_state(folder) == before, "duplicates never deletes, moves or writes a file"
    code, stdout, _ = run(capsys, "duplicates", tmp_path / "idx", "--csv")
    assert code == 0 and stdout.splitlines()[0] == "group,path,distance,exact,suggest_remove"
