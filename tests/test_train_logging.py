"""What a training run shows and leaves besides its metrics: `train.progress` (a tqdm bar
on a terminal, plain lines otherwise), `cm3leon --log-level`, the `train.profile_steps`
trace."""

import io
import logging

import pytest

from cm3leon_jax.config import ConfigError
from cm3leon_jax.train.metrics import Progress, progress_line, read_metrics
from conftest import run_cli


class Terminal(io.StringIO):
    def isatty(self):
        return True


RECORD = {"step": 3, "loss": 1.23456, "tokens_per_s": 1234.5, "mfu": 0.1234,
          "eval_loss": 2.5}


def test_progress_line_is_plain():
    assert progress_line(RECORD, 10) == ("step 3/10  loss 1.2346  1,234 tokens/s  MFU 12.3%  "
                                         "eval_loss 2.5000")
    bare = {"step": 4, "loss": None, "tokens_per_s": 99.6, "mfu": None}
    assert progress_line(bare, 10) == "step 4/10  loss non-finite (update skipped)  100 tokens/s"


@pytest.mark.parametrize("mode,stream,lines,bar", [
    ("auto", io.StringIO, True, False),  # a file or a pipe: lines
    ("auto", Terminal, False, True),  # a terminal: the bar
    ("log", Terminal, True, False),
    ("bar", io.StringIO, False, True),
])
def test_progress_modes(mode, stream, lines, bar):
    out = stream()
    p = Progress(mode, total=10, initial=0, enabled=True, stream=out)
    assert (p.lines, not p.bar.disable) == (lines, bar)
    p.update(RECORD, logged=True)
    p.update({**RECORD, "step": 4}, logged=False)  # not a log_every step: no line
    p.close()
    assert out.getvalue() == (progress_line(RECORD, 10) + "\n" if lines else "")


def test_progress_off_on_other_processes():
    out = io.StringIO()
    p = Progress("log", total=10, initial=0, enabled=False, stream=out)
    assert not p.lines and p.bar.disable
    p.update(RECORD, logged=True)
    assert out.getvalue() == ""


@pytest.mark.parametrize("overrides,message", [
    (["train.profile_steps=[0, 2]"], r"train.profile_steps=\[0, 2\] must be \[start, stop\] "
                                     r"with 1 <= start <= stop <= train.steps=100"),
    (["train.profile_steps=[5, 3]"], r"train.profile_steps=\[5, 3\] must be"),
    (["train.profile_steps=[5]"], r"train.profile_steps=\[5\] must be"),
    (["train.profile_steps=[90, 101]"], r"<= train.steps=100"),
    (["train.progress=tqdm"], r"train.progress='tqdm' is not one of \['bar', 'log', 'auto'\]"),
    (["train.checkpoint_minutes=0"], r"train.checkpoint_minutes=0.0 must be > 0"),
])
def test_train_keys_are_checked_at_load(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


@pytest.fixture
def root_level():
    """Restores the root logger's level and handlers after a test that sets them through
    the CLI."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_sets_python_logging(capsys, root_level, where):
    args = ["config", "show", "--config", "configs/tiny.yaml"]
    argv = ["--log-level", "debug", *args] if where == "before" else [*args, "--log-level=INFO"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "optimizer:" in out
    assert root_level.level == (logging.DEBUG if where == "before" else logging.INFO)


def test_log_level_refuses_an_unknown_level(capsys, root_level):
    code, _, err = run_cli(capsys, "--log-level", "loud", "config", "show")
    assert code == 2 and "argument --log-level: invalid choice: 'LOUD'" in err


@pytest.mark.slow
def test_train_logs_plain_lines_and_writes_a_profile(capsys, root_level, tmp_path):
    """`cm3leon train` with stdout not a terminal (progress auto): one plain line per
    log_every step with the losses of metrics.jsonl, no carriage return anywhere; the
    profiled steps leave an XPlane trace in RUN/profile."""
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--config", "configs/tiny.yaml", "--workdir",
                             str(run), "train.steps=4", "train.log_every=2",
                             "optimizer.warmup_steps=1", "train.profile_steps=[2, 3]",
                             "--log-level", "WARNING")
    assert code == 0, err
    assert "\r" not in out and "\r" not in err
    logged = read_metrics(run)
    assert [m["step"] for m in logged] == [2, 4]
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split("  ")[:2] for line in lines] == [
        [f"step {m['step']}/4", f"loss {m['loss']:.4f}"] for m in logged]
    assert all(line.split("  ")[2].endswith(" tokens/s") for line in lines)
    assert out.splitlines()[-1].startswith("trained steps 1..4")
    traces = list((run / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
