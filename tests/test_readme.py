"""The README's Python API example runs as written (a README that drifts from the package fails here)."""

import re
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_python_api_example_runs_and_draws_its_grid(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"^## Python API\n\n```python\n(.*?)^```", readme, re.S | re.M)
    assert example is not None, "the README has no Python API example"
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the example names a config by its path in the repository
    monkeypatch.chdir(tmp_path)
    exec(compile(example.group(1), "README.md (Python API)", "exec"), {})
    with Image.open(tmp_path / "grid.png") as grid:  # 16 digits of 16 px, scaled up to be seen
        assert min(grid.size) >= 256
