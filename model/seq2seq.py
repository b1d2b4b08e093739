"""An encoder-decoder Transformer for translation, built from the same blocks as GPT.

The encoder reads the source with bidirectional self-attention (padding hidden by a key mask); each
decoder block runs causal self-attention over the target so far, then **cross-attention** (queries
from the decoder, keys and values from the encoder's output, the source padding hidden again), then
its MLP. Pre-norm throughout, a final norm after each stack, and one embedding matrix for
source tokens, target tokens and the output projection (a joint vocabulary). Masks follow
``model/masks.py``.

The options of ``Block`` and GPT apply here too: positions learned (a table per side) or rotary
(``pos_emb="rope"``: the self-attentions turn queries and keys by their positions; the
cross-attention compares a target token with every source token, and has no positions), QK-norm,
RMSNorm, a squared-ReLU or SwiGLU MLP, grouped-query attention.

    src     (B, S)  source ids, right-padded with pad_id
    tgt_in  (B, T)  bos + target           (what the decoder reads)
    tgt_out (B, T)  target + eos, padded   (what it must predict; pad positions are ignored)
"""

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache
from .block import Block, check_config, init_weights, make_norm
from .rotary import rotary_angles


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 8000  # joint source + target vocabulary; the data module sets it (tokenizer)
    max_len: int = 128  # longest source, and longest target with bos or eos, in tokens
    n_encoder_layer: int = 3
    n_decoder_layer: int = 3
    n_head: int = 4
    n_embd: int = 256
    mlp_hidden: int = 1024  # width of each block's MLP
    dropout: float = 0.1
    # word dropout: while training, each source and target token's embedding is zeroed with this
    # probability (the whole vector; the others scaled by 1 / (1 - p), as dropout does), so that
    # the model cannot lean on any one word: a regulariser for small data that costs no time
    word_dropout: float = 0.0
    bias: bool = True
    # "naive", "sdpa" or "tiled": padded batches need key masks, which "flash" cannot take
    attn_impl: str = "sdpa"
    label_smoothing: float = 0.1
    init_std: float = 0.02  # std of the initial weights (GPT-2's); see block.py:init_weights
    pad_id: int = 0  # special token ids, fixed by the tokenizer (data.BPETokenizer)
    bos_id: int = 1
    eos_id: int = 2
    n_kv_head: int | None = None  # key/value heads of every attention (GQA); None: n_head
    qk_norm: bool = False  # RMS-normalise queries and keys per head (model/attention.py)
    pos_emb: str = "learned"  # "learned": a table per side added to the embeddings; "rope": rotary
    rope_theta: float = 10000.0  # RoPE's base (model/rotary.py)
    norm: str = "layernorm"  # the blocks' and the final norms: "layernorm" or "rmsnorm"
    mlp: str = "gelu"  # the MLP's activation: "gelu", "gelu_tanh", "relu2" (squared ReLU), "swiglu"

    def __post_init__(self):
        check_config(self, positive=("vocab_size", "max_len", "n_encoder_layer", "n_decoder_layer",
                                     "n_head", "n_embd", "mlp_hidden"), key_mask=True)
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError("Seq2SeqConfig.word_dropout must be in [0, 1), got "
                             f"{self.word_dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("Seq2SeqConfig.label_smoothing must be in [0, 1), got "
                             f"{self.label_smoothing}")


