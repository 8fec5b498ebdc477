"""The language model behind the generative recommenders: a Hugging Face causal LM, or an offline tiny Llama.

``backbone: tiny`` (the default) builds everything locally: a word-level tokenizer trained on
the catalog titles and the prompt words, and a small ``LlamaForCausalLM`` initialised from a
seed — so the whole pipeline runs on a CPU with no download. Any other value is a Hugging Face
model id or a local directory, loaded with ``AutoModelForCausalLM`` + ``AutoTokenizer``.
LoRA (peft) is optional and never touches the output layer.

Why this module is long: ``BackboneConfig`` and every path that turns it into a model (the tiny tokenizer and
Llama, a checked hub or local load, LoRA, saving) read the same settings; kept together, a new backbone setting
is declared, validated and applied in one file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from causalrec.errors import BackboneError, CheckpointError, ConfigError

_log = logging.getLogger(__name__)

TINY = "tiny"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
# A hub id is "name" or "org/name" made of these characters; anything else is a (missing) local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_ADAPTER_SUBDIR = "adapter"


@dataclass
class BackboneConfig:
    """Which language model to use and how to load it.

    Attributes:
        backbone: ``"tiny"`` (a small Llama built from scratch on the catalog), a Hugging Face
            model id, or a local model directory.
        seed: seeds the tiny model's initial weights.
        tiny_hidden_size: hidden size of the tiny Llama.
        tiny_layers: number of decoder layers of the tiny Llama.
        tiny_heads: attention heads of the tiny Llama (must divide ``tiny_hidden_size``).
        tiny_intermediate_size: MLP width of the tiny Llama; ``None`` means 4 x hidden size.
        tiny_dropout: dropout of the tiny Llama while it trains, on its input embeddings and attention weights
            (Llama has no other dropout; GRU4Rec and SASRec train with 0.3-0.5); 0: none.
        max_seq_length: longest prompt + completion in tokens (tokenizer ``model_max_length``).
        lowercase: the tiny tokenizer lower-cases text (catalog titles are often upper case).
        lora_r: LoRA rank; 0 trains the full model.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout on the LoRA input.
        target_modules: module names that get LoRA adapters, or ``"all-linear"`` (every linear
            layer but the output layer).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's dtype).
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``...
        trust_remote_code: allow model code shipped with a hub checkpoint to run.
        load_in_4bit: quantise the loaded model to 4 bit (needs bitsandbytes).
        load_in_8bit: quantise the loaded model to 8 bit (needs bitsandbytes).
    """

    backbone: str = TINY
    seed: int = 0
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_intermediate_size: int | None = None
    tiny_dropout: float = 0.0
    max_seq_length: int = 512
    lowercase: bool = True
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | str = field(default="all-linear")
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False

    def __post_init__(self):
        if not isinstance(self.backbone, str) or not self.backbone.strip():
            raise ConfigError("backbone must be 'tiny', a Hugging Face model id or a local model directory")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        for name in ("tiny_hidden_size", "tiny_layers", "tiny_heads", "max_seq_length"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.tiny_hidden_size % self.tiny_heads:
            raise ConfigError(f"tiny_heads ({self.tiny_heads}) must divide tiny_hidden_size ({self.tiny_hidden_size})")
        if (self.tiny_hidden_size // self.tiny_heads) % 2:
            raise ConfigError("tiny_hidden_size / tiny_heads must be even (rotary position embeddings)")
        if not 0.0 <= self.tiny_dropout < 1.0:
            raise ConfigError(f"tiny_dropout must be in [0, 1); got {self.tiny_dropout}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = no LoRA); got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if not isinstance(self.target_modules, str) and any(m.split(".")[-1] == "lm_head" for m in self.target_modules):
            raise ConfigError(
                "target_modules must not include lm_head: log-probabilities are read from the output layer's weights; drop it"
            )
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("choose one of load_in_4bit and load_in_8bit")
        if (self.load_in_4bit or self.load_in_8bit) and self.backbone == TINY:
            raise ConfigError("load_in_4bit/load_in_8bit apply to a pretrained backbone, not 'tiny'")

    def ignored_tiny_settings(self) -> list[str]:
        """The ``tiny_*`` settings moved from their defaults although the backbone is not the tiny Llama they shape."""
        if self.backbone == TINY:
            return []
        return [f.name for f in fields(self) if f.name.startswith("tiny_") and getattr(self, f.name) != f.default]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BackboneConfig":
        """Build from a (RecBole YAML) mapping, ignoring keys that are not backbone settings."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device {device!r} is not a torch device (use auto, cpu, cuda, cuda:N or mps)") from err


# ---------------------------------------------------------------------------------- tokenizer


