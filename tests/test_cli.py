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


def test_demo_trains_evaluates_and_saves_a_loadable_model(tmp_path):
    from conftest import draw_image_folder
    from utils_cv.similarity import train

    folder = draw_image_folder(tmp_path / "images", per_class=10)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "utils_cv.similarity", "demo", "--data", str(folder), "--epochs", "1",
         "--freeze-epochs", "1", "--image-size", "64", "--k", "3", "--queries", "2", "--output", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| ImageNet (no training, 224 px) |" in proc.stdout
    assert "| fine-tuned softmax (64 px) |" in proc.stdout
    assert "validation MAP@R" in proc.stdout
    module, transform = train.load(out / "model.pth")
    assert module.metadata["classes"] == ["circles", "squares", "stripes"]
    assert (out / "demo_neighbors.png").stat().st_size > 1000
    assert (out / "training_log.png").read_bytes()[:4] == b"\x89PNG"
