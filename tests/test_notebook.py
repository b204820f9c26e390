"""analysis.ipynb, executed headless with nbclient against several results.tsv files, normal and hostile."""

import json
import os
import random
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tsv(*rows, header=HEADER):
    return header + "".join(f"{row}\n" for row in rows)


NORMAL = tsv(  # a night as program.md logs it: baseline pair, a rerun, a deletion, a re-measure
    "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline",
    "a1b2c3d\t0.998500\t44.0\tkeep\tbaseline (noise check)",
    "b2c3d4e\t0.995100\t44.2\tkeep\tmatrix LR 0.04 -> 0.05",
    "c3d4e5f\t1.002000\t44.0\tdiscard\tGeLU instead of relu^2",
    "d4e5f6a\t0.000000\t0.0\tcrash\tdouble the width (out of memory)",
    "e5f6a7b\t0.994800\t44.2\tdiscard\twarmdown 0.5 -> 0.6 (within noise, rerun)",
    "e5f6a7b\t0.992900\t44.2\tkeep\twarmdown 0.5 -> 0.6 (rerun)",
    "f6a7b8c\t1.900000\t44.0\tdiscard\tlr x10, nearly diverged",
    "a7b8c9d\t0.994300\t44.2\tkeep\tremove the logit soft-cap",
    "a7b8c9d\t0.995000\t44.2\tkeep\tbaseline",
    "a7b8c9d\t0.996200\t44.2\tkeep\tbaseline (noise check)",
)
CRASHES = tsv(
    "a1b2c3d\t0.997900\t44.0\tKEEP\tBaseline",
    "b2c3d4e\t0.000000\t0.0\tcrash\tdouble the width (out of memory)",
    "c3d4e5f\t0.995000\t44.1\tKeep\tshorter warmdown",
    "d4e5f6a\t0.999000\t44.0\tDiscard\tGeLU",
    "e5f6a7b\t0.000000\t0.0\tCRASH\tshape bug",
)
NO_BASELINE = tsv(
    "a1b2c3d\t0.000000\t0.0\tcrash\tfirst try crashed",
    "b2c3d4e\t1.001000\t44.0\tdiscard\tsomething worse",
    "c3d4e5f\t0.998000\t44.0\tkeep\tsomething better",
)
ONLY_CRASHES = tsv("a1b2c3d\t0.000000\t0.0\tcrash\tout of memory")
MATH = r"$\foo$ costs $5, C:\new\table \\ $x^2"
SPECIAL = "\ufeff" + tsv(  # a BOM, then numbers no run prints and descriptions matplotlib would read as mathtext
    "a1b2c3d\t1.000000\t44.0\tkeep\tbaseline",
    "a1b2c3d\t1.001000\t44.0\tkeep\tbaseline (noise check)",
    "b2c3d4e\tinf\t44.0\tkeep\tinf, kept",
    f"c3d4e5f\t0.990000\t44.0\tkeep\t{MATH}",
    "d4e5f6a\tnan\tnan\tdiscard\tNaN",
    "e5f6a7b\t-inf\t\tcrash\t",
    "f6a7b8c\t1e308\t44.0\tkeep\thuge",
    "a7b8c9d\tjunk\tjunk\tkeep\tjunk numbers",
    "b8c9d0e",
)
MISSING_COLUMNS = tsv(  # a header naming three columns in another order: the rest is missing
    "b2c3d4e\tkeep\t0.995",
    "c3d4e5f\tdiscard\t0.999",
    "d4e5f6a",
    header="commit\tstatus\tval_bpb\n",
)


CONTROL = "\x00\x07\x1b[31m red \u65e5\u672c \U0001f680 \ufffd"  # control characters, CJK, an emoji, U+FFFD


def junk():
    """Two good rows, one with control characters in its description, then random bytes."""
    rng = random.Random(0)
    good = tsv("a1b2c3d\t1.000000\t44.0\tkeep\tbaseline", f"b2c3d4e\t0.990000\t44.0\tkeep\t{CONTROL}")
    return good.encode() + bytes(rng.randrange(256) for _ in range(3000)) + b"\x00\t\r\n\x0c$\\" * 20


def read_notebook():
    return nbformat.read(os.path.join(ROOT, "analysis.ipynb"), as_version=4)


def output_text(nb):
    return "".join(out.get("text", "") or out.get("data", {}).get("text/plain", "")
                   for cell in nb.cells for out in cell.get("outputs", []))


INSPECT = """import json, matplotlib
legend = ax.get_legend()
print("INSPECT " + json.dumps({
    "annotations": [[t.get_text(), t.get_parse_math()] for t in ax.texts if isinstance(t, matplotlib.text.Annotation)],
    "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
    "points": {c.get_label(): [float(x) for x in c.get_offsets()[:, 0]] for c in ax.collections},
}))"""


