import json

import nbformat
import pytest

from utils_cv.common.notebook import MIME, read_records, record


def test_record_stores_plain_json_that_read_records_finds(tmp_path, capsys):
    import numpy as np

    values = record(a=np.float32(0.5), b=np.int64(3), c=float("nan"), d=[np.float64(1.0)], e=tmp_path)
    assert values == {"a": 0.5, "b": 3, "c": None, "d": [1.0], "e": str(tmp_path)}
    json.dumps(values, allow_nan=False)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("record(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", data={MIME: {"a": 1}, "text/plain": "a: 1"}),
                    nbformat.v4.new_output("display_data", data={MIME: {"a": 2, "b": "x"}, "text/plain": ""})]
    nb.cells.append(cell)
    nbformat.write(nb, tmp_path / "n.ipynb")
    assert read_records(tmp_path / "n.ipynb") == {"a": 2, "b": "x"}, "later records win"
    with pytest.raises(TypeError):
        record(bad=object())
