"""Config files and flags: every option from either, flags over the file over the defaults."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from distbp import config as cfg
from distbp import options
from distbp.cli import build_parser, main
from distbp.config import Config
from distbp.errors import UsageError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def parse(*argv: str) -> Config:
    return options.from_args(build_parser().parse_args(["train", *argv]))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


SAMPLE = {int: (7, "7"), float: (0.25, "0.25"), str: ("abc", '"abc"'), bool: (True, "true")}


def test_every_option_can_come_from_a_file_or_a_flag(tmp_path: Path) -> None:
    """Both derive from Config's fields; a value for each field goes through each path unchanged."""
    toml, argv, expected = [], [], {}
    for f in fields(Config):
        kind = cfg.option_type(f)
        value, literal = SAMPLE[kind]
        if f.metadata.get("choices"):
            value = f.metadata["choices"][-1]
            literal = f'"{value}"'
        expected[f.name] = value
        toml.append(f"{cfg.flag(f.name)} = {literal}")
        argv += [f"--{cfg.flag(f.name)}"] + ([] if kind is bool else [str(value)])  # a bool is a switch
    assert options.load_toml(write(tmp_path, "\n".join(toml))) == expected
    ns = build_parser().parse_args(["train", *argv])
    assert {name: getattr(ns, name, "missing") for name in expected} == expected


def test_file_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, 'lr = 0.5\nworkers = 3\ndataset = "random:100,4,3"\nlr-schedule = "cosine"\n')
    config = parse("--config", path, "--lr", "0.1", "--warmup-steps", "9")
    assert config.lr == 0.1  # the flag wins over the file
    assert config.workers == 3 and config.dataset == "random:100,4,3" and config.lr_schedule == "cosine"
    assert config.warmup_steps == 9  # flag only
    assert config.batch_size == Config().batch_size  # neither: the default
    assert parse("--config", path).lr == 0.5


def test_dashes_or_underscores_and_friendly_toml_types(tmp_path: Path) -> None:
    path = write(tmp_path, "batch_size = 64\nmicro-batch = 16\nepochs = 3\nlayers = [2, 8, 3]\n"
                           'lr-schedule = "step"\nlr_step_epochs = [1, 2]\n')
    config = parse("--config", path)
    assert (config.batch_size, config.micro_batch) == (64, 16)
    assert config.epochs == 3.0 and isinstance(config.epochs, float)  # an int where a float goes
    assert config.layer_sizes() == (2, 8, 3)
    assert config.lr_step_epochs == "1,2"


def test_fractional_epochs_from_file_and_flag(tmp_path: Path) -> None:
    assert parse("--config", write(tmp_path, "epochs = 2.5\n")).epochs == 2.5
    assert parse("--epochs", "0.5").epochs == 0.5


@pytest.mark.parametrize("text, words", [
    ("learning_rate = 0.1\n", "unknown key 'learning_rate'"),
    ("[train]\nlr = 0.1\n", "unknown key 'train'"),
    ('lr = "fast"\n', "lr must be float, got 'fast'"),
    ("workers = 2.5\n", "workers must be int, got 2.5"),
    ("workers = true\n", "workers must be int, got True"),
    ('workers = "2"\n', "workers must be int, got '2'"),
    ("dataset = 3\n", "dataset must be str, got 3"),
    ("lr = 0.1\nlr = 0.2\n", "--config"),  # invalid TOML: a key twice
])
def test_bad_file_is_a_usage_error(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as exc:
        options.load_toml(path)
    assert str(exc.value).startswith(f"--config {path}: ") and words in str(exc.value), str(exc.value)


def test_values_from_a_file_are_validated_like_flags(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--batch-size must be at least 1"):
        parse("--config", write(tmp_path, "batch-size = 0\n"))
    with pytest.raises(UsageError, match="--optimizer: unknown value 'lamb'"):
        parse("--config", write(tmp_path, 'optimizer = "lamb"\n'))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        parse("--config", str(tmp_path / "nope.toml"))


def test_unknown_key_from_the_command_line(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "lr = 0.1\nbatch = 32\n")
    out = tmp_path / "never"
    assert main(["train", "--config", path, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"distbp: error: --config {path}: unknown key 'batch'\n"
    assert not out.exists()


def test_fashion_mnist_example_is_a_valid_config() -> None:
    config = parse("--config", str(EXAMPLES / "fashion-mnist.toml"))
    assert config.dataset == "fashion-mnist" and config.workers == 2
    assert config.layer_sizes()[0] == 784 and config.layer_sizes()[-1] == 10


@pytest.mark.parametrize("name", sorted(cfg.REMOVED_TRANSPORTS))
def test_a_removed_transport_is_one_line_naming_its_replacement(tmp_path: Path, capsys, name: str) -> None:
    """The names of the transports that `direct` replaced, as a flag or in a TOML file: exit 2,
    one line that says what to use instead, nothing created."""
    out = tmp_path / "never"
    for given in (["--transport", name], ["--config", write(tmp_path, f'transport = "{name}"\n')]):
        assert main(["train", *given, "--out", str(out)]) == 2
        assert capsys.readouterr().err == (f"distbp: error: --transport {name} was removed: use direct, "
                                           "which takes its place (the same bits)\n")
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert "--transport auto|direct|object-store" in shown  # the names offered: no removed one
