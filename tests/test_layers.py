"""The package's layers, enforced: what each folder of ddpm/ may import.

Floors, bottom up: ``models/`` and ``diffusion/`` (the maths: torch, numpy, einops) -> ``runtime/``, ``data/`` and
``io/`` (processes, training data, files) -> ``evaluation/`` -> ``training/`` -> ``scripts/``. Every import
statement counts, also one inside a function (a lazy import is still a dependency).
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ddpm"
LAYERS = ("models", "diffusion", "runtime", "data", "io", "training", "evaluation")
THIRD_PARTY_IO = {"PIL", "safetensors", "datasets", "huggingface_hub", "tqdm", "torchvision"}
# folder -> ddpm folders it must not import from; and third-party packages it must not import
FORBIDDEN_LAYERS = {
    "models": {"diffusion", "runtime", "data", "io", "training", "evaluation"},
    "diffusion": {"runtime", "data", "io", "training", "evaluation"},
    "runtime": {"models", "diffusion", "data", "io", "training", "evaluation"},
    "data": {"training", "evaluation"},
    "io": {"training", "evaluation"},
    "evaluation": {"training"},  # training uses evaluation (FID while training), never the other way
}
FORBIDDEN_PACKAGES = {"models": THIRD_PARTY_IO, "diffusion": THIRD_PARTY_IO}
NEVER = {"scripts", "diffusers", "accelerate"}  # for every module of ddpm/


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every module ``path`` imports, relative imports resolved against ddpm/."""
    package = ["ddpm", *path.relative_to(PACKAGE).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` / `from .. import io`: the names are modules too
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names] if not node.module else []
                found.append((node.lineno, module))
            else:
                found.append((node.lineno, node.module))
    return found


def violations(path: Path) -> list[str]:
    parts = path.relative_to(PACKAGE).parts
    folder = parts[0] if len(parts) > 1 else None
    out = []
    for line, name in imports(path):
        top, *rest = name.split(".")
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        if top in NEVER:
            out.append(f"{where} (nothing in ddpm/ may import {top})")
        if folder is None:
            continue
        if top == "ddpm" and rest and rest[0] in FORBIDDEN_LAYERS.get(folder, ()):
            out.append(f"{where} ({folder}/ sits below {rest[0]}/)")
        if top in FORBIDDEN_PACKAGES.get(folder, ()):
            out.append(f"{where} ({folder}/ is torch-only: no {top})")
    return out


def test_every_module_lives_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside the layer folders: {loose}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == set(LAYERS)


def test_layers_import_only_downwards():
    found = [v for path in sorted(PACKAGE.rglob("*.py")) for v in violations(path)]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    "source, message",
    [
        ("from ..io.files import read_json\n", "models/ sits below io/"),
        ("def f():\n    from PIL import Image\n", "models/ is torch-only: no PIL"),
        ("import diffusers\n", "nothing in ddpm/ may import diffusers"),
    ],
)
def test_the_checker_sees_a_violation(tmp_path, monkeypatch, source, message):
    """The rules are live: an upward import, a lazy PIL import and a diffusers import in models/ are each caught."""
    fake = tmp_path / "ddpm"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert any(message in v for v in violations(fake / "models" / "bad.py"))
