"""tbo-compile refuses bad arguments before compiling: one line naming the cause, exit non-zero,
nothing written."""
from __future__ import annotations

import os
import re
import stat

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
    assert main([str(tmp_path / "no-model"), "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main([str(tmp_path / "no-model"), "-o", str(tmp_path / "missing" / "plan.pt")]) == 2
    assert "not a writable directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_not_a_plain_file_is_never_replaced(tmp_path, capsys):
    """-o refuses, before compiling, a path that holds something other than a regular file (a device,
    FIFO, socket, directory, or a symlink without --force) and a path inside the model directory;
    --dump-dir refuses an existing file. Nothing at those paths changes."""
    import socket

    from tbo_compiler.cli import output_problem

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    # /dev/null itself: the check is a pure function, so nothing is ever written to it here
    assert output_problem("/dev/null", str(model)) == "-o /dev/null is a character device, not a plan file"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    target = tmp_path / "target.pt"
    target.write_text("keep")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    cases = {str(fifo): "is a FIFO, not a plan file", str(sock_path): "is a socket, not a plan file",
             str(link): "is a symbolic link; pass --force", str(model / "config.json"): "is inside the model directory",
             str(model / "plan.pt"): "is inside the model directory"}
    for out, says in cases.items():
        assert main([str(model), "-o", out]) == 2, out
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    sock.close()
    assert (model / "config.json").read_text() == "{}" and target.read_text() == "keep" and link.is_symlink()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not (model / "plan.pt").exists()
    assert output_problem(str(link), str(model), force=True) is None
    assert main([str(model), "-o", str(tmp_path / "p.pt"), "--dump-dir", str(target)]) == 2
    assert "--dump-dir" in capsys.readouterr().err and target.read_text() == "keep"


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    from tbo_compiler import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tbo-compile {__version__}\n"
    r = subprocess.run([sys.executable, "-m", "tbo_compiler", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"tbo-compile {__version__}\n"


@pytest.mark.parametrize("extra, says", [
    (["--mode", "prefill", "--decode-batch", "4"], "--decode-batch is a decode option"),
    (["--mtp", "2"], "--mtp is a decode option"),
    (["--check", "plan.pt"], "give -o (compile) or --check, not both"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, capsys, extra, says):
    assert main([str(tmp_path / "model"), "-o", str(tmp_path / "plan.pt"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert list(tmp_path.iterdir()) == []


def test_no_split_and_comm_counts_are_said_as_the_summary_says_them(tiny_dirs, tmp_path, capsys):
    d = str(tiny_dirs["qwen3_moe"])
    assert main([d, "-o", str(tmp_path / "s.pt"), "--ep", "2", "--tokens", "16", "--dtype", "float32",
                 "--profile", "cpu", "--no-split"]) == 0
    out = capsys.readouterr().out
    assert "T=16: not split (--no-split); serial program" in out and "too few tokens" not in out
    assert main([d, "-o", str(tmp_path / "t.pt"), "--ep", "2", "--tokens", "16", "--dtype", "float32",
                 "--profile", "cpu", "--dump-dir", str(tmp_path / "dumps")]) == 0
    out = capsys.readouterr().out
    n = int(re.search(r"(\d+) comm ops found \(each run once per ubatch\)", out).group(1))
    summary = next((tmp_path / "dumps").rglob("summary.txt")).read_text()
    assert f"{n} comm ops found" in summary


def test_layers_and_ep_errors_use_the_cli_words(tiny_dirs, tmp_path, capsys):
    d = str(tiny_dirs["qwen3_moe"])
    assert main([d, "-o", str(tmp_path / "p.pt"), "--layers", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tbo-compile: --layers 9: the model has ") and "num_layers" not in err, err
    assert main([d, "-o", str(tmp_path / "p.pt"), "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tbo-compile: --ep 3: the model's ") and "ep_size" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_config_json_alone_is_enough_to_compile(tiny_dirs, tmp_path):
    """As the README says (and the compile-time bench relies on): no weights are read at compile."""
    import shutil

    d = tmp_path / "config_only"
    d.mkdir()
    shutil.copy(tiny_dirs["qwen3_moe"] / "config.json", d / "config.json")
    assert main([str(d), "-o", str(tmp_path / "p.pt"), "--tokens", "16", "--dtype", "float32",
                 "--profile", "cpu"]) == 0
    assert (tmp_path / "p.pt").stat().st_size > 0
