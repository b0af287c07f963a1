"""The `cm3leon` command: a thin dispatcher over the stages' own commands, each defined with
its stage (`<stage>/cli.py`), in the order of the flow.

    cm3leon config show|keys       the resolved config; every key          (config/cli.py)
    cm3leon prepare                source -> tokenizers -> document shards (data/cli.py)
    cm3leon tokenizer train-image  the VQ-GAN image tokenizer              (tokenizers/cli.py)
    cm3leon tokenizer eval-image   its reconstructions of held-out images  (eval/cli.py)
    cm3leon retrieval train-encoder | index | neighbors                    (retrieval/cli.py)
    cm3leon train | params         training; model size and state bytes   (train/cli.py)
    cm3leon compile                the train/generate step for a TPU pod   (aot/cli.py)
    cm3leon generate image|caption|infill                                  (generate/cli.py)
    cm3leon export | score         weights out; per-token log-probs       (export/, eval/)
    cm3leon eval fid|clip-score|t2i   FID, CLIP score, the text->image protocol  (eval/cli.py)
    cm3leon sweep | fit-scaling    scaling sweeps and their fits           (scaling/cli.py)
    cm3leon sft-data | sft | eval-sft   supervised fine-tuning             (sft/cli.py)
    cm3leon demo                   the main job end to end                 (demo/cli.py)

`cm3leon COMMAND --help` lists a command's arguments; `cm3leon config keys` every config key.
Failures are one line: bad input (a config error naming the key, a missing, unreadable or
invalid file) exits 2, a full disk or another failure exits 1; `--debug` (or
CM3LEON_DEBUG=1) shows the traceback instead. `--log-level LEVEL` (anywhere on the line,
like `--debug`) sets Python logging's level: INFO shows the libraries' progress messages,
DEBUG everything.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from cm3leon_jax.aot import cli as aot_cli
from cm3leon_jax.config import ConfigError
from cm3leon_jax.config import cli as config_cli
from cm3leon_jax.data import cli as data_cli
from cm3leon_jax.demo import cli as demo_cli
from cm3leon_jax.eval import cli as eval_cli
from cm3leon_jax.export import cli as export_cli
from cm3leon_jax.generate import cli as generate_cli
from cm3leon_jax.retrieval import cli as retrieval_cli
from cm3leon_jax.scaling import cli as scaling_cli
from cm3leon_jax.sft import cli as sft_cli
from cm3leon_jax.tokenizers import cli as tokenizers_cli
from cm3leon_jax.train import cli as train_cli

STAGES = (config_cli, data_cli, tokenizers_cli, retrieval_cli, train_cli, aot_cli, generate_cli,
          export_cli, eval_cli, scaling_cli, sft_cli, demo_cli)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None,
                   help="Python logging level (default: WARNING, INFO for prepare)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cm3leon", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _log_level_option(p)  # for --help; main() takes it from anywhere on the line
    sub = p.add_subparsers(dest="command", required=True)
    commands = {stage: stage.add_commands(sub) for stage in STAGES}
    # reads the source and computes FID: imports the tokenizers layer may not make
    eval_cli.add_tokenizer_commands(commands[tokenizers_cli])
    return p


BAD_INPUT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
             ValueError)  # what a user's files or arguments cause (besides ConfigError)
# A full disk as the libraries report it: OSError's errno, or TensorStore's status text
# (orbax raises it as a ValueError from its save threads).
DISK_FULL = ("No space left on device", "os_error_code='28'")


def _disk_full(e: BaseException) -> bool:
    return ((isinstance(e, OSError) and e.errno == errno.ENOSPC)
            or any(s in str(e) for s in DISK_FULL))


class _NoTracebacks(logging.Filter):
    """Library log records keep their message and lose their traceback (orbax logs one per
    failing save thread before the failure reaches the CLI's one line); --debug keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _set_log_level(argv: list[str]) -> list[str]:
    """Apply `--log-level` wherever it is on the line (before or after the command, as
    `--debug`); returns the line without it."""
    pre = argparse.ArgumentParser(prog="cm3leon", add_help=False, allow_abbrev=False)
    _log_level_option(pre)
    known, rest = pre.parse_known_args(argv)
    if known.log_level is not None:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger().setLevel(known.log_level)
    return rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CM3LEON_DEBUG") == "1"
    argv = _set_log_level(argv)
    args = parser().parse_args([a for a in argv if a != "--debug"])
    absl_log = logging.getLogger("absl")
    if not debug and not any(isinstance(f, _NoTracebacks) for f in absl_log.filters):
        absl_log.addFilter(_NoTracebacks())
    try:
        args.fn(args)
    except ConfigError as e:
        if debug:
            raise
        print(f"cm3leon {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback on demand
        if debug:
            raise
        full = _disk_full(e)
        what = "disk full" if full else type(e).__name__
        print(f"cm3leon {args.command}: {what}: {e} (--debug for the traceback)",
              file=sys.stderr)
        return 2 if isinstance(e, BAD_INPUT) and not full else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
