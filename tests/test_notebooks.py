"""scripts/run_notebooks.py, which CI runs on every notebook in notebooks/: a failing cell fails the run (the
notebooks themselves run there, on their tiny offline defaults; `python scripts/run_notebooks.py`)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "scripts", "run_notebooks.py")


def _notebook(path, *sources):
    cells = [
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": s} for s in sources
    ]
    book = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(book))
    return str(path)


@pytest.mark.slow
def test_runner_reports_each_notebook_and_fails_on_a_cell_error(tmp_path):
    """Two notebooks at once (--jobs 2): a line each, the failing cell's error; what a notebook leaves in its
    temporary directory ($TMPDIR, as the notebooks' work directories) is removed with it."""
    good = _notebook(
        tmp_path / "good.ipynb", "x = 6 * 7", "assert x == 42",
        "import tempfile\nwork = tempfile.mkdtemp(prefix='gemma4-nb-')\nopen(work + '/out', 'w').close()\nprint(work)",
    )  # fmt: skip
    bad = _notebook(tmp_path / "bad.ipynb", "x = 1", "raise ValueError('cell two broke')", "y = 2")
    kept = tmp_path / "kept"
    kept.mkdir()
    done = subprocess.run(
        [sys.executable, RUNNER, good, bad, "--jobs", "2", "--keep", str(kept)], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "executed " in done.stdout and "good.ipynb" in done.stdout
    assert "FAILED " in done.stdout and "cell two broke" in done.stdout
    assert "1 of 2 executed without error" in done.stdout
    assert json.loads((tmp_path / "good.ipynb").read_text())["cells"][0]["outputs"] == []  # the repo copy untouched
    work = json.loads((kept / "good.ipynb").read_text())["cells"][2]["outputs"][0]["text"]
    work = "".join(work).strip()
    assert os.path.basename(work).startswith("gemma4-nb-") and not os.path.exists(work)
