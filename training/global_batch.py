"""The global batch: tokens per optimizer step over every process, whatever the number of devices.

GPT-2-sized training is specified in tokens per optimizer step (about 0.5M for GPT-2 small), not
in batches: a config must train the same way on one GPU or on 64. ``--tokens_per_step`` says it
once; the batches each process accumulates follow from it, the micro-batch (``--data.batch_size``
sequences of ``block_size`` tokens) and the number of processes (devices x nodes):

    accumulate = tokens_per_step / (batch_size x block_size x processes)

With the data's seeding by optimizer step (data/lm.py), a step then trains on the same windows on
any number of processes. ``--max_tokens``, a token budget, and ``--trainer.max_steps``: training
stops at whichever comes first (the learning-rate decay ends there too).
``--trainer.val_check_interval``, which Lightning counts in training batches, is read as optimizer
steps here, so that a config validates at the same steps everywhere; and a resumed run's count of
batches done is made whole steps of its own accumulation (``rescale_batches_done``), on any number
of processes.
"""

from lightning.pytorch.utilities import rank_zero_info

from .errors import UsageError


def accumulation(tokens_per_step: int, batch_size: int, block_size: int, processes: int) -> int:
    """Batches each process accumulates per optimizer step, or UsageError when the global batch is
    not a whole number of micro-batches on every process."""
    if tokens_per_step < 1:
        raise UsageError(f"--tokens_per_step {tokens_per_step}: give the tokens of one optimizer "
                         f"step over all processes (e.g. 524288), or null for one batch per step")
    per_round = batch_size * block_size * processes  # one micro-batch on every process
    if tokens_per_step % per_round:
        lower = max(per_round, tokens_per_step // per_round * per_round)
        raise UsageError(
            f"--tokens_per_step {tokens_per_step:,} is not a multiple of one batch on every "
            f"process: {batch_size} sequences x {block_size} tokens x {processes} "
            f"process{'es' if processes > 1 else ''} = "
            f"{per_round:,} tokens; give a multiple of {per_round:,} (e.g. {lower:,}), or change "
            f"--data.batch_size")
    return tokens_per_step // per_round


def planned_steps(max_steps: int | None, max_tokens: int | None,
                  tokens_per_step: int | None) -> int | None:
    """The steps a run trains: ``max_steps`` or the token budget's, whichever comes first (-1 or
    None: no limit of that kind)."""
    if not (max_tokens and tokens_per_step):
        return max_steps
    budget = max_tokens // tokens_per_step
    return budget if max_steps in (None, -1) else min(max_steps, budget)


def apply_tokens_per_step(trainer, tokens_per_step: int, batch_size: int, block_size: int,
                          max_tokens: int | None = None) -> None:
    """Set the Trainer's accumulation from the global batch, its validation interval in optimizer
    steps and, with a token budget ``max_tokens``, its ``max_steps``; print what it came to."""
    processes = trainer.world_size
    accumulate = accumulation(tokens_per_step, batch_size, block_size, processes)
    asked = trainer.accumulate_grad_batches
    if asked not in (1, accumulate):
        raise UsageError(f"--trainer.accumulate_grad_batches {asked} contradicts --tokens_per_step "
                         f"{tokens_per_step:,}, which needs {accumulate} here; give one of them")
    trainer.accumulate_grad_batches = accumulate
    interval = trainer.val_check_interval
    validation = ""
    if isinstance(interval, int) and not isinstance(interval, bool):
        trainer.val_check_interval = interval * accumulate  # Lightning counts batches
        validation = f"; validation every {interval} steps" if interval > 1 else \
            "; validation at every step"
    budget = ""
    if max_tokens is not None:
        if max_tokens < tokens_per_step:
            raise UsageError(f"--max_tokens {max_tokens:,} is less than one step of "
                             f"--tokens_per_step {tokens_per_step:,}: give a larger budget")
        steps = max_tokens // tokens_per_step
        if planned_steps(trainer.max_steps, max_tokens, tokens_per_step) == steps:  # the budget's
            trainer.fit_loop.epoch_loop.max_steps = steps  # (and the lr decay with it)
            budget = f"; {steps:,} steps for --max_tokens {max_tokens:,}"
        else:  # a number of steps ends it first (a short test of a config), and the line says so
            budget = (f"; trainer.max_steps {trainer.max_steps:,} ends it first, before "
                      f"--max_tokens {max_tokens:,} ({steps:,} steps; --trainer.max_steps -1 "
                      f"for those)")
    plural = {"es": "es" if processes > 1 else "", "batches": "es" if accumulate > 1 else ""}
    rank_zero_info(f"Tokens per step: {tokens_per_step:,} = {batch_size} sequences x "
                   f"{block_size:,} tokens x {processes} process{plural['es']} x {accumulate} "
                   f"accumulated batch{plural['batches']}{validation}{budget}")


def rescale_batches_done(checkpoint: dict, accumulate: int) -> None:
    """Make a checkpoint's count of training batches done whole optimizer steps of this run's
    accumulation: steps done x ``accumulate``.

    Lightning counts the batches of the epoch, steps the optimizer when that count reaches a
    multiple of the accumulation, and validates at multiples of the interval. A checkpoint of a run
    stopped between the batches of a step (Ctrl-C, SIGTERM) counts the batches it had accumulated,
    whose gradients it does not hold; one resumed with another accumulation (saved by 2 processes,
    resumed by 1) counts in the old unit. Either way the count would fall between steps, and each
    later step would mix the windows of two: the resumed run instead redoes the interrupted step
    from its first batch, where the data loader starts it (data/lm.py)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if progress is None:
        return
    # Lightning saves in the middle of a batch's hooks (its "completed" one behind "ready") and
    # knows how to resume from there: every counter moves by the same amount, so that "ready" is
    # the last batch of the last whole step, as in a checkpoint saved at the end of that step
    batches = checkpoint["global_step"] * accumulate
    for counter in ("total", "current"):
        shift = batches - progress[counter]["ready"]
        progress[counter].update({key: n + shift for key, n in progress[counter].items()})
