"""README.md and docs/*.md held to the code, so that they cannot drift apart again.

Every ``--flag`` the pages name exists (in the command they give it to, and at all); every
``distbp.name`` they name resolves; ``--resume``'s list of what may change is one list in code,
docs and help; the Tune example uses the public API only; a test skipped for a missing package
says what to install, and installing it cures the skip.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

import distbp
from distbp import cli, options
from distbp.config import Config
from distbp.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLUSTER_README = ROOT / "cluster" / "README.md"
# Scripts, examples and the commands run as modules (python -m distbp.tools.costmodel): their parsers, read alike
SCRIPTS = sorted((ROOT / "scripts").rglob("*.py")) + sorted((ROOT / "examples").glob("*.py")) \
    + sorted((ROOT / "distbp" / "tools").glob("*.py"))

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Flags the pages give to other programs: ray job submit, ray start, torchrun, tensorboard.
OTHER_TOOLS = {"--working-dir", "--nnodes", "--max-restarts", "--logdir", "--resources", "--num-cpus"}


# ---- what the code accepts --------------------------------------------------------------------

def long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


def subcommands() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``distbp`` parser, and its parser of each command."""
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, commands.choices


def distbp_flags() -> dict[str, set[str]]:
    """``{command: its --flags}`` for each ``distbp`` command; ``""``: the flags of bare ``distbp``."""
    parser, commands = subcommands()
    return {"": long_flags(parser)} | {name: long_flags(sub) for name, sub in commands.items()}


