"""``distbp plot``: reads runs' metrics.jsonl and writes one PNG; bad runs are one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import train_config

from distbp.cli import main
from distbp.errors import DataError
from distbp.tools.plot import MISSING_MATPLOTLIB, read_run, smooth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(path: Path, steps: int = 12, spe: int = 4, extra: str = "", summary: bool = True) -> Path:
    """A run directory with metrics as the trainer writes them: step lines, then an eval line per epoch."""
    path.mkdir()
    lines = []
    for s in range(1, steps + 1):
        lines.append({"step": s, "epoch": (s - 1) // spe + 1, "loss": 1.0 / s, "time": 0.1 * s})
        if s % spe == 0:
            lines.append({"step": s, "epoch": s // spe, "validation_loss": 2.0 / s,
                          "validation_accuracy": 0.5 + 0.01 * s})
    (path / "metrics.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines) + extra)
    if summary:
        (path / "summary.json").write_text(json.dumps({"steps": steps, "epochs": steps / spe}))
    return path


def test_plot_of_real_runs_writes_a_png(ray_session, tmp_path: Path, capsys) -> None:
    from distbp.loops.sync import train

    runs = [train(train_config(tmp_path, steps=None, epochs=2, batch_size=b, val_fraction=0.2))["out"]
            for b in (60, 150)]
    out = tmp_path / "curves.png"
    assert main(["plot", *runs, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000

    import matplotlib.image

    # (4.2 x 16 in) * 110 dpi: the third panel is the gradient noise scale, which these runs have
    assert matplotlib.image.imread(str(out)).shape[:2] == (462, 1760)
    curves = read_run(runs[1])
    assert curves.eval_name == "validation" and curves.steps_per_epoch == 8  # 1200 samples / 150
    assert curves.eval_epoch == [1.0, 2.0] and len(curves.loss) == 16
    lines = [json.loads(line) for line in open(f"{runs[1]}/metrics.jsonl") if '"loss"' in line]
    assert curves.b_simple == [r["b_simple"] for r in lines] and curves.batch_size == 150
    fake = fake_run(tmp_path / "no-noise")  # a run without the noise scale: two panels, as before
    assert main(["plot", str(fake), "--out", str(out)]) == 0
    assert matplotlib.image.imread(str(out)).shape[:2] == (462, 1210)


def test_default_out_is_inside_the_first_run(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a")
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes().startswith(PNG_MAGIC)


def test_read_run_on_an_epoch_axis(tmp_path: Path) -> None:
    c = read_run(str(fake_run(tmp_path / "a")))
    assert c.steps_per_epoch == 4 and c.label == "a"
    assert c.step_epoch == [s / 4 for s in range(1, 13)]
    assert c.loss == [1.0 / s for s in range(1, 13)]
    assert c.eval_epoch == [1.0, 2.0, 3.0]
    assert c.eval_accuracy == pytest.approx([0.54, 0.58, 0.62])


def test_run_still_in_progress(tmp_path: Path) -> None:
    # No summary.json yet, and a last line half written: epochs come from where epoch 2 starts.
    run = fake_run(tmp_path / "a", steps=10, spe=4, extra='{"step": 11, "epo', summary=False)
    c = read_run(str(run))
    assert c.steps_per_epoch == 4 and len(c.loss) == 10


def test_a_resumed_run_keeps_the_last_record_of_each_step(tmp_path: Path) -> None:
    redo = "".join(json.dumps({"step": s, "epoch": 2, "loss": 9.0}) + "\n" for s in (7, 8))
    c = read_run(str(fake_run(tmp_path / "a", extra=redo)))
    assert len(c.loss) == 12 and c.loss[6:8] == [9.0, 9.0] and c.loss[8] == 1.0 / 9


def test_smooth() -> None:
    assert smooth([3.0] * 5, span=4) == pytest.approx([3.0] * 5)  # no pull towards 0 at the start
    assert smooth([1.0, 2.0, 3.0], span=1) == [1.0, 2.0, 3.0]
    # alpha = 1/2: weight 1/2 on the newest value, 1/4 on the one before, normalised.
    assert smooth([0.0, 4.0], span=2)[1] == pytest.approx((4 / 2 + 0 / 4) / (1 / 2 + 1 / 4))


def bad_runs(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    no_metrics = tmp_path / "no-metrics"
    no_metrics.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    corrupt = fake_run(tmp_path / "corrupt")
    text = (corrupt / "metrics.jsonl").read_text().split("\n")
    text[2] = "garbage"
    (corrupt / "metrics.jsonl").write_text("\n".join(text))
    return {
        "missing": (tmp_path / "nope", "no such run directory"),
        "file": (a_file, "no such run directory"),
        "no-metrics": (no_metrics, "not a distbp run directory (no metrics.jsonl)"),
        "empty": (empty, "no training steps recorded yet"),
        "corrupt": (corrupt, "line 3 is not a metrics record"),
    }


@pytest.mark.parametrize("case", ["missing", "file", "no-metrics", "empty", "corrupt"])
def test_bad_run_dir_is_one_line_and_status_2(tmp_path: Path, capsys, case: str) -> None:
    good = fake_run(tmp_path / "good")
    bad, words = bad_runs(tmp_path)[case]
    out = tmp_path / "out.png"
    assert main(["plot", str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distbp: error: ") and words in err, err
    assert not out.exists()
    with pytest.raises(DataError):
        read_run(str(bad))


@pytest.mark.parametrize("out, words", [("curves.svg", "ending in .png"),
                                        ("no-such-dir/curves.png", "cannot write there")])
def test_bad_out(tmp_path: Path, capsys, out: str, words: str) -> None:
    run = fake_run(tmp_path / "a")
    assert main(["plot", str(run), "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_without_matplotlib_says_how_to_install(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    run = fake_run(tmp_path / "a")
    assert main(["plot", str(run)]) == 2
    assert capsys.readouterr().err == f"distbp: error: {MISSING_MATPLOTLIB}\n"
    assert "pip install matplotlib" in MISSING_MATPLOTLIB
    assert not (run / "curves.png").exists()
