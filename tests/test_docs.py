"""The generated tables of the documentation (make_docs.py) match their sources."""

import pytest

import make_docs


def test_every_generated_table_is_up_to_date(capsys):
    assert make_docs.main(["--check"]) == 0, capsys.readouterr().err


def test_the_methods_table_is_in_the_readme_and_in_the_registry(repo_root):
    from kd.methods import REGISTRY, equations_table

    table = equations_table()
    assert all(f"| `{name}` |" in table for name in REGISTRY)
    for document in ("README.md", "kd/methods.py"):
        assert table in (repo_root / document).read_text(), document


def test_a_stale_or_broken_table_is_found():
    fresh = make_docs.regenerate("a\n<!-- table:methods (x) -->\nold\n<!-- end table:methods -->\nb\n", "doc.md")
    assert "old" not in fresh and "| `selfevo` |" in fresh and fresh.startswith("a\n") and fresh.endswith("\nb\n")
    with pytest.raises(SystemExit, match="doc.md: unknown table 'nope'"):
        make_docs.regenerate("<!-- table:nope -->\nx\n<!-- end table:nope -->\n", "doc.md")
    with pytest.raises(SystemExit, match="doc.md: table:methods has no '<!-- end table:methods -->'"):
        make_docs.regenerate("<!-- table:methods -->\nx\n", "doc.md")
