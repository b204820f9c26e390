"""analysis.ipynb, executed headless with nbclient against several results.tsv files."""

import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

NORMAL = HEADER + "".join(f"{row}\n" for row in [
    "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline",
    "a1b2c3d\t0.998300\t44.0\tkeep\tbaseline (noise check)",
    "b2c3d4e\t0.993200\t44.2\tkeep\tmatrix LR 0.04 -> 0.05",
    "c3d4e5f\t1.005000\t44.0\tdiscard\tGeLU instead of relu^2",
    "d4e5f6a\t0.990100\t45.1\tkeep\twarmdown 0.5 -> 0.6",
    "e5f6a7b\t0.996000\t44.0\tdiscard\tno value embeddings",
    "f6a7b8c\t1.900000\t44.0\tdiscard\tlr x10, nearly diverged",
    "a7b8c9d\t0.991000\t44.0\tdiscard\tdepth 9",
])
CRASHES = HEADER + "".join(f"{row}\n" for row in [
    "a1b2c3d\t0.997900\t44.0\tKEEP\tbaseline",
    "b2c3d4e\t0.000000\t0.0\tcrash\tdouble the width (out of memory)",
    "c3d4e5f\t0.995000\t44.1\tKeep\tshorter warmdown",
    "d4e5f6a\t0.999000\t44.0\tDiscard\tGeLU",
    "e5f6a7b\t0.000000\t0.0\tCRASH\tshape bug",
])
NO_BASELINE = HEADER + "".join(f"{row}\n" for row in [
    "a1b2c3d\t0.000000\t0.0\tcrash\tfirst try crashed",
    "b2c3d4e\t1.001000\t44.0\tdiscard\tsomething worse",
    "c3d4e5f\t0.998000\t44.0\tkeep\tsomething better",
])
ONLY_CRASHES = HEADER + "a1b2c3d\t0.000000\t0.0\tcrash\tout of memory\n"


def read_notebook():
    return nbformat.read(os.path.join(ROOT, "analysis.ipynb"), as_version=4)


def output_text(nb):
    return "".join(out.get("text", "") or out.get("data", {}).get("text/plain", "")
                   for cell in nb.cells for out in cell.get("outputs", []))


@pytest.fixture(scope="module")
def kernel():
    """One kernel (this venv's python) shared by the cases: starting one costs seconds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        client = NotebookClient(nbformat.v4.new_notebook(), timeout=120, kernel_name="python3")
        with client.setup_kernel():
            yield client


def run_notebook(kernel, folder, results):
    """Execute analysis.ipynb in `folder` holding `results` as results.tsv (None: no file), from a
    clean namespace in the shared kernel. Returns the text output."""
    if results is not None:
        (folder / "results.tsv").write_text(results)
    nb = read_notebook()
    nb.cells.insert(0, nbformat.v4.new_code_cell(f"%reset -f\nimport os\nos.chdir({str(folder)!r})"))
    kernel.nb = nb
    for index, cell in enumerate(nb.cells):
        kernel.execute_cell(cell, index)
    return output_text(nb)


def assert_png(tmp_path):
    with open(tmp_path / "progress.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_committed_without_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs before committing"


def test_normal_in_a_fresh_kernel(tmp_path, monkeypatch):
    """As a user runs it: a new kernel started in the folder that holds results.tsv."""
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    (tmp_path / "results.tsv").write_text(NORMAL)
    nb = read_notebook()
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = output_text(nb)
    assert "experiments: 8" in out
    assert "keep:        4" in out and "discard:     4" in out and "crash:       0" in out
    assert "keep rate:   4/8 = 50.0%" in out
    assert "best:        0.990100  warmdown 0.5 -> 0.6" in out
    assert "improvement: 0.007800" in out
    # top improvements, largest first: 0.993200 -> 0.990100 (0.003100) after 0.997900 -> 0.993200 (0.004700)
    assert out.index("matrix LR 0.04 -> 0.05") < out.rindex("warmdown 0.5 -> 0.6")
    assert "0.004700" in out and "0.003100" in out
    assert_png(tmp_path)


def test_crashes_and_mixed_case(kernel, tmp_path):
    out = run_notebook(kernel, tmp_path, CRASHES)
    assert "experiments: 5" in out
    assert "keep:        2" in out and "discard:     1" in out and "crash:       2" in out
    assert "keep rate:   2/5 = 40.0%" in out
    assert "best:        0.995000  shorter warmdown" in out
    assert_png(tmp_path)


def test_no_baseline_row(kernel, tmp_path):
    out = run_notebook(kernel, tmp_path, NO_BASELINE)
    assert "experiments: 3" in out and "keep rate:   1/3 = 33.3%" in out
    assert "no improvement over the first kept run yet" in out
    assert_png(tmp_path)


def test_only_crashes(kernel, tmp_path):
    out = run_notebook(kernel, tmp_path, ONLY_CRASHES)
    assert "crash:       1" in out and "keep rate:   0/1 = 0.0%" in out
    assert_png(tmp_path)


@pytest.mark.parametrize("results", [HEADER, "", None], ids=["header-only", "empty-file", "no-file"])
def test_no_results(kernel, tmp_path, results):
    out = run_notebook(kernel, tmp_path, results)
    assert "experiments: 0" in out and "n/a" in out
    assert_png(tmp_path)
