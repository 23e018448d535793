"""The installed package must contain every subpackage, with kernels/ and eval/ mapped inside it."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_and_nothing_top_level_shadows_hf():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(cfg["packages"]), cfg["package-dir"]
    assert all(p == "hyperquant_diffusers" or p.startswith("hyperquant_diffusers.") for p in listed)
    assert dirs["hyperquant_diffusers.kernels"] == "kernels" and dirs["hyperquant_diffusers.eval"] == "eval"
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)) if rel else name)
    assert found <= listed, f"subpackages missing from pyproject.toml: {sorted(found - listed)}"
