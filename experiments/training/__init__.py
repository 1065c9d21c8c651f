"""The trainer's parts (`python -m experiments.train` is its command line):

- `loop`: `train_and_evaluate`, a run in its phases (set-up, restore, the loop, evaluation, row);
- `runconfig`: a run's config, its validation and its identity (`config_hash`);
- `recipe`: durations in updates, learning-rate schedules, optimizers, the weight-decay mask;
- `state`: the train state and the compiled train and eval steps;
- `mixing`: Mixup, CutMix and label smoothing inside the train step;
- `checkpoint`: orbax checkpoints that are judged by reading them back;
- `steptable`: the table of runs, one row per run;
- `workdir`: a workdir's claim and the config it belongs to.
"""