@pytest.fixture(scope="module")
def kernel():
    """One kernel (this venv's python) shared by the cases: starting one costs seconds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        client = NotebookClient(nbformat.v4.new_notebook(), timeout=120, kernel_name="python3")
        with client.setup_kernel():
            yield client


def run_notebook(kernel, folder, results):
    """Execute analysis.ipynb in `folder` holding `results` as results.tsv (None: no file; bytes
    as they are), from a clean namespace in the shared kernel. Returns the text output, the HTML
    of the table, and what the plot holds (annotations, legend, x of the points of each marker)."""
    if isinstance(results, bytes):
        (folder / "results.tsv").write_bytes(results)
    elif results is not None:
        (folder / "results.tsv").write_text(results, encoding="utf-8")
    nb = read_notebook()
    nb.cells.insert(0, nbformat.v4.new_code_cell(f"%reset -f\nimport os\nos.chdir({str(folder)!r})"))
    nb.cells.append(nbformat.v4.new_code_cell(INSPECT))
    kernel.nb = nb
    for index, cell in enumerate(nb.cells):
        kernel.execute_cell(cell, index)
    out = output_text(nb)
    html = "".join(o.get("data", {}).get("text/html", "") for cell in nb.cells for o in cell.get("outputs", []))
    plot = json.loads(out[out.index("INSPECT ") + len("INSPECT "):].splitlines()[0])
    with open(folder / "progress.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC
    for label in plot["points"]:  # every marker drawn is named in the legend
        assert label in plot["legend"], (label, plot["legend"])
    return out, html, plot


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
    assert "runs:        11, of which 4 baseline runs" in out
    assert "experiments: 6 (a rerun counts with its first run)" in out
    assert "keep:        3" in out and "discard:     2" in out and "crash:       1" in out
    assert "keep rate:   3/6 = 50.0%" in out
    assert "start:       0.998200  (mean of 2 runs of a1b2c3d: baseline)" in out
    assert "now:         0.995167  (mean of 3 runs of a7b8c9d: remove the logit soft-cap)" in out
    assert "improvement: 0.003033" in out
    # top improvements, largest first: 0.997900 -> 0.995100 (0.002800), then 0.995100 -> 0.992900 (0.002200)
    assert out.index("0.002800") < out.index("0.002200")
    with open(tmp_path / "progress.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_normal_plot(kernel, tmp_path):
    _, _, plot = run_notebook(kernel, tmp_path, NORMAL)
    assert plot["points"] == {"discard": [4.0, 6.0], "keep": [3.0, 7.0, 9.0], "baseline": [1.0, 2.0, 10.0, 11.0],
                              "above the plot": [8.0], "crash": [5.0]}
    assert plot["legend"] == ["discard", "keep", "baseline", "above the plot", "best kept so far", "crash"]
    assert plot["annotations"] == [["matrix LR 0.04 -> 0.05", False], ["warmdown 0.5 -> 0.6 (rerun)", False]]


def test_crashes_and_mixed_case(kernel, tmp_path):
    out, _, plot = run_notebook(kernel, tmp_path, CRASHES)
    assert "runs:        5, of which 1 baseline runs" in out and "experiments: 4" in out
    assert "keep:        1" in out and "discard:     1" in out and "crash:       2" in out
    assert "keep rate:   1/4 = 25.0%" in out
    assert "now:         0.995000  (mean of 1 run of c3d4e5f: shorter warmdown)" in out
    assert plot["points"]["baseline"] == [1.0] and plot["points"]["crash"] == [2.0, 5.0]


def test_no_baseline_row(kernel, tmp_path):
    out, _, _ = run_notebook(kernel, tmp_path, NO_BASELINE)
    assert "experiments: 3" in out and "keep rate:   1/3 = 33.3%" in out
    assert "no improvement over the first kept run yet" in out


def test_only_crashes(kernel, tmp_path):
    out, _, plot = run_notebook(kernel, tmp_path, ONLY_CRASHES)
    assert "crash:       1" in out and "keep rate:   0/1 = 0.0%" in out
    assert plot["points"] == {"crash": [1.0]}


@pytest.mark.parametrize("results", [HEADER, "", None], ids=["header-only", "empty-file", "no-file"])
def test_no_results(kernel, tmp_path, results):
    out, _, plot = run_notebook(kernel, tmp_path, results)
    assert "experiments: 0" in out and "n/a" in out
    assert plot["points"] == {}


def test_bom_inf_nan_and_mathtext(kernel, tmp_path):
    out, html, plot = run_notebook(kernel, tmp_path, SPECIAL)
    assert "runs:        9, of which 2 baseline runs" in out  # the BOM's header is no run
    assert "experiments: 7" in out and "keep rate:   4/7 = 57.1%" in out
    # inf, NaN, 1e308 and junk are no value: the only kept values are the baselines and 0.99
    assert plot["points"]["keep"] == [4.0] and plot["points"]["baseline"] == [1.0, 2.0]
    assert plot["annotations"] == [[MATH, False]]  # drawn as it is written, not as mathtext
    assert f"now:         0.990000  (mean of 1 run of c3d4e5f: {MATH})" in out
    assert "tex2jax_ignore" in html and "$\\foo$" in html  # the table, too, shows it as it is


def test_missing_columns(kernel, tmp_path):
    out, _, plot = run_notebook(kernel, tmp_path, MISSING_COLUMNS)
    assert "experiments: 3" in out and "keep rate:   1/3 = 33.3%" in out
    assert plot["points"] == {"discard": [2.0], "keep": [1.0]}


def test_binary_junk(kernel, tmp_path):
    out, _, plot = run_notebook(kernel, tmp_path, junk())
    assert "experiments: " in out and "keep rate:" in out
    assert plot["annotations"][0] == [CONTROL[:40], False]
