"""Pretrained-style backbones: a byte-level BPE tokenizer (GPT-2 / Qwen2 / Llama 3 style) and random Qwen2 / Llama
models with grouped-query attention, checked against brute force.

Every other LLM test uses the word-level tiny tokenizer, where whitespace is never part of a token. Here the space
before a title merges into its first piece (``ĠWHITE``), case is kept, the tokenizer may add no BOS (Qwen) or one
(Llama 3), may have no pad token, and a model's embedding may have more rows than the tokenizer has tokens (Qwen2.5
pads its vocabulary to a multiple of 128). The tokenizer is trained offline with ``tokenizers``: nothing downloads.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from test_llm_ranking import _sharpen  # random init is near-uniform; sharper weights make equality mean something

from causalrec.data.prompts import DEFAULT_TEMPLATE, ITEM_TOKEN_TEMPLATE, PromptFormat, completion_text
from causalrec.llm.backbone import BackboneConfig, apply_lora, check_tokenizer
from causalrec.llm.items import add_item_tokens, item_token, resize_for_items, score_item_tokens
from causalrec.llm.ranking import naive_scores, score_catalog
from causalrec.llm.trie import TitleTrie, title_token_ids
from causalrec.training.trl_compat import common_prefix_length, tokenize_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Online Retail-like titles: upper case, digits, punctuation, titles that are prefixes of others, shared first
# words, a title starting with a digit and one starting with punctuation (" *" / " 3" are their own pieces).
TITLES = [
    "WHITE HANGING HEART T-LIGHT HOLDER",
    "WHITE METAL LANTERN",
    "WHITE METAL LANTERN SET",
    "CREAM CUPID HEARTS COAT HANGER",
    "KNITTED UNION FLAG HOT WATER BOTTLE",
    "RED WOOLLY HOTTIE WHITE HEART.",
    "SET 7 BABUSHKA NESTING BOXES",
    "GLASS STAR FROSTED T-LIGHT HOLDER",
    "HAND WARMER UNION JACK",
    "HAND WARMER RED POLKA DOT",
    "ASSORTED COLOUR BIRD ORNAMENT",
    "POPPY'S PLAYHOUSE BEDROOM",
    "POPPY'S PLAYHOUSE KITCHEN",
    "FELTCRAFT PRINCESS CHARLOTTE DOLL",
    "IVORY KNITTED MUG COSY",
    "BOX OF 6 ASSORTED COLOUR TEASPOONS",
    "BOX OF VINTAGE JIGSAW BLOCKS",
    "BOX OF VINTAGE ALPHABET BLOCKS",
    "HOME BUILDING BLOCK WORD",
    "LOVE BUILDING BLOCK WORD",
    "RECIPE BOX WITH METAL HEART",
    "DOORMAT NEW ENGLAND",
    "JAM MAKING SET WITH JARS",
    "RED COAT RACK PARIS FASHION",
    "YELLOW COAT RACK PARIS FASHION",
    "ALARM CLOCK BAKELIKE PINK",
    "ALARM CLOCK BAKELIKE RED",
    "SET/2 RED RETROSPOT TEA TOWELS",
    "ROUND SNACK BOXES SET OF4 WOODLAND",
    "SPACEBOY LUNCH BOX",
    "LUNCH BOX I LOVE LONDON",
    "PAPER CHAIN KIT 50'S CHRISTMAS",
    "12 PENCILS SMALL TUBE RED RETROSPOT",
    "*BOYS PARTY BAG",
    "3D HEARTS HONEYCOMB",
    "TEA",
    "TEA POT",
    "Red scarf; wool",
]
FMT = PromptFormat()
ENV_FMT = PromptFormat(environment="season")
HISTORIES = [[TITLES[3]], [TITLES[i] for i in (0, 35, 17, 33, 5)], [TITLES[35], TITLES[36], TITLES[36], TITLES[33]]]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]


# ------------------------------------------------------------------------------------------ builders (shared)


def train_bpe(corpus, vocab_size: int = 700):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus`` (GPT-2 / Qwen2 / Llama 3 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIALS + LLAMA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    return tok


# The pre-tokenizer splits of Qwen2.5's and Llama 3's tokenizer.json (a punctuation mark may lead a word; Qwen splits
# digits one by one, Llama 3 in threes), applied before a ByteLevel step that no longer splits.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = QWEN_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
STYLES = ("gpt2", "qwen", "llama")


def wrap(bpe, style: str = "qwen", pad: bool = True, chat: bool = False):
    """A ``PreTrainedTokenizerFast`` over a copy of ``bpe``, set up as ``style``'s tokenizer.json is:

    * ``gpt2``: the ByteLevel pre-tokenizer alone, no BOS, eos ``<|im_end|>``, pad ``<|endoftext|>``;
    * ``qwen`` (Qwen2.5): NFC, Qwen's split regex, no BOS, eos ``<|im_end|>``, pad ``<|endoftext|>``;
    * ``llama`` (Llama 3): Llama 3's split regex, ``<|begin_of_text|>`` before every text, eos ``<|end_of_text|>``.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(bpe.to_str())
    if style != "gpt2":
        split = QWEN_SPLIT if style == "qwen" else LLAMA3_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if style == "qwen":
        tok.normalizer = normalizers.NFC()
    if style == "llama":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
        kw = dict(bos_token=bos, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>" if pad else None)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>" if pad else None)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **{k: v for k, v in kw.items() if v})
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