class DecoderCache:
    """What decoding keeps between steps, per decoder block: the self-attention's keys and values of
    the target so far, and the cross-attention's projection of the encoder output (computed at
    the first step)."""

    def __init__(self, n_layer: int, max_len: int, src_len: int):
        self.self_attn = [KVCache(max_len) for _ in range(n_layer)]
        self.cross_attn = [KVCache(src_len) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Target tokens seen so far."""
        return self.self_attn[0].length

    def reorder(self, index: Tensor):
        """Keep rows ``index`` of the batch (beam search). Only the self-attention caches move: beam
        search picks rows among the beams of the same sentence, whose cross-attention keys and
        values are the same."""
        for cache in self.self_attn:
            cache.reorder(index)


class Seq2SeqTransformer(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)  # shared by source, target and output
        learned = c.pos_emb == "learned"  # then one table per side; rotary positions have none
        self.enc_pos = nn.Embedding(c.max_len, c.n_embd) if learned else None
        self.dec_pos = nn.Embedding(c.max_len, c.n_embd) if learned else None
        self.drop = nn.Dropout(c.dropout)
        block_args = dict(n_kv_head=c.n_kv_head, dropout=c.dropout, bias=c.bias,
                          attn_impl=c.attn_impl, mlp_hidden=c.mlp_hidden, qk_norm=c.qk_norm,
                          norm=c.norm, mlp=c.mlp)
        self.encoder = nn.ModuleList(Block(c.n_embd, c.n_head, causal=False, **block_args)
                                     for _ in range(c.n_encoder_layer))
        self.decoder = nn.ModuleList(
            Block(c.n_embd, c.n_head, causal=True, cross=True, **block_args)
            for _ in range(c.n_decoder_layer))
        self.ln_enc = make_norm(c.norm, c.n_embd, c.bias)
        self.ln_dec = make_norm(c.norm, c.n_embd, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        init_weights(self, c.n_encoder_layer + c.n_decoder_layer, c.init_std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied embedding counts once

    def flops_per_batch(self, src_tokens: int, tgt_tokens: int) -> int:
        """Training FLOPs (forward + backward) of a batch: 6 per weight and token, encoder weights
        on source tokens, decoder weights and the output projection on target tokens (attention
        scores left out)."""
        encoder, decoder = self._weights_per_side
        return 6 * (encoder * src_tokens + decoder * tgt_tokens)

    @cached_property
    def _weights_per_side(self) -> tuple[int, int]:  # counted once: flops_per_batch runs each step
        encoder = sum(p.numel() for p in self.encoder.parameters())
        decoder = sum(p.numel() for p in self.decoder.parameters()) + self.lm_head.weight.numel()
        return encoder, decoder

    def _embed(self, ids: Tensor, pos_emb: nn.Embedding | None, start: int, what: str
               ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """ids (B, T) at positions start.. -> (embeddings (B, T, C), the rotary (cos, sin) of the
        positions, or None with learned positions, which are added here)."""
        if ids.dim() != 2:
            raise ValueError(f"{what} must have shape (batch, time), got {tuple(ids.shape)}")
        end = start + ids.size(1)
        if end > self.config.max_len:
            raise ValueError(f"{what} length {end} is longer than max_len {self.config.max_len}")
        pos = torch.arange(start, end, device=ids.device)
        x = self.tok_emb(ids)  # (B, T, C)
        if self.training and self.config.word_dropout > 0:
            # one keep-or-drop draw per token, broadcast over its C channels
            keep = F.dropout(x.new_ones(ids.shape).unsqueeze(-1), self.config.word_dropout)
            x = x * keep  # (B, T, C), a dropped token's row all zeros
        if pos_emb is not None:
            return self.drop(x + pos_emb(pos)), None
        c = self.config  # rotary: the same angles for every block of the stack, computed once
        return self.drop(x), rotary_angles(pos, c.n_embd // c.n_head, c.rope_theta)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> (memory (B, S, C), src_mask (B, S), True = real token). A source row of
        padding only has no key to attend to: its attention outputs zeros (masks.py), never NaN."""
        src_mask = src != self.config.pad_id
        x, rotary = self._embed(src, self.enc_pos, 0, "the source")
        for block in self.encoder:
            x = block(x, key_mask=src_mask, rotary=rotary)
        return self.ln_enc(x), src_mask

    def new_cache(self, src_len: int) -> DecoderCache:
        return DecoderCache(self.config.n_decoder_layer, self.config.max_len, src_len)

    def decode(self, tgt: Tensor, memory: Tensor, src_mask: Tensor,
               cache: DecoderCache | None = None) -> Tensor:
        """tgt (B, T) target ids (after bos) -> logits (B, T, vocab_size). With a cache, tgt
        continues the tokens the cache has seen (decoding feeds one token per step)."""
        past = cache.length if cache is not None else 0
        x, rotary = self._embed(tgt, self.dec_pos, past, "the target")
        for i, block in enumerate(self.decoder):
            x = block(x, kv_cache=cache.self_attn[i] if cache else None, context=memory,
                      context_mask=src_mask, context_cache=cache.cross_attn[i] if cache else None,
                      rotary=rotary)
        return self.lm_head(self.ln_dec(x))

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """Teacher forcing: logits (B, T, vocab_size) for every target position, and with tgt_out
        the label-smoothed cross-entropy averaged over its non-pad tokens."""
        memory, src_mask = self.encode(src)
        logits = self.decode(tgt_in, memory, src_mask)
        loss = None
        if tgt_out is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(),
                                   ignore_index=self.config.pad_id,
                                   label_smoothing=self.config.label_smoothing)
        return logits, loss
