"""The generated documentation is current, and the README is what a newcomer reads in five minutes."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs  # noqa: E402


def test_generated_docs_are_current():
    # docs/arguments.md from the fields' help strings; docs/results.md and README's table from results/
    stale = [str(Path(p).relative_to(ROOT)) for p, text in docs.targets().items()
             if not Path(p).exists() or Path(p).read_text() != text]
    assert not stale, f"out of date: {stale}; run: python scripts/docs.py"


def test_every_vsa_argument_is_documented_with_its_help():
    from dataclasses import fields
    from hf_vsa import VSATrainingArguments
    text = (ROOT / "docs" / "arguments.md").read_text()
    for f in fields(VSATrainingArguments):
        if f.name.startswith("vsa_"):
            assert f"| `{f.name}` |" in text and f.metadata.get("help"), f.name


def test_readme_is_short_and_the_tree_holds_no_patch():
    readme = (ROOT / "README.md").read_bytes()
    assert readme.count(b"\n") <= 300 and len(readme) <= 25_000
    # the project's own files only: a virtual environment in the checkout (.venv) may hold packages' patches
    ours = [p for p in ROOT.rglob("*.patch") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    assert not ours


def test_regime_table_numbers_come_from_the_results_files(tmp_path):
    # the README's table is the generator's, row for row
    table = docs.regime_table()
    text = (ROOT / "README.md").read_text()
    assert table in text
    for regime, _ in docs.REGIMES:
        for task in docs.TASKS:
            assert f"| {regime} | {task}" in table


def test_every_local_link_and_picture_in_the_docs_exists():
    import re
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