def random_model(
    tok,
    arch: str = "qwen",
    seed: int = 0,
    hidden: int = 96,
    layers: int = 2,
    pad_rows_to: int = 64,
    sharpen: bool = True,
):
    """A random Qwen2ForCausalLM (untied, vocabulary padded to a multiple of ``pad_rows_to`` like Qwen2.5) or
    LlamaForCausalLM (tied, exactly ``len(tok)`` rows) with 6 query heads sharing 2 KV heads (~0.3M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "qwen":
            rows = -(-len(tok) // pad_rows_to) * pad_rows_to
            model = Qwen2ForCausalLM(Qwen2Config(vocab_size=rows, tie_word_embeddings=False, **common))
        else:
            model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **common))
    return (_sharpen(model, scale=3.0, seed=seed) if sharpen else model).eval()


def corpus():
    """The catalog titles and the prompt words the tokenizer is trained on."""
    return TITLES + [
        FMT.prompt(TITLES[:4]),
        FMT.prompt([]),
        ENV_FMT.prompt([], "winter"),
        ITEM_TOKEN_TEMPLATE,
        "season winter summer spring autumn region north south user assistant",
    ]


def one_by_one(model, prompt, item) -> float:
    """Independent reference: one unpadded forward of prompt + item tokens, float64 log-softmax by hand."""
    model.eval()  # LoRA dropout off
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(prompt) + list(item)])).logits[0].double()
    lp = logits.log_softmax(-1)
    return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(item))


def chat_prompt(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(corpus())


@pytest.fixture(scope="module", params=["qwen", "llama"])
def arch(request, bpe):
    """(name, tokenizer, sharpened random model) for each architecture."""
    tok = wrap(bpe, request.param, chat=True)
    return request.param, tok, random_model(tok, request.param, seed=1 if request.param == "qwen" else 2)


def _contexts(tok):
    """Prompts a title can follow: the empty-history prompt (what LLMRecommender builds the trie against), prompts
    with histories, with an environment, and rendered by the chat template."""
    return (
        [FMT.prompt([])]
        + [FMT.prompt(h) for h in HISTORIES]
        + [ENV_FMT.prompt(HISTORIES[1], "winter")]
        + [chat_prompt(tok, FMT.prompt(h)) for h in HISTORIES]
    )


# ----------------------------------------------------------------------------------- (a) the answer boundary


@pytest.mark.parametrize("style", STYLES)
def test_tokenizer_is_byte_level_bpe_with_space_merged_pieces(bpe, style):
    """The set-up the rest relies on: pieces carry the space before them, and case is not folded."""
    tok = wrap(bpe, style)
    assert tok.convert_ids_to_tokens(tok(" WHITE HANGING").input_ids)[-2] == "ĠWHITE"
    assert tok(" WHITE").input_ids != tok("WHITE").input_ids  # the space changes the first piece
    assert tok(" TEA POT").input_ids != tok(" tea pot").input_ids
    assert (tok("TEA").input_ids[0] == tok.bos_token_id) == (style == "llama")  # only Llama 3 adds BOS
    digits = {"gpt2": ["Ġ", "12"], "qwen": ["Ġ", "1", "2"], "llama": ["Ġ", "12"]}[style]
    assert tok.convert_ids_to_tokens(tok(" 12 PENCILS", add_special_tokens=False).input_ids)[: len(digits)] == digits


@pytest.mark.parametrize("style", STYLES)
def test_title_tokens_are_what_trl_trains_at_the_prompt_answer_boundary(bpe, style):
    """``title_token_ids`` = the tokens after the common prefix of TRL's tokenisation of the prompt and of prompt + " " +
    title + EOS, for every context a title follows (history, environment, chat-rendered prompt)."""
    tok = wrap(bpe, style, chat=True)
    for context in _contexts(tok):
        got = title_token_ids(tok, TITLES, context=context)
        base = tokenize_text(tok, context)
        for title, ids in zip(TITLES, got):
            full = tokenize_text(tok, context + completion_text(title) + tok.eos_token)
            k = common_prefix_length(base, full)
            assert ids == full[k:], (context, title)
            # no piece crosses the seam: the prompt's own tokens are a prefix, so one trie serves every prompt
            assert k == len(base), (context, title)
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
            # case kept, the space before the title inside its first piece (byte-level BPE round-trips exactly)
            assert tok.decode(ids[:-1]) == completion_text(title)
    # the title tokens do not depend on the prompt before them (LLMRecommender computes them once)
    first = title_token_ids(tok, TITLES)
    assert all(title_token_ids(tok, TITLES, context=c) == first for c in _contexts(tok))
    # the first piece carries the space: tokenising the bare title would give other tokens
    merged = [
        t
        for t, ids in zip(TITLES, first)
        if tok.convert_ids_to_tokens(ids[0]).startswith("Ġ") and len(tok.convert_ids_to_tokens(ids[0])) > 1
    ]
    assert len(merged) >= len(TITLES) // 2
    assert all(ids[:-1] != tok(t, add_special_tokens=False).input_ids for t, ids in zip(TITLES, first) if t in merged)
    assert first[TITLES.index("TEA")] != title_token_ids(tok, ["tea"])[0]  # upper case is not lower-cased


def test_title_tokens_follow_trls_dpo_tokenisation_of_chosen_and_rejected(bpe):
    """The S-DPO trainer's own preprocessing (causalrec.training.sdpo_trainer) yields the same completion ids."""
    from causalrec.training.sdpo_trainer import SDPOTrainer
    from datasets import Dataset

    tok = wrap(bpe, "llama")  # BOS added, so a wrong prefix cut would show
    want = dict(zip(TITLES, title_token_ids(tok, TITLES)))
    rows = {
        "prompt": [FMT.prompt(h) for h in HISTORIES],
        "chosen": [completion_text(TITLES[i]) for i in (0, 33, 34)],
        "rejected": [[completion_text(TITLES[i])] for i in (1, 35, 5)],
    }
    trainer = object.__new__(SDPOTrainer)
    trainer._tokenizer, trainer.env_vocabs = tok, {}

    class Args:
        all_negatives, num_negatives, dataset_num_proc, max_length = False, 1, None, None

    out = SDPOTrainer._prepare_dataset(trainer, Dataset.from_dict(rows), tok, Args(), "train")
    for r in range(len(HISTORIES)):
        assert out[r]["prompt_ids"] == tok(rows["prompt"][r]).input_ids
        assert out[r]["chosen_ids"] == want[rows["chosen"][r][1:]]
        assert out[r]["rejected_ids"] == [want[rows["rejected"][r][0][1:]]]


