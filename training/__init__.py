"""The Lightning side of ``train.py``, one concern per module, below the training program.

    cli.py            the command line: LightningCLI with the run's folder, checkpoints, monitors,
                      ``auto`` precision and attention path, and resuming; the Trainer
    resume.py         what a resumed run or a warm start may change, and the messages when not
    runs.py           run folders, metrics.csv, wandb, and the config each run records
    callbacks.py      EMA of the weights, throughput and MFU, time to a target loss
    checkpointing.py  last.ckpt at every validation, interval and the final step, and on Ctrl-C
                      or SIGTERM; atomic writes
    optimization.py   the optimizer's options in range, changed on a resume, and the NaN advice
    run_state.py      what a run carries across a resume beside Lightning's state: its clock and
                      random states
    evaluation.py     what a run evaluates beside its loss: samples, a translation model's BLEU
    console.py        what a run prints: the project's lines, not the libraries' noise
    memory.py         big CPU tensors kept for reuse between steps (glibc's malloc)
    errors.py         how train.py and every script end: one line and an exit status

Nothing here imports train.py, and this file imports nothing, so that the scripts that need
only ``errors`` or ``memory`` do not load Lightning.
"""
