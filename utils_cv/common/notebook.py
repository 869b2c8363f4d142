"""Running the numbered notebooks and reading the numbers they record.

A notebook's last cell calls :func:`record` with its key numbers; they are stored in the
notebook as a JSON output, so tests and ``make notebooks`` can read them back with
:func:`read_records` without parsing printed text.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

__all__ = ["MIME", "execute", "read_records", "record"]

MIME = "application/vnd.utils-cv.record+json"
log = logging.getLogger(__name__)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN: "not measured" is null
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def record(**values) -> dict:
    """Show ``values`` in the notebook and store them as a JSON output; returns them."""
    from IPython.display import display

    plain = _plain(values)
    json.dumps(plain)  # fail here, in the notebook, on values JSON cannot hold
    text = "\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in plain.items())
    display({MIME: plain, "text/plain": text}, raw=True)
    return plain


def read_records(notebook) -> dict:
    """Every value :func:`record` stored in an executed notebook (later cells win)."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    found: dict = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if MIME in data:
                value = data[MIME]
                found.update(json.loads(value) if isinstance(value, str) else value)
    return found


def execute(notebook, output, parameters: dict | None = None, cwd=None, timeout: int = 3600,
            kernel_name: str | None = None) -> Path:
    """Run ``notebook`` top to bottom in a fresh Jupyter kernel with ``parameters`` injected
    after its ``parameters`` cell (papermill), writing the executed copy to ``output``
    atomically. Raises papermill's ``PapermillExecutionError`` naming the failing cell; the
    partly executed copy is then kept beside ``output`` as ``<name>.failed.ipynb``."""
    import papermill as pm

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.running.ipynb")
    env_cwd = str(cwd) if cwd is not None else os.getcwd()
    log.info("executing %s with %s", notebook, parameters or {})
    try:
        pm.execute_notebook(str(notebook), str(tmp), parameters=parameters or {}, cwd=env_cwd,
                            execution_timeout=timeout, kernel_name=kernel_name, progress_bar=False)
        os.replace(tmp, output)  # same folder: the finished notebook replaces the old one in one step
    except BaseException:
        if tmp.exists():  # keep what ran, with the error in it, for reading
            failed = output.with_name(output.stem + ".failed.ipynb")
            tmp.replace(failed)
            log.error("the partly executed notebook is at %s", failed)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return output


def main(argv: list[str] | None = None) -> int:
    """``python -m utils_cv.common.notebook NOTEBOOK...``: run each notebook with its own
    parameters from the current folder and store the outputs in place (what ``make
    notebooks`` does)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for nb in args.notebooks:
        execute(nb, nb, cwd=Path.cwd(), timeout=args.timeout)
        size = nb.stat().st_size / 1024**2
        log.info("%s: %.2f MB, records %s", nb, size, read_records(nb))
        if size > 2:
            log.warning("%s is %.1f MB: over the 2 MB budget for stored outputs", nb, size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
