"""tbo-compile refuses bad arguments before compiling: one line naming the cause, exit non-zero,
nothing written."""
from __future__ import annotations

import pytest

from tbo_compiler.cli import main


@pytest.mark.parametrize("extra, says", [
    (["--ep", "0"], "--ep: expected a positive integer, got 0"),
    (["--mtp", "-1"], "--mtp: expected a positive integer, got -1"),
    (["--mtp", "0"], "--mtp: expected a positive integer, got 0"),
    (["--block-size", "0"], "--block-size: expected a positive integer, got 0"),
    (["--layers", "0"], "--layers: expected a positive integer, got 0"),
    (["--max-blocks", "x"], "--max-blocks: expected a positive integer, got 'x'"),
])
def test_bad_numbers_are_refused_by_name(tmp_path, capsys, extra, says):
    assert main([str(tmp_path), "-o", str(tmp_path / "plan.pt"), *extra]) == 2
    assert capsys.readouterr().err == f"tbo-compile: argument {says}\n"  # one line, no usage block
    assert list(tmp_path.iterdir()) == []


def test_output_directory_or_unwritable_is_refused_before_compiling(tmp_path, capsys):
    assert main([str(tmp_path / "no-model"), "-o", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert main([str(tmp_path / "no-model"), "-o", str(tmp_path / "missing" / "plan.pt")]) == 1
    assert "not a writable directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
