"""notebooks/colab_complete_setup.ipynb: committed without outputs, and runs top to bottom in demo mode.

The execution test starts a kernel on this interpreter (a kernelspec written to a temporary folder whose
argv is sys.executable, so a stray system "python3" kernelspec cannot be picked), with the repository
root as working directory (the notebook then skips clone and pip install) and the Hub forced offline.
Test values are injected into the cell tagged "parameters" (appended after its own assignments, as
papermill does), choosing a small run: demo mode, MedGemma only, one study, 500 resamples.
"""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_complete_setup.ipynb"


def _read():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "exactly one cell must be tagged 'parameters'"
    return cells[0]


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
            parts.append(out["data"].get("text/markdown", ""))
    return "".join(parts)


def test_committed_notebook_is_clean():
    nb = _read()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0] is _parameters_cell(nb), "the parameters cell must be the first code cell"
    for cell in code:
        assert cell.outputs == [], f"cell {cell.get('id')} has committed outputs"
        assert cell.execution_count is None, f"cell {cell.get('id')} has an execution count"
    assert 'MODE = "auto"' in _parameters_cell(nb).source


def _kernel_manager(tmp_path: Path):
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def test_notebook_runs_in_demo_mode(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    out = tmp_path / "out"
    nb = _read()
    params = _parameters_cell(nb)
    params.source += (
        "\n\n# injected by tests/test_notebook.py\n"
        f'MODE = "demo"\nOUTPUT_DIR = {str(out)!r}\nMODELS = ["medgemma"]\nN_STUDIES = 1\nN_BOOT = 500\n'
        "N_FIGURE_STUDIES = 1\nMOUNT_DRIVE = False\nOVERWRITE = False\n"
    )
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=300,
        startup_timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    assert (out / "summary.csv").is_file()
    assert (out / "per_finding.csv").is_file()
    assert list((out / "figures").glob("*.png")), "no figure written"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["random_weights"] is True

    by_id = {c.get("id"): c for c in nb.cells}
    assert "skipping clone and pip install" in _text(by_id["setup"])
    assert "RANDOM WEIGHTS" in _text(by_id["results"])
    assert any("image/png" in o.get("data", {}) for o in by_id["results"].outputs), "no figure shown"
    adhoc = _text(by_id["adhoc"])
    assert "medgemma" in adhoc and "p_yes=" in adhoc
    assert "llava_rad " in adhoc or "LLaVA-Rad backend not available" in adhoc
    assert any("image/png" in o.get("data", {}) for o in by_id["adhoc"].outputs), "no overlay shown"
