"""The ladder: every step (and side branch) trained per seed, rendered beside the paper, compared
across budgets.

  python -m experiments.ladder steps|run|show|calibrate|compare ...   (`commands.main`)

- `steps`: parameters and multiply-accumulates of every step beside Tables 10 and 11;
- `run`: each (step, seed) trained once through the trainer, resumably, several ladders sharing
  the work of one output folder;
- `view`: the step table as the paper's ladder (Markdown, JSON, chart);
- `calibrate`: a recipe's settings chosen on a validation split;
- `compare`: two ladders of one config at two budgets (or scales, or data sets) side by side.
"""


def main(argv: list[str] | None = None) -> int:
  """`python -m experiments.ladder ARGS` (imported when called: importing the package is cheap)."""
  from experiments.ladder.commands import main as command  # pylint: disable=import-outside-toplevel
  return command(argv)
