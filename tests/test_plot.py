"""`modernlm plot`: the plotted lines are the runs' metrics (checked on the figures' own data), and
the command writes valid PNG files, several runs overlaid."""

from __future__ import annotations

import math

import pytest

from modernlm.cli import run_command
from modernlm.train.tracking import MetricsWriter

pytest.importorskip("matplotlib")

from modernlm.pipeline.plotting import FIGURES, curve_figures, run_labels, run_series  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 512


def write_run(run_dir, losses: dict[int, float], vals: dict[int, float]) -> None:
    """metrics.jsonl as the trainer writes it: a val line at step 0, train lines with tokens."""
    w = MetricsWriter(run_dir)
    for step in sorted(set(losses) | set(vals)):
        if step in losses:
            w.log(step, loss=losses[step], ppl=math.exp(losses[step]), lr=1e-3, tokens=step * TOKENS_PER_STEP,
                  skipped_steps=0)
        if step in vals:
            w.log(step, val_loss=vals[step], val_ppl=math.exp(vals[step]))
    w.close()


@pytest.fixture
def runs(tmp_path):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"  # same name: labels become a/run, b/run
    write_run(a, {1: 4.0, 2: 3.5, 4: 3.0, 6: 2.5}, {0: 4.2, 3: 3.4, 6: 2.7})
    write_run(b, {1: 4.1, 3: 3.9, 5: float("nan"), 6: 3.6}, {0: 4.2, 6: 3.7})  # nan: logged as "nan"
    return a, b


def test_series_are_the_metrics(runs):
    from modernlm.train.tracking import read_metrics

    a, b = runs
    s = run_series(read_metrics(a), "a")
    assert s.train_step == [1, 2, 4, 6] and s.train_loss == [4.0, 3.5, 3.0, 2.5]
    assert s.train_tokens == [TOKENS_PER_STEP * k for k in (1, 2, 4, 6)]
    assert s.train_ppl == pytest.approx([math.exp(v) for v in (4.0, 3.5, 3.0, 2.5)])
    assert s.val_step == [0, 3, 6] and s.val_loss == [4.2, 3.4, 2.7]
    # step 3 has no train line: its tokens are interpolated (exact at a constant tokens per step)
    assert s.val_tokens == [0, 3 * TOKENS_PER_STEP, 6 * TOKENS_PER_STEP]
    t = run_series(read_metrics(b), "b")
    assert t.train_step == [1, 3, 6] and t.train_loss == [4.1, 3.9, 3.6]  # the nan step is left out
    assert run_labels([a, b]) == ["a/run", "b/run"] and run_labels([a]) == ["run"]


def test_figures_draw_exactly_the_series(runs):
    from modernlm.train.tracking import read_metrics

    series = [run_series(read_metrics(d), label) for d, label in zip(runs, ["a", "b"], strict=True)]
    figures = curve_figures(series)
    assert set(figures) == set(FIGURES)
    for stem, (y, x) in FIGURES.items():
        ax = figures[stem].axes[0]
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"a train", "a val", "b train", "b val"}
        for s in series:
            for part in ("train", "val"):
                line = lines[f"{s.label} {part}"]
                xs, ys = s.xy(part, y, x)
                assert list(line.get_xdata()) == xs and list(line.get_ydata()) == pytest.approx(ys)
            # same colour for a run's train and val lines
            assert lines[f"{s.label} train"].get_color() == lines[f"{s.label} val"].get_color()
        assert ax.get_yscale() == ("log" if y == "ppl" else "linear")
    # the values really are the metrics: loss vs tokens of run a at its last point
    last = figures["loss_vs_tokens"].axes[0].get_lines()[0].get_xydata()[-1]
    assert tuple(last) == (6 * TOKENS_PER_STEP, 2.5)


def test_plot_command_writes_pngs(runs, tmp_path, capsys):
    a, b = runs
    out = tmp_path / "plots"
    assert run_command("plot", [str(a), str(b), "--out", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(written) == sorted(str(out / f"{stem}.png") for stem in FIGURES)
    from matplotlib.image import imread

    for path in written:
        data = open(path, "rb").read()
        assert data.startswith(PNG_SIGNATURE)
        height, width = imread(path).shape[:2]
        assert width > 300 and height > 200
    # one run: next to its metrics by default
    assert run_command("plot", [str(a)]) == 0
    assert all((a / f"{stem}.png").is_file() for stem in FIGURES)


def test_no_perplexity_where_the_loss_is_no_token_nll(runs, tmp_path, capsys):
    from modernlm.train.tracking import read_metrics

    dpo = tmp_path / "dpo"  # DPO, GRPO and the verifier log no ppl / val_ppl beside their loss
    w = MetricsWriter(dpo)
    for step, loss in [(1, 0.69), (2, 0.4)]:
        w.log(step, loss=loss, tokens=step * TOKENS_PER_STEP)
    w.log(2, val_loss=0.5)
    w.close()
    s = run_series(read_metrics(dpo), "dpo")
    assert s.xy("train", "ppl", "step") == ([], []) and s.xy("val", "ppl", "step") == ([], [])
    assert s.xy("train", "loss", "step") == ([1, 2], [0.69, 0.4])
    assert run_command("plot", [str(dpo)]) == 0
    assert sorted(capsys.readouterr().out.split()) == [str(dpo / "loss_vs_step.png"), str(dpo / "loss_vs_tokens.png")]
    # beside a pretraining run: the perplexity figures hold the pretraining run's lines alone
    series = [run_series(read_metrics(runs[0]), "a"), s]
    figures = curve_figures(series)
    assert [line.get_label() for line in figures["ppl_vs_step"].axes[0].get_lines()] == ["a train", "a val"]
    assert len(figures["loss_vs_step"].axes[0].get_lines()) == 4


def test_plot_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args, pattern in [([], "give one or more"), ([str(tmp_path / "none")], "no such directory"),
                          ([str(tmp_path / "empty")], "no metrics.jsonl")]:  # fmt: skip
        assert run_command("plot", args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and pattern in err, err
