"""The README front page and docs/ hold together (issue 21 item 17): every relative link and image points to a file
that exists, and an anchor to a heading of it; the front page's own recipe is complete and valid; docs/cli.md has a
row for every verb. File reading only, no model: deterministic and quick."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links and headings there are not markdown)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (word characters, spaces and hyphens kept),
    spaces become hyphens; inline code and link markup count by their text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", path.read_text(encoding="utf-8")), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    bad = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{page.relative_to(REPO)}: {bad}"


def test_slug_follows_github():
    assert slug("`spec`: lossless self-speculation (`decode/spec.py`)") == "spec-lossless-self-speculation-decodespecpy"
    assert slug("Converting a 1.5B Llama/Qwen checkpoint on 8 GPUs") == "converting-a-15b-llamaqwen-checkpoint-on-8-gpus"
    assert slug("Streaming and `--trace`") == "streaming-and---trace"


def front_page_recipe() -> str:
    blocks = re.findall(r"```toml\n(# my\.toml.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "README shows one complete recipe, starting with '# my.toml'"
    return blocks[0]


def test_front_page_recipe_is_complete_and_valid(tmp_path):
    """The recipe of 'Converting your own checkpoint' loads as written (paths need not exist to validate), keeps
    recipes/tiny_wsd.toml's WSD phases (not a block-size-1 run), and every block size divides the row and the EOS
    padding; the page says a fast tokenizer (tokenizer.json) is required."""
    from blockdiff.train.recipe import load_recipe

    (tmp_path / "my.toml").write_text(front_page_recipe(), encoding="utf-8")
    mine = load_recipe(tmp_path / "my.toml")
    bundled = load_recipe(REPO / "recipes" / "tiny_wsd.toml")
    assert [(p.name, p.block_size, p.steps) for p in mine.phases] == \
        [(p.name, p.block_size, p.steps) for p in bundled.phases]
    assert all(mine.data.seq_len % p.block_size == 0 for p in mine.phases)
    assert mine.data.eos_pad_multiple % mine.phases[-1].block_size == 0
    assert (mine.objective.labels, mine.objective.clean_stream) == (bundled.objective.labels, bundled.objective.clean_stream)
    assert mine.merge.top_k > 0 and mine.eval.tasks == 0
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Converting your own checkpoint", 1)[1]
    assert "tokenizer.json" in section.split("\n## ", 1)[0]


def test_docs_cli_has_a_row_for_every_verb():
    import argparse

    from blockdiff.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    rows = set(re.findall(r"^\| `blockdiff ([a-z-]+)` \|", (REPO / "docs" / "cli.md").read_text(encoding="utf-8"), re.M))
    assert rows == set(sub.choices), (sorted(rows), sorted(sub.choices))


def test_docs_cli_flags_is_generated_from_the_parser():
    """docs/cli-flags.md is exactly what scripts/cli_reference.py prints: a flag added, renamed or re-defaulted in
    the code without regenerating the page fails here (regenerate: python scripts/cli_reference.py >
    docs/cli-flags.md)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_reference", REPO / "scripts" / "cli_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.reference()
    assert (REPO / "docs" / "cli-flags.md").read_text(encoding="utf-8") == text
    for flag in ("--kv-memory", "--max-model-len", "--checked", "--ppl", "--adapter-rank"):
        assert f"`{flag} " in text or f"`{flag}`" in text, flag