def build_tokenizer(corpus: Sequence[str], *, lowercase: bool = True, max_length: int = 512):
    """A word-level tokenizer trained on ``corpus`` (catalog titles and prompt text).

    Words and single punctuation marks are tokens (``"order:"`` -> ``order``, ``:``), every
    text starts with ``<s>``; ``</s>`` ends completions. Whitespace is never part of a token,
    so tokenising ``prompt + " " + title`` gives the prompt's tokens followed by the title's —
    the split TRL makes between prompt and completion.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in corpus if isinstance(t, str) and t.strip()]
    if not texts:
        raise BackboneError(
            "cannot build the tiny tokenizer: the corpus (catalog titles + prompt words) is empty; "
            "check that the catalog has item titles"
        )
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, BOS, EOS, UNK], min_frequency=1, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=max_length
    )


# ------------------------------------------------------------------------------------- models


def build_tiny_llama(tokenizer, cfg: BackboneConfig):
    """A randomly initialised ``LlamaForCausalLM`` sized by ``cfg.tiny_*``, seeded by ``cfg.seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_intermediate_size or 4 * cfg.tiny_hidden_size,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads,
        max_position_embeddings=cfg.max_seq_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attention_dropout=cfg.tiny_dropout,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    if cfg.tiny_dropout:
        # Llama's config has no embedding dropout: a hook on the input embeddings, active in training mode only
        # (every stage trains this module; the stage cache loads weights into it)
        rate = cfg.tiny_dropout
        model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: torch.nn.functional.dropout(output, rate, module.training)
        )
    return model


def _local_only(path: str) -> bool:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")
    return offline or Path(path).is_dir()


