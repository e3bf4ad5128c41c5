"""The README's results section is generated from benchmarks/results/ and must not drift from it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "benchmarks" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_section_matches_the_committed_results() -> None:
    generator = load_generator()
    readme = (ROOT / "README.md").read_text()
    assert generator.updated_readme(readme) == readme, (
        "README.md's results section is stale: run `python benchmarks/readme_results.py`")


def test_every_table_names_its_command_and_every_image_exists() -> None:
    generator = load_generator()
    section = generator.generate()
    for results in ("caching-cpu", "attention-cpu", "overhead-cpu", "zoo"):
        md = (ROOT / "benchmarks" / "results" / f"{results}.md").read_text()
        assert generator._method(ROOT / "benchmarks" / "results" / f"{results}.md") in section
        assert "`python benchmarks/" in generator._method(ROOT / "benchmarks" / "results" / f"{results}.md"), md[:200]
    for line in section.splitlines():
        for piece in line.split("benchmarks/results/")[1:]:
            name = piece.split(")")[0].split('"')[0].split("`")[0]
            if name.endswith(".png"):
                assert (ROOT / "benchmarks" / "results" / name).is_file(), name


def test_a_changed_result_changes_the_readme(tmp_path: Path, monkeypatch) -> None:
    import json
    import shutil

    generator = load_generator()
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    zoo = json.loads((results / "zoo.json").read_text())
    zoo["models"]["dit"]["class_consistency"] = 0.123456
    (results / "zoo.json").write_text(json.dumps(zoo))
    monkeypatch.setattr(generator, "RESULTS", results)
    assert "| zoo:dit | 50 | 2.0 | 0.123 |" in generator.generate()
