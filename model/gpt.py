"""A decoder-only GPT: token + position embeddings, a stack of pre-LayerNorm
blocks of causal self-attention and MLP, a final LayerNorm and an LM head tied
to the token embedding (GPT-2's layout and initialisation).

The attention of today's models is a config field away, each off by default: rotary positions
instead of the learned table (``pos_emb="rope"``), grouped-query attention (``n_kv_head``),
sliding windows (``window``) and QK-norm (``qk_norm``); see ``model/attention.py`` and
``docs/attention.md``. So is the rest of a modern recipe (docs/training.md): RMSNorm
(``norm``), a squared-ReLU or SwiGLU MLP (``mlp``), an LM head of its own
(``tie_embeddings=False``), zero-initialised output projections (``zero_init_proj``), a
tanh cap on the logits (``logit_softcap``) and the previous token's embedding smeared into each
position's (``smear``).
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache
from .block import Block, check_config, init_weights, make_norm
from .rotary import rotary_angles
from .sampling import check_sampling_args, sample_next


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2 BPE; the data module sets it from its tokenizer
    block_size: int = 256  # longest sequence (context length) the model trains on
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    # "naive" (reference), "sdpa", "flash" or "tiled" (model/attention.py); the training command
    # line also takes "auto": the fastest path for the device (model/device.py)
    attn_impl: str = "sdpa"
    # positions: "learned" (GPT-2: a table of block_size vectors added to the token embeddings) or
    # "rope" (rotary, model/rotary.py: queries and keys turned by their positions; a query then
    # sees at most block_size tokens, or window, and generation can go on past block_size)
    pos_emb: str = "learned"
    rope_theta: float = 10000.0  # RoPE's base: the slowest pair turns once in ~2*pi*theta tokens
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head; 1: MQA
    window: int | None = None  # sliding window: a query sees the `window` latest tokens; None: all
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before the scores
    norm: str = "layernorm"  # the blocks' and the final norm: "layernorm" or "rmsnorm"
    mlp: str = "gelu"  # the MLP's activation: "gelu", "gelu_tanh", "relu2" (squared ReLU), "swiglu"
    tie_embeddings: bool = True  # the LM head is the token embedding (GPT-2); False: its own
    zero_init_proj: bool = False  # output projections (attention's, MLP's) start at zero
    # logits become softcap * tanh(logits / softcap): they stay within (-softcap, softcap), which
    # keeps a fast-learning model from growing over-confident early (Gemma 2); None: no cap
    logit_softcap: float | None = None
    # each position's embedding adds a learned share of the previous token's (one weight per
    # channel, starting at 0): the previous token, which a small model otherwise has to fetch
    # with an attention head, is in the residual stream from the start (modded-nanogpt's "smear",
    # without its gate)
    smear: bool = False

    def __post_init__(self):
        check_config(self, positive=("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"GPTConfig.logit_softcap must be positive (or None: no cap), got "
                             f"{self.logit_softcap}")
        if self.window is not None and not 1 <= self.window <= self.block_size:
            raise ValueError(f"GPTConfig.window must be in [1, block_size={self.block_size}] (or "
                             f"None: no window), got {self.window}; the model never trains on "
                             f"more than block_size tokens")

    @property
    def attn_window(self) -> int | None:
        """The window each attention layer applies: ``window``; with rotary positions and no window,
        block_size, so that no query sees further back than in training, however long the sequence.
        (Within block_size tokens it hides nothing: training is plain causal attention.)"""
        if self.window is not None:
            return self.window
        return self.block_size if self.pos_emb == "rope" else None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        # learned position embedding; rotary positions have no table (they turn q and k instead)
        self.wpe = (nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned"
                    else None)
        # (C,) the share of the previous token's embedding each channel adds (``smear``)
        self.smear = nn.Parameter(torch.zeros(config.n_embd)) if config.smear else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.n_embd, config.n_head, n_kv_head=config.n_kv_head,
                  dropout=config.dropout, bias=config.bias, attn_impl=config.attn_impl,
                  causal=True, window=config.attn_window, qk_norm=config.qk_norm,
                  norm=config.norm, mlp=config.mlp)
            for _ in range(config.n_layer))
        self.ln_f = make_norm(config.norm, config.n_embd, config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying: one matrix embeds and un-embeds

        init_weights(self, config.n_layer, zero_out_proj=config.zero_init_proj)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the embedding tables, which are looked up, not
        multiplied: the position table, and the token table unless it is also the LM head."""
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.wpe.weight.numel() if self.wpe is not None else 0
            n -= self.wte.weight.numel() if not self.config.tie_embeddings else 0
        return n

    def flops_per_token(self, T: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token of a length-T sequence (default
        block_size): 6 per weight that multiplies (2 forward, 4 backward), plus
        12 * n_layer * n_embd * T for the attention scores and the weighted sum of values (PaLM,
        appendix B), T capped at the window."""
        c = self.config
        T = min(T or c.block_size, c.attn_window or c.block_size)
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * T

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                kv_caches: list[KVCache] | None = None, prev_tokens: Tensor | None = None):
        """idx: (B, T) token ids; targets: (B, T) next-token ids (-100 = ignore); kv_caches: one per
        block, holding the earlier tokens of the sequences (generation), which idx continues;
        prev_tokens: (B,) the token before idx's first, which ``smear`` mixes into it (None: idx
        begins the sequence; a model with ``smear`` continuing cached tokens needs it).

        Returns logits (B, T, vocab_size) and the mean cross-entropy (None without targets).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        B, T = idx.shape
        past = kv_caches[0].seen if kv_caches else 0  # the position of idx's first token
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.wte(idx)  # (B, T, C)
        if self.smear is not None:
            x = self._smear(x, past, prev_tokens)
        rotary = None
        if self.wpe is not None:
            if past + T > self.config.block_size:
                raise ValueError(f"sequence length {past + T} is longer than block_size "
                                 f"{self.config.block_size}, the learned position table's; crop "
                                 f"the input to the last {self.config.block_size} tokens (or "
                                 f"train with pos_emb 'rope', which has no such limit)")
            x = x + self.wpe(pos)
        else:  # rotary: the same angles for every layer, computed once
            rotary = rotary_angles(pos, self.config.n_embd // self.config.n_head,
                                   self.config.rope_theta)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_caches[i] if kv_caches else None, rotary=rotary)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        if self.config.logit_softcap is not None:  # squashed smoothly into (-cap, cap)
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T))
        return logits, loss

    def _smear(self, x: Tensor, past: int, prev_tokens: Tensor | None) -> Tensor:
        """x (B, T, C) token embeddings -> x_t + smear * x_{t-1}. The first token's predecessor is
        prev_tokens' embedding, or nothing (zeros) at the start of a sequence."""
        if prev_tokens is None:
            if past > 0:
                raise ValueError("a model with smear continuing cached tokens needs the token "
                                 "before idx: pass prev_tokens (B,)")
            first = x.new_zeros(x.size(0), 1, x.size(2))
        else:
            first = self.wte(prev_tokens)[:, None]  # (B, 1, C)
        before = torch.cat([first, x[:, :-1]], dim=1)  # (B, T, C): each token's predecessor
        return x + self.smear * before

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def _decode(self, idx: Tensor, max_new_tokens: int, pick, use_cache: bool = True) -> Iterator:
        """Yields (next tokens (B,), their logits (B, vocab)) for up to max_new_tokens steps;
        ``pick(logits) -> (B,)`` chooses each step's tokens.

        Learned positions: the context is at most block_size tokens. When the next token would make
        it longer, it is cropped to its last block_size // 2 tokens and the cache is rebuilt from
        them, with and without a cache alike. (Positions are absolute, so keys cached at other
        positions cannot be slid along; rebuilding at every step would cost as much as having no
        cache.)

        Rotary positions: nothing is cropped. Each layer's cache rolls, holding the latest
        ``attn_window`` keys and values (block_size, or the window), one token fed per step at a
        constant cost; without a cache, the whole sequence is recomputed at every step, through the
        same windows. A prompt of any length is read whole.
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"generation needs a (batch, time) tensor of at least one token, got "
                             f"{tuple(idx.shape)}")
        block, keep = self.config.block_size, max(1, self.config.block_size // 2)
        rolling = self.wpe is None  # rotary positions are relative: cached keys stay valid
        span = self.config.attn_window if rolling else block
        caches = [KVCache(span, rolling) for _ in self.blocks] if use_cache else None
        # seq is the whole sequence so far, prompt included; the model reads only seq[:, start:],
        # (learned positions) the last block_size tokens at most, a longer prompt cropped alike
        seq, start = idx, 0 if rolling else max(0, idx.size(1) - block)
        for _ in range(max_new_tokens):
            # 1. Learned positions, the context is full: keep its last `keep` tokens. Their
            #    positions change (position 0 is now the first kept token), so every cached key is
            #    stale: empty the caches, and the next forward refills them from the kept tokens.
            if not rolling and seq.size(1) - start > block:
                start = seq.size(1) - keep
                for cache in caches or []:
                    cache.reset()
            # 2. The logits of the next token. With caches, feed only the tokens they have not
            #    seen: the whole context on the first step (or after a crop), then one token; its
            #    query attends to the cached keys of all earlier ones. Without, recompute it all.
            #    (self.forward, not self(...): a compiled model would recompile for every length.)
            if caches:
                first = start + caches[0].seen  # new = seq[:, first:]: (B, 1) after the first step
                prev = seq[:, first - 1] if caches[0].seen else None  # (B,): for smear
                logits = self.forward(seq[:, first:], kv_caches=caches,
                                      prev_tokens=prev)[0][:, -1]  # (B, vocab_size)
            else:
                logits = self.forward(seq[:, start:])[0][:, -1]
            # 3. Choose the tokens (greedy, or sampled: the caller's `pick`) and append them.
            next_tokens = pick(logits)  # (B,)
            seq = torch.cat([seq, next_tokens[:, None]], dim=1)
            yield next_tokens, logits

    def stream(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None,
               stop: Iterable[int] | None = None, use_cache: bool = True,
               generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """Sample continuations of idx (B, T), yielding each step's new tokens (B, 1) as they come.

        temperature 0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set whose
        probability reaches p. stop: token ids; a row that produced one repeats it until every row
        has, and then generation ends. Call model.eval() first (dropout would be on otherwise).
        """
        check_sampling_args(temperature, top_k, top_p)  # now: bad input fails before any step
        stop_ids = torch.tensor(sorted(set(stop or ())), dtype=torch.long, device=idx.device)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)

        def pick(logits):  # (B, vocab) -> (B,): _decode's choice of each step's tokens
            nonlocal finished
            tokens = sample_next(logits, temperature, top_k, top_p, generator)
            if len(stop_ids):  # a row that has stopped repeats a stop token, whatever was drawn
                tokens = torch.where(finished, stop_ids[0], tokens)
                finished = finished | torch.isin(tokens, stop_ids)
            return tokens

        def steps():
            for tokens, _ in self._decode(idx, max_new_tokens, pick, use_cache):
                yield tokens[:, None]
                if len(stop_ids) and finished.all():
                    return

        return steps()

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 stop: Iterable[int] | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
        """idx (B, T) followed by up to max_new_tokens sampled tokens; see ``stream``."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, stop, use_cache,
                               generator))
        return torch.cat([idx, *new], dim=1)