def _check_causal_lm(path: str, cfg: BackboneConfig, local_only: bool):
    """Load the config and refuse anything that is not a decoder-only language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        raise BackboneError(
            f"backbone directory {path} has no config.json: it is not a Hugging Face model directory "
            "(save one with model.save_pretrained(dir))"
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise BackboneError(f"cannot load backbone config from {path!r}: {err}".strip()) from err
    archs = list(getattr(config, "architectures", None) or [])
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs and not any(a in causal or a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise BackboneError(
            f"backbone {path!r} is a {', '.join(archs)} (model_type {config.model_type!r}), not a causal language model; "
            "use a decoder-only model (Llama, Qwen, Mistral, GPT-2, ...)"
        )
    if not archs and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not cfg.trust_remote_code:
        raise BackboneError(
            f"backbone {path!r} has model_type {config.model_type!r}, which has no causal-LM class in transformers"
        )
    return config


def _quantization(cfg: BackboneConfig):
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackboneError(
            "load_in_4bit/load_in_8bit need the bitsandbytes package (pip install bitsandbytes, CUDA only); "
            "or set both to false"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit)


def _load_pretrained(cfg: BackboneConfig, device: torch.device):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cfg.backbone
    if not Path(path).exists() and not _HUB_ID.match(path):
        raise BackboneError(
            f"backbone {path!r} does not exist: give 'tiny', a Hugging Face model id or an existing model directory"
        )
    local_only = _local_only(path)
    _check_causal_lm(path, cfg, local_only)
    kwargs: dict[str, Any] = {
        "local_files_only": local_only,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": DTYPES[cfg.dtype],
    }
    quant = _quantization(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
    adapter = Path(path) / _ADAPTER_SUBDIR
    if Path(path).is_dir():
        _check_weight_files(Path(path), adapter)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=local_only, trust_remote_code=cfg.trust_remote_code
        )
    except SafetensorError as err:  # a damaged file in the Hugging Face cache (a local directory is checked above)
        todo = (
            f"save or download the model into {path!r} again"
            if Path(path).is_dir()
            else f"delete its folder models--{path.replace('/', '--')} from the Hugging Face cache (HF_HUB_CACHE, by "
            "default ~/.cache/huggingface/hub) and download it again"
        )
        raise CheckpointError(f"the weights of backbone {path!r} are damaged ({err}): {todo}") from None
    except (OSError, ValueError) as err:
        hint = " (offline: only models already on disk or in the HF cache can be used)" if local_only else ""
        raise BackboneError(f"cannot load backbone {path!r}{hint}: {err}") from err
    if quant is None:
        model.to(device)
    if (adapter / "adapter_config.json").is_file():  # written by save_backbone for a LoRA model
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    return model, tokenizer


def _check_weight_files(directory: Path, adapter: Path) -> None:
    """A ``CheckpointError`` naming the first safetensors file of a local model directory (or its LoRA adapter)
    whose header does not parse or does not cover the file (truncated, overwritten), before transformers or peft
    fails on it with a traceback. Only headers are read (a memory map); the data has no checksum to check."""
    from causalrec.integrity import safetensors_problem

    for file in sorted(directory.glob("*.safetensors")) + sorted(adapter.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem is not None:
            raise CheckpointError(
                f"backbone weights {str(file)!r} are damaged ({problem}): the file is truncated or not a safetensors "
                f"file. Download or save the model into {str(directory)!r} again (re-download it, or delete the "
                "directory and rerun the run that saved it)"
            )


ADDED_PAD = "<|causalrec_pad|>"


def check_tokenizer(tokenizer, model=None) -> None:
    """Every generative recommender needs an EOS token (it ends each title). A tokenizer without a pad token (Llama 3)
    gets a real one (``ADDED_PAD``, its embedding row the mean of the others), not EOS: padding is always masked,
    but a pad id equal to EOS lets any collator that masks labels by id drop the EOS every answer ends with."""
    if tokenizer.eos_token_id is None:
        raise BackboneError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token: titles must end with one; "
            "set tokenizer.eos_token to a token of its vocabulary before use"
        )
    if tokenizer.pad_token_id is None:
        _log.info("tokenizer has no pad token; adding %r", ADDED_PAD)
        tokenizer.add_special_tokens({"pad_token": ADDED_PAD})
    if model is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        n_old = base.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > n_old and tokenizer.pad_token == ADDED_PAD:
            # deterministic: the exact mean of the old rows (transformers' mean_resizing samples around it)
            base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                for table in {
                    id(t): t
                    for t in (base.get_input_embeddings().weight, getattr(base.get_output_embeddings(), "weight", None))
                    if t is not None
                }.values():
                    table[n_old:] = table[:n_old].float().mean(0).to(table.dtype)
        if base.config.pad_token_id is None or tokenizer.pad_token == ADDED_PAD:
            base.config.pad_token_id = tokenizer.pad_token_id
        n_vocab = base.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > n_vocab:
            raise BackboneError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {n_vocab}: "
                "they do not belong together"
            )


def lora_config(cfg: BackboneConfig, train_embeddings: Sequence[str] = (), tied: bool = False):
    """peft ``LoraConfig`` for ``cfg`` (None when ``lora_r == 0``); pass it to a TRL trainer or use ``apply_lora``.

    ``train_embeddings``: module names (the input embedding and the output layer) trained in full beside the
    adapters (peft's ``modules_to_save``), so that added item tokens learn their rows; ``tied``: the two share
    one weight, and their trained copy stays shared (``ensure_weight_tying``: one copy, not two).
    """
    if cfg.lora_r == 0:
        return None
    from peft import LoraConfig

    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=list(train_embeddings) or None,
        ensure_weight_tying=bool(train_embeddings) and tied,
    )


def embedding_module_names(model) -> list[str]:
    """Leaf names of the input embedding and the output layer (e.g. ``embed_tokens``, ``lm_head``)."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    names = [next(name for name, m in model.named_modules() if m is w).split(".")[-1] for w in wanted if w is not None]
    return list(dict.fromkeys(names))


def apply_lora(model, cfg: BackboneConfig, trainable_tokens: Sequence[int] = ()):
    """Wrap ``model`` with LoRA adapters (base weights frozen); returns the model unchanged when ``lora_r == 0``.

    With ``trainable_tokens`` (added item tokens) the input embedding and the output layer train in full beside
    the adapters (``modules_to_save``). Not peft's ``trainable_token_indices``, which would train only those rows:
    TRL 1.16's fused LM head reads ``lm_head.weight`` directly and so never sees the rows that adapter trains on
    the output layer (training and ranking would then use different output rows).
    """
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    lcfg = lora_config(cfg, embedding_module_names(model) if trainable_tokens else (), tied=tied)
    if lcfg is None:
        return model
    from peft import get_peft_model

    try:
        # peft draws the adapters' initial weights from torch's global generator: seed them by cfg.seed, so the
        # same config gives the same adapters whatever ran before in the process (and the caller's RNG is kept).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return get_peft_model(model, lcfg)
    except ValueError as err:  # e.g. target modules that do not exist in this architecture
        raise BackboneError(f"cannot add LoRA adapters ({err}); check target_modules for this architecture") from err


def load_backbone(
    cfg: BackboneConfig,
    corpus: Sequence[str] = (),
    *,
    apply_lora_adapters: bool = True,
    items: Sequence[int] = (),
    item_init_texts: Sequence[str] | None = None,
    users: Sequence[int] = (),
    extra_tokens: Sequence[str] = (),
):
    """The model and tokenizer for ``cfg``.

    Args:
        cfg: backbone settings.
        corpus: texts the tiny tokenizer is trained on (catalog titles and prompt text); unused
            for a pretrained backbone.
        apply_lora_adapters: wrap the model with LoRA when ``cfg.lora_r > 0``. Turn off to hand
            ``lora_config(cfg)`` to a TRL trainer instead.
        items: RecBole item ids that get one added token each (``causalrec.llm.items``); the tokenizer and the
            embeddings grow by them, and under LoRA their embedding rows train too.
        item_init_texts: per item, a text whose token embeddings' mean initialises the item's rows in a
            pretrained backbone (``item_repr: title+id``); None: the mean of all rows. The tiny backbone's rows are
            random, like all its weights (title-mean rows measured worse on retail-sim: valid NDCG@10 0.057 vs 0.069).
        users: RecBole user ids that get one added token each (``user_token: true``), added and trained as the item
            tokens are; a pretrained backbone's user rows start from the mean row.
        extra_tokens: more added tokens (semantic ids' codes), added and trained as the user tokens are.
    Returns:
        ``(model, tokenizer)``, the model on ``cfg.device`` in ``cfg.dtype`` (``item_token_ids(tokenizer, items)``
        gives the item tokens' ids).
    """
    from causalrec.llm.items import add_code_tokens, add_item_tokens, add_user_tokens, resize_for_items

    device = resolve_device(cfg.device)
    item_ids, user_ids, code_ids = [], [], []
    if cfg.backbone == TINY:
        tokenizer = build_tokenizer(corpus, lowercase=cfg.lowercase, max_length=cfg.max_seq_length)
        item_ids = add_item_tokens(tokenizer, items) if items else []
        user_ids = add_user_tokens(tokenizer, users) if users else []
        code_ids = add_code_tokens(tokenizer, extra_tokens) if extra_tokens else []
        model = build_tiny_llama(tokenizer, cfg)  # sized with the added tokens: no resize needed
        if cfg.dtype not in ("auto", "float32"):
            model.to(DTYPES[cfg.dtype])
        model.to(device)
    else:
        if ignored := cfg.ignored_tiny_settings():
            _log.warning("%s shape the tiny Llama only: ignored with backbone %r", ", ".join(ignored), cfg.backbone)
        model, tokenizer = _load_pretrained(cfg, device)
        if items or users or extra_tokens:
            # saved by save_backbone with them: every added token must be there
            vocab = tokenizer.get_vocab()
            if any(t.startswith(("<item_", "<user_")) for t in vocab) or not set(extra_tokens).isdisjoint(vocab):
                from causalrec.llm.items import item_token_ids, named_token_ids, user_token_ids

                item_ids = item_token_ids(tokenizer, items) if items else []
                user_ids = user_token_ids(tokenizer, users) if users else []
                code_ids = named_token_ids(tokenizer, extra_tokens, "code") if extra_tokens else []
            elif hasattr(model, "peft_config"):
                raise BackboneError(
                    f"backbone {cfg.backbone!r} carries a LoRA adapter; item and user tokens are added to a "
                    "plain model (save the item-token model with save_backbone and load that)"
                )
            else:
                item_ids = add_item_tokens(tokenizer, items) if items else []
                user_ids = add_user_tokens(tokenizer, users) if users else []
                code_ids = add_code_tokens(tokenizer, extra_tokens) if extra_tokens else []
                texts = list(item_init_texts or [None] * len(item_ids)) + [None] * len(user_ids + code_ids)  # mean row
                resize_for_items(model, tokenizer, item_ids + user_ids + code_ids, texts)
    check_tokenizer(tokenizer, model)
    if apply_lora_adapters and not hasattr(model, "peft_config"):
        model = apply_lora(model, cfg, trainable_tokens=item_ids + user_ids + code_ids)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    _log.info(
        "backbone %s: %d parameters (%d trainable), vocabulary %d, on %s",
        cfg.backbone,
        n_all,
        n_train,
        len(tokenizer),
        device,
    )
    return model, tokenizer


def save_backbone(model, tokenizer, directory: str | Path) -> Path:
    """Save model and tokenizer (safetensors) so that ``BackboneConfig(backbone=directory)`` loads them back.

    A LoRA model is saved as its base weights in ``directory`` and the adapter in
    ``directory/adapter`` (loaded back on top, still trainable).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        base = model.get_base_model()
        # The wrapped base holds "<m>.base_layer.weight" and "lora_*" tensors, and for embeddings trained in full
        # beside the adapters (item tokens: peft's modules_to_save) "<m>.original_module.weight" (the base's rows) and
        # "<m>.modules_to_save.<adapter>.weight" (the trained copy, saved with the adapter); write the plain names.
        state = {
            k.replace(".base_layer", "").replace(".original_module", ""): v
            for k, v in base.state_dict().items()
            if "lora_" not in k and "modules_to_save" not in k
        }
        base.save_pretrained(directory, state_dict=state)
        model.save_pretrained(directory / _ADAPTER_SUBDIR)
        # the adapter must point at this directory, not at whatever the base came from
        cfg_path = directory / _ADAPTER_SUBDIR / "adapter_config.json"
        data = json.loads(cfg_path.read_text())
        data["base_model_name_or_path"] = str(directory)
        cfg_path.write_text(json.dumps(data, indent=2))
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
