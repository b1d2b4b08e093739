"""What a run evaluates beside its loss, and logs: text samples from a GPT at each validation, and
a translation model's sacreBLEU, greedy at each validation and with beam search once training
ends. Each function takes the LightningModule whose model, tokenizer, options and trainer it
uses."""

import time

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from model.translate import bleu, bleu_by_length_penalty, bleu_signature, translate


def _log_table(module: L.LightningModule, key: str, columns: list[str], data: list[list]):
    for logger in module.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_text(key, columns=columns, data=data)


def log_samples(module: L.LightningModule, count: int, tokens: int) -> None:
    """``count`` samples of ``tokens`` tokens from the start token, printed and logged as text (the
    same random draws at every validation, so that they compare)."""
    start = torch.full((count, 1), module.tokenizer.start_token, device=module.device)
    generator = torch.Generator(module.device).manual_seed(0)
    rows = module.model.generate(start, tokens, temperature=0.8, top_k=200, generator=generator)
    texts = [module.tokenizer.decode(row[1:].tolist()) for row in rows]
    rank_zero_info(f"\nSamples at step {module.global_step}:\n" + "\n---\n".join(texts))
    _log_table(module, "val/samples", ["step", "sample"],
               [[module.global_step, text] for text in texts])


def bleu_on_split(module: L.LightningModule, split: str, beam_size: int = 1,
                  length_penalty: float = 1.0) -> tuple[dict[str, float], list[str]]:
    """sacreBLEU of the model's translations of a split of the data module's pairs, and the
    translations."""
    sources, references = module.trainer.datamodule.texts[split]
    hypotheses = translate(module.model, module.tokenizer, sources, beam_size, length_penalty,
                           truncate=True)
    return bleu(hypotheses, references), hypotheses


def log_val_bleu(module: L.LightningModule) -> None:
    """Greedy sacreBLEU on the val split (``val/bleu``, ``val/bleu_lc``), with three examples."""
    scores, hypotheses = bleu_on_split(module, "val")  # greedy: no length penalty
    for name, value in scores.items():
        module.log(f"val/{name}", value, rank_zero_only=True, batch_size=1)
    sources, references = module.trainer.datamodule.texts["val"]
    examples = [[module.global_step, sources[i], hypotheses[i], references[i]] for i in range(3)]
    rank_zero_info(f"\nStep {module.global_step}: val sacreBLEU {scores['bleu']:.2f} (lowercase "
                   f"{scores['bleu_lc']:.2f}), greedy, {bleu_signature()}\n"
                   + "\n".join(f"  {s}\n  -> {h}\n  (ref: {r})" for _, s, h, r in examples))
    _log_table(module, "val/translations", ["step", "source", "translation", "reference"],
               examples)


def final_bleu(module: L.LightningModule) -> float:
    """The final weights translate val with beam search (``beam_size``), after choosing the length
    penalty among ``tune_length_penalty`` on the dev split, never on val (else the module's
    ``length_penalty``): ``final/bleu``, ``final/bleu_lc``, ``final/length_penalty``. A test split,
    where the data has one, is scored once, with the same settings: ``final/test_bleu``,
    ``final/test_bleu_lc``. Returns the length penalty."""
    trainer, hp = module.trainer, module.hparams
    alpha = hp.length_penalty
    start = time.perf_counter()
    # Lightning's teardown moved the model to the CPU when fit ended: search on the device it
    # trained on, then put it back
    module.eval().to(trainer.strategy.root_device)
    try:
        if hp.tune_length_penalty:
            sources, references = trainer.datamodule.texts["dev"]
            by_alpha = bleu_by_length_penalty(module.model, module.tokenizer, sources, references,
                                              hp.beam_size, hp.tune_length_penalty)
            alpha = max(by_alpha, key=by_alpha.get)
            rank_zero_info(f"Dev sacreBLEU (beam {hp.beam_size}) by length penalty: "
                           + ", ".join(f"{a}: {s:.2f}" for a, s in by_alpha.items())
                           + f"; using {alpha}")
        metrics, results = {"length_penalty": alpha}, []
        for split, prefix in (("val", ""), ("test", "test_")):
            if split in trainer.datamodule.texts:
                scores, _ = bleu_on_split(module, split, hp.beam_size, alpha)
                metrics.update({prefix + name: value for name, value in scores.items()})
                results.append(f"{split} {scores['bleu']:.2f} cased, "
                               f"{scores['bleu_lc']:.2f} lowercase")
    finally:
        module.cpu()
    rank_zero_info(f"Final sacreBLEU (beam {hp.beam_size}, length penalty {alpha}): "
                   f"{'; '.join(results)} ({bleu_signature()}); "
                   f"{time.perf_counter() - start:.0f} s of evaluation. scripts/translate.py: "
                   f"--beam {hp.beam_size} --length-penalty {alpha}")
    for logger in trainer.loggers:
        logger.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
    return alpha
