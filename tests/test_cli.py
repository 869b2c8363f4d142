import subprocess
import sys


def test_demo_runs_on_a_folder_and_saves_the_figure(image_folder, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "utils_cv.similarity", "demo", "--data", str(image_folder), "--image-size", "64",
         "--k", "3", "--queries", "2", "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "12 images, 3 classes" in proc.stdout
    assert "top-1 neighbour of the same class" in proc.stdout
    assert "| map@r |" in proc.stdout and "| recall@8 |" in proc.stdout
    png = out / "demo_neighbors.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp")), "no temporary file left behind"


def test_demo_reports_a_missing_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "utils_cv.similarity", "demo", "--data", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
