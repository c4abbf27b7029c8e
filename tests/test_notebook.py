"""The Colab demo runs headless on CPU in its short mode (code cells executed in order)."""
import json
import os

from tests.test_train import REPO


def test_demo_notebook_runs_in_short_mode(tmp_path, monkeypatch):
    with open(os.path.join(REPO, "notebooks", "dream_demo.ipynb")) as f:
        notebook = json.load(f)
    monkeypatch.setenv("DREAM_DEMO_SHORT", "1")
    monkeypatch.setenv("DREAM_DEMO_WORKDIR", str(tmp_path / "demo"))
    monkeypatch.chdir(REPO)
    namespace = {"__name__": "__notebook__"}
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    for cell in cells:
        exec(compile("".join(cell["source"]), "dream_demo.ipynb", "exec"), namespace)
    assert namespace["plain"].images.shape[0] == 3 and namespace["sad"].images.shape[0] == 3
    assert namespace["sad"].scores.shape[1] == 5
    assert os.path.exists(tmp_path / "demo" / "demo_plain_vs_sad.png")
