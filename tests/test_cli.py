import subprocess
import sys


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


def test_demo_reports_a_missing_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "utils_cv.similarity", "demo", "--data", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def _table_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("|") or line.strip().startswith(("0:", "query"))]


def test_demo_trains_evaluates_saves_a_loadable_model_and_repeats_itself_exactly(tmp_path):
    """The whole pipeline twice with the same seed: the same tables, neighbours and weights."""
    import torch

    from conftest import draw_image_folder
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
