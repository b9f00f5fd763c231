"""The README and docs/: the Python examples run as written, the README stays a short guide, every docs page is
linked from it, every relative link resolves, and nothing cites a document outside the repository."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def run_python_blocks(path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    assert blocks, path
    for code in blocks:
        exec(compile(code, str(path.relative_to(ROOT)), "exec"), {})


def test_readme_python_example_runs(capsys):
    run_python_blocks(README)
    out = capsys.readouterr().out
    assert "dpo" in out and "simpo" in out and "tdpo" in out


def test_api_doc_examples_run(capsys):
    run_python_blocks(ROOT / "docs" / "api.md")
    assert "learned_tilt step 2" in capsys.readouterr().out


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert [line.split()[0:2] for line in first_block.strip().splitlines()] == [["make", "train"], ["make", "test"]]


def test_readme_is_short_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    linked = {(README.parent / target.split("#")[0]).resolve() for target in LINK.findall(text)}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", [README, *DOCS, *sorted((ROOT / "docs").glob("*/*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    targets = [t.split("#")[0] for t in LINK.findall(page.read_text())]
    local = [t for t in targets if t and not re.match(r"[a-z]+:", t)]
    assert [t for t in local if not (page.parent / t).exists()] == []


def test_no_citation_of_documents_outside_the_repository():
    files = [README, *(p for d in ("midpo_cli", "conf", "benchmarks", "docs") for p in (ROOT / d).rglob("*")
                       if p.is_file() and p.suffix in {".py", ".yaml", ".yml", ".md", ".sh", ".txt", ".toml"})]
    cited = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
             if "spec/" in line or "../shared" in line]
    assert cited == []


def test_docs_priors_places_every_dpo_trainer_loss_of_the_installed_trl():
    """docs/priors.md says for each of TRL's DPOTrainer loss types and f-divergences whether it is a prior: a TRL that
    adds one fails here until the table has its row."""
    config = pytest.importorskip("trl").DPOConfig.__dataclass_fields__
    text = (ROOT / "docs" / "priors.md").read_text()
    loss_types = re.findall(r"`'(\w+)'`", config["loss_type"].metadata["help"])
    divergences = re.findall(r"`(\w+)`", config["f_divergence_type"].metadata["help"].split("Only")[0])
    assert "sigmoid" in loss_types and "reverse_kl" in divergences
    missing = [f"loss_type={t}" for t in loss_types] + [f"f_divergence_type={d}" for d in divergences]
    assert [m for m in missing if f"`{m}`" not in text] == []
    assert [o for o in ("ld_alpha", "sync_ref_model", "use_weighting", "label_smoothing", "loss_weights")
            if f"| `{o}`" not in text] == []
