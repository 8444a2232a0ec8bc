"""CLI subcommands registered by hermes.data.commands.register (wired in by hermes.cli)."""

from __future__ import annotations

import argparse

import pytest

from hermes.data.commands import register


def _parser():
    p = argparse.ArgumentParser(prog="hermes")
    register(p.add_subparsers(dest="command"))
    return p


def test_synthetic_validate_preprocess_round_trip(tmp_path, capsys):
    p = _parser()
    args = p.parse_args(["data", "synthetic", str(tmp_path / "s"), "--cases", "2",
                         "--datasets", "synth_ct", "synth_t2"])
    assert args.func(args) == 0
    yaml_p = tmp_path / "s" / "collection.yaml"
    args = p.parse_args(["data", "validate", str(yaml_p), "--no-progress"])
    assert args.func(args) == 0
    args = p.parse_args(["preprocess", str(yaml_p), "--cache-dir", str(tmp_path / "c"),
                         "--spacing", "8", "--workers", "1", "--no-progress", "--order", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "cached 4 cases" in out and "kidney" in out
    # broken collection: exit code 1 and every problem on stderr
    (tmp_path / "s" / "synth_t2" / "labelsTr" / "synth_t2_000.nrrd").unlink()
    args = p.parse_args(["data", "validate", str(yaml_p), "--no-progress"])
    assert args.func(args) == 1
    assert "synth_t2_000" in capsys.readouterr().err


def test_generators_do_not_write_over_an_existing_collection(tmp_path, capsys):
    """`data synthetic` / `data starter` into a folder that holds a collection.yaml (or the
    dataset folders to write) refuse by name; --force replaces them, leaving no case of the
    earlier run behind."""
    p = _parser()
    mine = tmp_path / "proj" / "collection.yaml"
    mine.parent.mkdir()
    mine.write_text("name: my_precious_collection\n")
    for cmd in (["synthetic", "--cases", "1", "--datasets", "synth_ct"],
                ["starter", "--sources", "nope"]):
        args = p.parse_args(["data", cmd[0], str(mine.parent), *cmd[1:]])
        assert args.func(args) == 1
        assert "already holds collection.yaml" in capsys.readouterr().err
    assert mine.read_text() == "name: my_precious_collection\n"
    synth = ["data", "synthetic", str(tmp_path / "s"), "--datasets", "synth_ct", "--cases"]
    assert p.parse_args([*synth, "3"]).func(p.parse_args([*synth, "3"])) == 0
    args = p.parse_args([*synth, "2"])
    assert args.func(args) == 1 and "synth_ct" in capsys.readouterr().err
    args = p.parse_args([*synth, "2", "--force"])
    assert args.func(args) == 0
    assert len(list((tmp_path / "s" / "synth_ct" / "labelsTr").iterdir())) == 2
    args = p.parse_args(["data", "validate", str(tmp_path / "s" / "collection.yaml"),
                         "--no-progress"])
    assert args.func(args) == 0


def test_bad_synthetic_name_and_missing_subcommand(tmp_path, capsys):
    p = _parser()
    args = p.parse_args(["data", "synthetic", str(tmp_path), "--datasets", "synth_xray"])
    assert args.func(args) == 2
    assert "synth_xray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args(["data"])
    args = p.parse_args(["data", "starter", str(tmp_path / "st"), "--sources", "nope"])
    assert args.func(args) == 1
    assert "unknown source" in capsys.readouterr().err


def test_train_on_a_yaml_keeps_the_caches_preprocessing(tmp_path):
    """`hermes train c.yaml` after `hermes preprocess c.yaml --spacing 8 --order 1` trains on
    that cache (it failed: the cache 'was made with different parameters')."""
    from hermes.training.commands import open_cache

    p = _parser()
    args = p.parse_args(["data", "synthetic", str(tmp_path / "s"), "--cases", "2",
                         "--datasets", "synth_ct"])
    assert args.func(args) == 0
    yaml_p = tmp_path / "s" / "collection.yaml"
    args = p.parse_args(["preprocess", str(yaml_p), "--spacing", "8", "--workers", "1",
                         "--no-progress", "--order", "1"])
    assert args.func(args) == 0
    pc = open_cache(str(yaml_p), None, 1, False)
    assert pc.params["spacing"] == [8.0, 8.0, 8.0] and pc.params["image_order"] == 1
    # a spacing the YAML itself sets is not overridden by the cache's: a change is refused
    import yaml

    from hermes.data.preprocess import PreprocessError

    cfg = yaml.safe_load(yaml_p.read_text())
    yaml_p.write_text(yaml.safe_dump({**cfg, "spacing": 6.0}))
    with pytest.raises(PreprocessError, match=r"different parameters \(spacing \[8.0, 8.0, "
                       r"8.0\] there, \[6.0, 6.0, 6.0\] here\); give the cache folder itself"):
        open_cache(str(yaml_p), None, 1, False)
    # a YAML without a cache yet takes the given defaults (a model's preprocessing)
    yaml_p.write_text(yaml.safe_dump(cfg))
    pc = open_cache(str(yaml_p), str(tmp_path / "c2"), 1, False, {"spacing": [10.0] * 3})
    assert pc.params["spacing"] == [10.0, 10.0, 10.0]


def test_command_errors_and_warnings_name_the_command(tmp_path):
    """Errors of the data commands and Hermes' own warnings print as `hermes CMD: ...` lines
    (a warning without Python's source line); the CLI runs in a child process so that its
    warnings reach stderr as a user sees them."""
    import subprocess
    import sys

    def hermes(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hermes.cli", *argv], capture_output=True,
                              text=True, cwd=tmp_path)

    yaml_p = tmp_path / "s" / "collection.yaml"
    assert hermes("data", "synthetic", str(yaml_p.parent), "--cases", "2", "--datasets",
                  "synth_ct").returncode == 0
    again = hermes("data", "synthetic", str(yaml_p.parent), "--datasets", "synth_ct")
    assert again.returncode == 1
    assert again.stderr.startswith("hermes data synthetic: error: ")
    run = ["preprocess", str(yaml_p), "--spacing", "8", "--workers", "1", "--no-progress"]
    assert hermes(*run).returncode == 0
    yaml_p.write_text(yaml_p.read_text().replace("seed: 0", "seed: 5"))
    res = hermes(*run)
    assert res.returncode == 0
    line = next(x for x in res.stderr.splitlines() if "splits.json" in x)
    assert line.startswith("hermes preprocess: warning: ") and "seed 5" in line
    assert "load_or_create_splits(" not in res.stderr  # no source line


def test_warning_lines_of_the_cli():
    import os
    import warnings

    import hermes
    from hermes.cli import _warning_format

    fmt = _warning_format("hermes data validate", warnings.formatwarning)
    inside = os.path.join(os.path.dirname(hermes.__file__), "data", "splits.py")
    assert fmt("kept", UserWarning, inside, 3) == "hermes data validate: warning: kept\n"
    assert fmt("old", DeprecationWarning, inside, 3) == (
        "hermes data validate: warning (DeprecationWarning): old\n")
    sibling = os.path.dirname(hermes.__file__) + "_extras" + os.sep + "x.py"
    for other in (sibling, "/usr/lib/python3/site-packages/monai/metrics/utils.py"):
        assert fmt("theirs", FutureWarning, other, 7, "x = 1") == warnings.formatwarning(
            "theirs", FutureWarning, other, 7, "x = 1")


@pytest.mark.parametrize("argv, message", [
    (["data", "synthetic", "DIR", "--cases", "0"], "argument --cases: must be at least 1"),
    (["train", "c.yaml", "--checkpoint-every", "0"], "--checkpoint-every: must be at least 1"),
    (["train", "c.yaml", "--device", "gpu"], "--device: must be auto, cpu, cuda or cuda:N"),
    (["finetune", "m.hermes", "c.yaml", "--device", "tpu"], "--device: must be auto, cpu"),
    (["evaluate", "m.hermes", "c.yaml", "--device", "cuda:x"], "--device: must be auto, cpu"),
    (["preprocess", "c.yaml", "--workers", "0"], "--workers: must be at least 1"),
])
def test_nonsense_option_values_are_refused_when_parsed(argv, message, capsys):
    """Before any data is read: a count of 0 was taken as the default (or wrote a collection
    without cases) and an unknown --device reached torch after preprocessing."""
    from hermes.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_option_spellings_agree_across_commands():
    """-o for --out, --force for preprocess's --overwrite, -q for --no-progress, and lists of
    names separated by spaces or commas everywhere."""
    from hermes._text import name_list
    from hermes.cli import build_parser

    parse = build_parser().parse_args
    args = parse(["preprocess", "c.yaml", "--force", "-q"])
    assert args.overwrite and args.no_progress
    assert parse(["data", "validate", "c.yaml", "--quiet"]).no_progress
    args = parse(["train", "c.yaml", "-o", "run", "--datasets", "a,b", "c"])
    assert args.out == "run" and name_list(args.datasets) == ["a", "b", "c"]
    args = parse(["evaluate", "m.hermes", "c.yaml", "--datasets", "a", "b", "-o", "m.csv"])
    assert args.out == "m.csv" and name_list(args.datasets) == ["a", "b"]
    assert name_list(parse(["data", "synthetic", "D", "--datasets", "synth_ct,synth_t1"])
                     .datasets) == ["synth_ct", "synth_t1"]
    assert parse(["priors", "m.hermes", "-o", "p"]).out == "p"