def script_flags(path: Path) -> set[str]:
    """The ``--flags`` a script's argparse parser takes, read from its source (nothing is run)."""
    found = {"--help"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return found


# ---- what the pages say -----------------------------------------------------------------------

def code_pieces(path: Path) -> list[str]:
    """Each line of the page's fenced code blocks (``\\``-continued lines joined) and each inline
    code span (one may run over a line break)."""
    block, prose, inside = [], [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            block.append("")
            continue
        (block if inside else prose).append(line)
    pieces = "\n".join(block).replace("\\\n", " ").splitlines()
    for paragraph in "\n".join(prose).split("\n\n"):
        pieces += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", paragraph)]
    return pieces


COMMAND = re.compile(r"\bdistbp (?P<command>train|verify|plot|convert|timeline)\b"
                     r"|(?P<script>\b(?:scripts|examples)/[\w/]+\.py)"
                     r"|(?P<submit>\bcluster/submit\.sh\b)")


def invocations(piece: str) -> list[tuple[str, str]]:
    """``(command, its arguments)`` for each command line in ``piece``: a ``distbp`` command's name,
    a script's path, or ``train`` for what ``cluster/submit.sh -- ...`` passes on."""
    found = []
    for segment in re.split(r"&&|\|\||[;|]", re.sub(r"(^|\s)#.*", "", piece)):
        match = COMMAND.search(segment)
        if match is None:
            continue
        rest = segment[match.end():]
        if match["submit"]:
            if " -- " not in f" {rest} ":
                continue
            found.append(("train", f" {rest} ".split(" -- ", 1)[1]))
        else:
            found.append((match["command"] or match["script"], rest))
    return found


def unknown_flags(pages: list[Path]) -> list[str]:
    """``page: command --flag`` for each flag given to a ``distbp`` command or a script on
    ``pages`` that the command does not take."""
    commands = distbp_flags()
    scripts = {str(p.relative_to(ROOT)): script_flags(p) for p in SCRIPTS}
    bad = []
    for page in pages:
        for piece in code_pieces(page):
            for command, args in invocations(piece):
                takes = commands.get(command) or scripts.get(command)
                assert takes is not None, f"{page.name}: `{piece}` runs {command}, which does not exist"
                bad += [f"{page.name}: {command} {f}" for f in FLAG.findall(args) if f not in takes]
    return bad


def test_every_flag_given_to_a_command_in_the_docs_is_one_it_takes() -> None:
    assert unknown_flags([*PAGES, CLUSTER_README]) == []


def test_every_flag_the_docs_name_exists() -> None:
    """A flag named in prose (``--keep-checkpoints N`` keeps ...) belongs to some command."""
    known = set().union(*distbp_flags().values(), *map(script_flags, SCRIPTS), OTHER_TOOLS)
    named = {f"{page.name}: {f}" for page in PAGES for f in FLAG.findall(page.read_text()) if f not in known}
    assert named == set()


def test_the_check_catches_a_renamed_flag(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Keep them: `distbp train --keep-checkpoint 3`.\n\n```bash\ndistbp convert fashion-mnist d \\\n"
                    "  --rows 10 && distbp train --dataset npy:d --epochs 1   # --not-a-flag in a comment\n```\n"
                    "`cluster/submit.sh --no-wait -- --worker 2` and `python scripts/bench.py --node 2`.\n")
    assert sorted(unknown_flags([page])) == ["page.md: convert --rows", "page.md: scripts/bench.py --node",
                                             "page.md: train --keep-checkpoint", "page.md: train --worker"]


def test_the_train_options_of_the_readme_are_in_distbp_train_help(capsys: pytest.CaptureFixture) -> None:
    """The README's list of options against ``distbp train --help`` itself, as a user reads it."""
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    shown = set(FLAG.findall(capsys.readouterr().out))
    readme = (ROOT / "README.md").read_text()
    listed = readme[readme.index("## Command line"):readme.index("Bad input")]
    listed = listed[:listed.index("Also `distbp verify`")]  # then the other commands
    assert set(FLAG.findall(listed)) - shown == set()
    assert len(set(FLAG.findall(listed))) > 30


# ---- names --------------------------------------------------------------------------------------

DOTTED = re.compile(r"(?<![\w/.-])distbp(?:\.[A-Za-z_]\w*)+(?![\w-])")


def resolve(name: str):
    """The object ``distbp.a.b.c`` names: the longest module prefix imported, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:  # distbp.Network.from_checkpoint: an attribute, not a module
            continue
    for attr in parts[i:]:
        obj = getattr(obj, attr)
    return obj


@pytest.mark.parametrize("page", [*PAGES, CLUSTER_README], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_name_the_docs_give_exists(page: Path) -> None:
    missing = []
    for name in sorted(set(DOTTED.findall(page.read_text()))):
        try:
            resolve(name)
        except (AttributeError, ModuleNotFoundError):
            missing.append(name)
    assert missing == []


# ---- --resume: one list -------------------------------------------------------------------------

def flags_in(text: str) -> list[str]:
    return FLAG.findall(text)


def test_resume_help_error_and_docs_name_the_same_options(tmp_path: Path) -> None:
    train = subcommands()[1]["train"]
    code = ["--" + name.replace("_", "-") for name in options.RESUMABLE]
    assert set(code) <= long_flags(train)

    (resume,) = [a for a in train._actions if "--resume" in a.option_strings]
    help_ = resume.help.split(" only ", 1)[1].split(" may ", 1)[0]

    with pytest.raises(UsageError) as refused:
        options.for_resume(Config().to_dict(), {"layers": "2,8,3"}, str(tmp_path))
    error = str(refused.value).split(" may change only ", 1)[1]

    docs = (ROOT / "docs" / "reliability.md").read_text()
    docs = docs.split("give new values to these options only", 1)[1].split("(none of them", 1)[0]
    docs = docs.split("):", 1)[1]  # after the sentence's own aside

    assert flags_in(help_) == code
    assert flags_in(error) == code
    assert sorted(flags_in(docs)) == sorted(code)


# ---- the Tune example ---------------------------------------------------------------------------

def test_the_tune_example_uses_only_the_public_api() -> None:
    tree = ast.parse((ROOT / "examples" / "tune_lr.py").read_text())
    private = [ast.unparse(n) for n in ast.walk(tree)
               if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("distbp")
               or isinstance(n, ast.Import) and any(a.name.startswith("distbp.") for a in n.names)]
    assert private == []
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "distbp"}
    assert used and used <= set(distbp.__all__)


# ---- skipped tests say what to install ----------------------------------------------------------

def skips(path: Path):
    """``(what is skipped, condition's source, its reason)`` for each importorskip and skipif in ``path``."""
    tree = ast.parse(path.read_text())
    strings = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
               for t in n.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in ("importorskip", "skipif"):
            continue
        reason = next((k.value for k in node.keywords if k.arg == "reason"), None)
        text = strings.get(reason.id, "") if isinstance(reason, ast.Name) else ast.unparse(reason) if reason else ""
        yield node.func.attr, ast.unparse(node.args[0]), text


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("test_*.py")), ids=lambda p: p.name)
def test_a_skip_for_something_missing_says_what_to_install(path: Path) -> None:
    for kind, condition, reason in skips(path):
        if kind == "skipif" and re.search(r"platform|memfd", condition):
            continue  # not something to install
        assert re.search(r"(pip|apt-get) install", reason), f"{path.name}: {kind}({condition}) reason {reason!r}"
        if kind == "importorskip":  # and the extra it names has the package
            module = ast.literal_eval(condition).split(".")[0].lower()
            for extra in re.findall(r"\.\[([\w-]+)\]", reason):
                assert any(r.lower().startswith(module) for r in extras()[extra]), (path.name, module, extra)


def test_the_dev_extra_has_what_the_tests_import_but_torch() -> None:
    dev = " ".join(extras()["dev"])
    for module in ("pyarrow", "s3fs", "moto", "tensorboardX", "mlflow"):
        assert module in dev
    assert "torch" not in dev and any(r.startswith("torch") for r in extras()["reference"])


# ---- scripts/bench.py ---------------------------------------------------------------------------

def bench_module():
    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("no_ddp", [False, True])
def test_bench_says_in_one_line_why_the_ddp_column_is_missing(no_ddp: bool, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    bench = bench_module()
    monkeypatch.setattr(bench, "torch_available", lambda: False)
    runs = []
    monkeypatch.setattr(bench, "measure", lambda args, *rest: runs.append(args.no_ddp) or 0)
    assert bench.main(["--configs", "float64:256"] + ["--no-ddp"] * no_ddp) == 0
    assert runs == [True]
    err = capsys.readouterr().err
    if no_ddp:  # asked for: nothing to say
        assert err == ""
    else:
        assert err.count("\n") == 1, err
        assert "DDP column is left out" in err and "torch is not installed" in err
        assert 'pip install -e ".[reference]"' in err


def test_bench_help_is_the_module_docstring(capsys: pytest.CaptureFixture) -> None:
    bench = bench_module()
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "For each config (dtype, global batch B)" in out
    assert "python scripts/bench.py --nodes 2 --out bench-2n.json" in out  # examples keep their lines


# ---- ignore files --------------------------------------------------------------------------------

def test_ignore_files_keep_data_out_and_the_package_in() -> None:
    """``data/`` (what README's ``distbp convert`` writes) is ignored by git and by Ray's job upload,
    which reads .gitignore and .rayignore as gitignore patterns: anchored, so that ``distbp/data/``
    still goes with the job."""
    pathspec = pytest.importorskip("ray._private.thirdparty.pathspec",
                                   reason="Ray's own matcher moved: pip install -e . (ray[default])")
    lines = (ROOT / ".gitignore").read_text().splitlines() + (ROOT / ".rayignore").read_text().splitlines()
    spec = pathspec.PathSpec.from_lines("gitwildmatch", lines)
    assert spec.match_file("data/fmnist/X-00000.npy") and spec.match_file("runs/x/summary.json")
    package = [str(p.relative_to(ROOT)) for p in (ROOT / "distbp").rglob("*.py")]
    assert [p for p in package if spec.match_file(p)] == []
    assert "distbp/data/datasets.py" in package
