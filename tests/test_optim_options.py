"""--adam-betas, --adam-eps, --clip-norm, --optimizer adamw: checked at the boundary, carried by
checkpoints, and fixed for the rest of a run on --resume."""

import json
import os

import pytest
from conftest import train_config
from test_validation import SMALL, refused

from distbp import cli, fit, options
from distbp.config import Config
from distbp.data.datasets import spirals
from distbp.errors import UsageError
from distbp.loops.sync import train
from distbp.run import checkpoint


@pytest.mark.parametrize("argv, fragment", [
    (["--adam-betas", "0.9"], "--adam-betas must be two numbers in [0, 1)"),
    (["--adam-betas", "0.9,1.0"], "--adam-betas must be two numbers in [0, 1)"),
    (["--adam-betas=-0.1,0.9"], "--adam-betas must be two numbers in [0, 1)"),
    (["--adam-betas", "a,b"], "--adam-betas must be two numbers in [0, 1)"),
    (["--adam-betas", "nan,0.9"], "--adam-betas must be two numbers in [0, 1)"),
    (["--adam-eps", "0"], "--adam-eps must be a finite number > 0"),
    (["--adam-eps=-1e-8"], "--adam-eps must be a finite number > 0"),
    (["--clip-norm", "0"], "--clip-norm must be a finite number > 0"),
    (["--clip-norm", "inf"], "--clip-norm must be a finite number > 0"),
    (["--clip-norm", "nan"], "--clip-norm must be a finite number > 0"),
    (["--optimizer", "sgd", "--adam-betas", "0.9,0.99"], "--adam-betas works only with --optimizer adam or adamw"),
    (["--optimizer", "momentum", "--adam-eps", "1e-6"], "--adam-eps works only with --optimizer adam or adamw"),
    (["--optimizer", "lamb"], "--optimizer: invalid choice"),
])
def test_bad_optimizer_options_are_one_line_and_exit_2(capsys, tmp_path, argv, fragment):
    refused(capsys, tmp_path, SMALL + argv, fragment)


def test_the_options_from_toml_and_fit_are_the_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('optimizer = "adamw"\nadam-betas = [0.8, 0.99]\nadam-eps = 1e-6\nclip-norm = 1\n')
    config = options.from_args(cli.build_parser().parse_args(["train", "--config", str(toml)]))
    assert (config.adam_betas, config.adam_eps, config.clip_norm) == ("0.8,0.99", 1e-6, 1.0)
    data = spirals()
    with pytest.raises(UsageError, match="--adam-betas must be two numbers"):
        fit(data.X, data.y, layers=[2, 8, 3], adam_betas=(0.9, 1.5))
    with pytest.raises(UsageError, match="adam_betas must be two numbers"):
        fit(data.X, data.y, layers=[2, 8, 3], adam_betas=("x", "y"))
    with pytest.raises(UsageError, match="--clip-norm must be a finite number > 0"):
        fit(data.X, data.y, layers=[2, 8, 3], clip_norm=-1)
    Config(optimizer="adamw", adam_betas="0.8,0.99", adam_eps=1e-6, clip_norm=2.0).validate()


OPTIONS = ["--optimizer", "adamw", "--weight-decay", "0.1", "--adam-betas", "0.8,0.99", "--adam-eps", "1e-6",
           "--clip-norm", "0.05"]


@pytest.fixture(scope="module")
def interrupted(ray_session, tmp_path_factory):
    """An AdamW run with clipping: 8 steps whole, and the same run stopped after 4."""
    base = tmp_path_factory.mktemp("adamw")
    whole, part = str(base / "whole"), str(base / "part")
    assert cli.main(["train", *SMALL[:-2], "--steps", "8", *OPTIONS, "--out", whole]) == 0
    assert cli.main(["train", *SMALL[:-2], "--steps", "4", *OPTIONS, "--out", part]) == 0
    return whole, part


@pytest.mark.parametrize("flag, value", [("--adam-eps", "1e-7"), ("--adam-betas", "0.9,0.99"),
                                         ("--clip-norm", "1"), ("--optimizer", "adam")])
def test_resume_refuses_another_optimizer_constant(interrupted, capsys, flag, value):
    _, part = interrupted
    files = {f: open(os.path.join(part, f), "rb").read() for f in os.listdir(part)}
    capsys.readouterr()
    assert cli.main(["train", "--resume", part, "--steps", "8", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"distbp: error: {flag} ") and "differs from the run being resumed" in err, err
    assert len(err.splitlines()) == 1
    assert {f: open(os.path.join(part, f), "rb").read() for f in os.listdir(part)} == files


def test_resume_with_adamw_and_clipping_reaches_the_uninterrupted_bits(interrupted):
    whole, part = interrupted
    stored = checkpoint.load(os.path.join(part, "checkpoint.npz"))
    assert stored["config"]["clip_norm"] == 0.05 and stored["config"]["adam_betas"] == "0.8,0.99"
    assert set(stored["optimizer"]) == {"m", "v"}
    # the optimizer constants come from the checkpoint: --resume needs none of them again
    assert cli.main(["train", "--resume", part, "--steps", "8", "--servers", "2"]) == 0
    with open(os.path.join(whole, "summary.json")) as a, open(os.path.join(part, "summary.json")) as b:
        assert json.load(a)["weights_sha256"] == json.load(b)["weights_sha256"]


def test_async_takes_the_optimizer_options(ray_session, tmp_path):
    """--mode async applies each push with the same server code: the options reach it."""
    plain = train(train_config(tmp_path, mode="async", workers=1, optimizer="adamw", weight_decay=0.1))
    clipped = train(train_config(tmp_path, mode="async", workers=1, optimizer="adamw", weight_decay=0.1,
                                 clip_norm=1e-3))
    assert plain["weights_sha256"] != clipped["weights_sha256"]