# ------------------------------------------------------------------------------ (b) trie scores = brute force


def _prompts(tok, chat: bool):
    texts = [FMT.prompt(h) for h in HISTORIES]
    if chat:
        texts = [chat_prompt(tok, t) for t in texts]
    prompts = [tokenize_text(tok, t) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: left padding is exercised
    return prompts


def _trie(tok, chat: bool):
    context = chat_prompt(tok, FMT.prompt([])) if chat else None
    return TitleTrie.from_token_ids(title_token_ids(tok, TITLES, context=context))


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("method", ["prefix", "rows"])
def test_trie_scores_equal_brute_force(arch, method, chat):
    name, tok, model = arch
    prompts, trie = _prompts(tok, chat), _trie(tok, chat)
    naive = naive_scores(model, prompts, trie, batch_size=16)
    assert naive.std() > 1.0  # far from uniform
    for batch_size, node_chunk in ((1, 2048), (3, 2048), (2, 7)):
        scores = score_catalog(model, prompts, trie, batch_size=batch_size, node_chunk=node_chunk, method=method)
        torch.testing.assert_close(scores, naive, atol=1e-4, rtol=0)
    for u, i in ((0, 0), (1, 33), (2, 34), (1, len(TITLES) - 1), (0, TITLES.index("TEA"))):
        assert naive[u, i].item() == pytest.approx(one_by_one(model, prompts[u], trie.item_tokens[i]), abs=1e-4)
    if name == "qwen":
        assert model.get_input_embeddings().weight.shape[0] > len(tok)  # spare rows are part of the softmax


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_lora_trie_scores_equal_brute_force(arch, chat):
    name, tok, _ = arch
    base = random_model(tok, name, seed=5)
    lora = apply_lora(base, BackboneConfig(lora_r=4))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    prompts, trie = _prompts(tok, chat), _trie(tok, chat)
    naive = naive_scores(lora, prompts, trie, batch_size=16)
    for method in ("prefix", "rows"):
        torch.testing.assert_close(
            score_catalog(lora, prompts, trie, batch_size=2, method=method), naive, atol=1e-4, rtol=0
        )
    assert naive[1, 0].item() == pytest.approx(one_by_one(lora, prompts[1], trie.item_tokens[0]), abs=1e-4)
    with lora.disable_adapter():
        assert (naive_scores(lora, prompts, trie, batch_size=16) - naive).abs().max() > 1e-2  # the adapter counts


# ----------------------------------------------------------------------------------------- (c) item tokens

N_ITEMS = 12
ITEMS = list(range(1, N_ITEMS + 1))
ITEM_TITLES = TITLES[:N_ITEMS]
ITEM_HISTORIES = [[3], [1, 5, 7, 7, 2, 12], [9, 9, 4], list(range(1, 13)) * 2]


def _item_prompts(tok, title_and_id: bool = False):
    if title_and_id:
        fmt = PromptFormat(template=DEFAULT_TEMPLATE, max_history_items=50)
        return [fmt.prompt([f"{ITEM_TITLES[j - 1]} {item_token(j)}" for j in h]) for h in ITEM_HISTORIES]
    fmt = PromptFormat(template=ITEM_TOKEN_TEMPLATE, separator=" ", max_history_items=50)
    return [fmt.prompt([item_token(j) for j in h]) for h in ITEM_HISTORIES]


@pytest.mark.parametrize("style", STYLES)
def test_item_tokens_are_one_token_after_any_prompt(bpe, style):
    """``prompt + " <item_j>" + EOS`` = the prompt's own tokens, the item's one token, EOS: the AddedToken's lstrip
    absorbs the space, and the byte-level pre-tokenizer never joins it to the prompt's last piece."""
    tok = wrap(bpe, style)
    ids = add_item_tokens(tok, ITEMS)
    for title_and_id in (False, True):
        for prompt in _item_prompts(tok, title_and_id) + [FMT.prompt([]), ENV_FMT.prompt([], "winter")]:
            base = tokenize_text(tok, prompt)
            for j, t in zip(ITEMS, ids):
                full = tokenize_text(tok, prompt + completion_text(item_token(j)) + tok.eos_token)
                assert full == base + [t, tok.eos_token_id], (prompt, j)
    history = tokenize_text(tok, _item_prompts(tok)[1])
    assert [t for t in history if t in ids] == [ids[j - 1] for j in ITEM_HISTORIES[1]]  # each history item: one token
    titled = tokenize_text(tok, _item_prompts(tok, True)[1])
    assert [t for t in titled if t in ids] == [ids[j - 1] for j in ITEM_HISTORIES[1]]
    # the titles around the tokens keep their own pieces (the item token did not swallow or split them)
    assert tok.decode(titled, skip_special_tokens=False).count("WHITE HANGING HEART") == 1


@pytest.fixture(scope="module")
def items_model(bpe):
    tok = wrap(bpe, "qwen")
    model = random_model(tok, "qwen", seed=3, sharpen=False, pad_rows_to=16)
    n_rows = model.get_input_embeddings().weight.shape[0]
    ids = add_item_tokens(tok, ITEMS)
    assert len(tok) > n_rows > min(ids)  # some item tokens land in the spare rows, some need new ones
    resize_for_items(model, tok, ids)
    _sharpen(model, scale=3.0, seed=3).eval()
    return tok, model, ids


def test_item_token_scores_equal_brute_force(items_model):
    tok, model, ids = items_model
    prompts = [tokenize_text(tok, p) for p in _item_prompts(tok) + _item_prompts(tok, True)]
    naive = naive_scores(model, prompts, [[t] for t in ids], batch_size=5)
    assert naive.std() > 1.0
    for batch_size in (1, 3, 64):
        got = score_item_tokens(model, prompts, ids, batch_size=batch_size, pad_token_id=tok.pad_token_id)
        torch.testing.assert_close(got, naive, atol=1e-5, rtol=0)
    assert naive[1, 4].item() == pytest.approx(one_by_one(model, prompts[1], [ids[4]]), abs=1e-5)


def _real_rows(tok, ids, n_rows):
    """Ids of the tokenizer's own tokens (not item tokens) that have an embedding row."""
    items = set(ids)
    return sorted(i for i in tok.get_vocab().values() if i not in items and i < n_rows)


@pytest.mark.parametrize("n_items", [8, 60])
def test_new_item_rows_start_at_the_mean_of_the_real_token_rows(bpe, n_items):
    """Qwen2.5's embedding has more rows than its tokenizer has tokens: item tokens that land in those spare rows
    must be initialised like the rows added by resizing, not keep whatever the checkpoint holds there."""
    tok = wrap(bpe, "qwen")
    model = random_model(tok, "qwen", seed=4, sharpen=False)
    with torch.no_grad():  # untrained spare rows: make them stand out
        model.get_input_embeddings().weight[len(tok) :] = 50.0
        model.get_output_embeddings().weight[len(tok) :] = -50.0
    n_rows = model.get_input_embeddings().weight.shape[0]
    ids = add_item_tokens(tok, list(range(1, n_items + 1)))
    resize_for_items(model, tok, ids)
    assert model.get_input_embeddings().weight.shape[0] == max(n_rows, len(tok))
    real = _real_rows(tok, ids, n_rows)
    for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        mean = table[real].mean(0)
        torch.testing.assert_close(table[ids], mean.expand(len(ids), -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_items", [8, 60])
def test_title_init_sets_each_item_row_to_the_mean_of_its_title_token_rows(bpe, n_items):
    """``item_repr: title+id``: each item's rows (input and untied output) start at the mean of its title's token rows,
    the title tokenised as it appears in a prompt (after a space: ``ĠWHITE``, not ``WHITE``)."""
    tok = wrap(bpe, "qwen")
    model = random_model(tok, "qwen", seed=6, sharpen=False)
    before = [
        model.get_input_embeddings().weight.detach().clone(),
        model.get_output_embeddings().weight.detach().clone(),
    ]
    titles = [TITLES[i % len(TITLES)] for i in range(n_items)]
    ids = add_item_tokens(tok, list(range(1, n_items + 1)))
    resize_for_items(model, tok, ids, titles)
    pieces = [seq[:-1] for seq in title_token_ids(tok, titles)]  # the title's tokens in context, without EOS
    assert all(p and max(p) < min(ids) for p in pieces)
    assert pieces[0] != tok(titles[0], add_special_tokens=False).input_ids  # the bare title has other pieces
    for old, table in zip(before, (model.get_input_embeddings().weight, model.get_output_embeddings().weight)):
        torch.testing.assert_close(table[: min(ids)], old[: min(ids)])  # the real tokens' rows are untouched
        for t, p in zip(ids, pieces):
            torch.testing.assert_close(table[t], old[p].mean(0), atol=1e-6, rtol=0)


def test_missing_pad_token_gets_a_real_one_and_scores_stay_exact(bpe):
    """A Llama 3-style tokenizer without a pad token: a real pad token is added (not EOS) with its own embedding
    row, and padded scoring equals brute force."""
    from causalrec.llm.backbone import ADDED_PAD

    tok = wrap(bpe, "llama", pad=False)
    model = random_model(tok, "llama", seed=7)
    rows = model.get_input_embeddings().weight.shape[0]
    assert tok.pad_token_id is None and model.config.pad_token_id is None
    check_tokenizer(tok, model)
    assert tok.pad_token == ADDED_PAD and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id < model.get_input_embeddings().weight.shape[0]
    assert model.get_input_embeddings().weight.shape[0] >= rows
    prompts, trie = _prompts(tok, False), _trie(tok, False)
    naive = naive_scores(model, prompts, trie, batch_size=16)
    torch.testing.assert_close(score_catalog(model, prompts, trie, batch_size=3), naive, atol=1e-4, rtol=0)
    tok2 = copy.deepcopy(tok)
    ids = add_item_tokens(tok2, ITEMS)
    resize_for_items(model, tok2, ids)
    item_prompts = [tokenize_text(tok2, p) for p in _item_prompts(tok2)]
    torch.testing.assert_close(
        score_item_tokens(model, item_prompts, ids, batch_size=4, pad_token_id=tok2.pad_token_id),
        naive_scores(model, item_prompts, [[t] for t in ids], batch_size=5),
        atol=1e-5,
        rtol=0,
    )
