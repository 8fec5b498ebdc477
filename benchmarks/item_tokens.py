"""Item tokens (``item_repr: id``) vs titles, SASRec, and S-DPO over the whole catalog.

Three measurements, each comparing variants interleaved in this process (ratios of medians):

1. **Ranking per case, id vs title trie.** ``id``: every catalog item is one added token; one forward per batch of
   64 prompts gives ``log p(item | prompt)`` of every item (``causalrec.llm.items.score_item_tokens``); the prompt
   shows the last 50 history items as item tokens (the id model's default). ``title``: the exact title trie walk
   (``causalrec.llm.ranking.score_catalog``, batches of 8 users, LLMRecommender's default) on a model built on the
   titles, prompts of the last 10 titles (the default). Both are causalrec's tiny default Llama (hidden 64,
   2 layers). (a) UCI Online Retail's seasonal catalog (3,179 real titles) with real test-split histories (skipped
   with a note if ../shared is absent); (b) 100k synthetic retail titles with random histories, the trie measured
   on a couple of cases (it takes seconds per case). Also the check "same scores where the model is the same": on
   the id model, the trie over one-token items (``TitleTrie.from_token_ids([[tok] for tok in ids])``) must give
   ``score_item_tokens``'s scores.
2. **id vs SASRec.** RecBole SASRec's ``full_sort_predict`` (untrained: speed does not depend on the weights) on
   retail-sim's test cases vs the id model ranking the same cases over the same catalog, both in batches of 64.
   The id path is timed on pre-tokenised prompts (the forward, the goal) and with the prompt text built from the
   RecBole sequence and tokenised (what ``LLMRecommender.full_sort_predict`` also does).
3. **S-DPO step, all negatives vs 3.** One ``SDPOTrainer`` step (forward of policy and frozen reference, loss,
   backward, AdamW step, zero_grad) on the id model with 3,179 items, 32 prompts of 50 item tokens:
   ``num_negatives="all"`` (every other item a negative, one forward of the 32 prompt+chosen rows) vs
   ``num_negatives=3`` (128 prompt+completion rows). Time and peak memory (``rss_peak_delta_bytes``: touched;
   ``tensor_peak_bytes``: allocated), as ``benchmarks/dpo_step.py`` measures them. No goal.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    ONLINE_RETAIL,
    fmt,
    interleaved,
    log_progress,
    md_table,
    median,
    mib,
    ratio,
    rss_peak_delta_bytes,
    tensor_peak_bytes,
    timed,
    timings,
)
from benchmarks.data import catalog_titles, tiny_backbone

NAME = "item_tokens"
GOAL_SPEEDUP = 100.0  # id vs title trie, per case, at Online Retail's 3,179 items
GOAL_ITEMS = 3179
GOAL_SASREC = 2.0  # id time per case / SASRec full_sort_predict time per case, at most
GOAL_DIFF = 1e-5  # trie over one-token items vs score_item_tokens, max abs difference
ID_HISTORY = 50  # item tokens shown in an id prompt (RecBole's MAX_ITEM_LIST_LENGTH, the id default)
TITLE_HISTORY = 10  # titles shown in a title prompt (the default)


@dataclass
class Options:
    id_batch: int = 64
    title_batch: int = 8
    # (a) Online Retail, real titles and test histories
    real_source: str | None = str(ONLINE_RETAIL)  # None or absent file: (a) skipped with a note
    real_split: str = "seasonal"
    real_users: int = 256  # test-split cases ranked by the id model per round (the first ones, file order)
    real_title_users: int = 16  # the first of them, ranked by the title trie per round
    real_rounds: int = 5
    # (b) synthetic catalog
    synthetic_items: int = 100_000
    synthetic_users: int = 256  # id
    synthetic_title_users: int = 2  # trie: seconds per case at 100k items
    synthetic_rounds: int = 3
    check_users: int = 64  # cases of the same-scores check per catalog
    # 2. SASRec on retail-sim
    sasrec_config: dict[str, Any] = field(default_factory=dict)  # extra RecBole keys (smaller data for --quick)
    sasrec_cases: int = 1024  # test cases per round (at most the test split's size)
    sasrec_rounds: int = 7
    # 3. S-DPO step
    step_items: int = 3179
    step_prompts: int = 32
    step_history: int = ID_HISTORY
    step_negatives: int = 3
    step_repeats: int = 10
    step_warmup: int = 2
    step_memory_repeats: int = 3

    @classmethod
    def quick(cls) -> "Options":
        return cls(
            real_users=64,
            real_title_users=2,
            real_rounds=1,
            synthetic_items=5000,
            synthetic_users=64,
            synthetic_title_users=1,
            synthetic_rounds=1,
            check_users=8,
            sasrec_config={"sim_users": 300, "sim_items": 120},
            sasrec_cases=128,
            sasrec_rounds=2,
            step_items=500,
            step_prompts=8,
            step_repeats=2,
            step_warmup=1,
            step_memory_repeats=1,
        )


# ------------------------------------------------------------------------------------------ models, prompts
def id_format():
    from causalrec.data.prompts import PromptFormat

    return PromptFormat(separator=" ", max_history_items=ID_HISTORY)  # LLMRecommender's id prompts


def id_backbone(n_items: int, seed: int = 0, sharpen: float | None = 4.0):
    """The tiny default backbone with one added token per item ``1..n_items``, built on the id prompts' words
    (LLMRecommender's corpus for ``item_repr: id``); ``sharpen`` as in ``benchmarks.data.tiny_backbone``.
    Returns (model, tokenizer, item token ids)."""
    from causalrec.llm.backbone import BackboneConfig, load_backbone
    from causalrec.llm.items import item_token_ids

    fmt_ = id_format()
    items = list(range(1, n_items + 1))
    model, tok = load_backbone(BackboneConfig(device="cpu", seed=seed), [fmt_.template, fmt_.prompt([])], items=items)
    if sharpen:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * sharpen / max(p.shape[-1], 1) ** 0.5)
    return model, tok, item_token_ids(tok, items)


def id_prompts(tok, histories: list[list[int]]) -> list[list[int]]:
    """Token ids of id prompts of item histories (RecBole ids, oldest first)."""
    from causalrec.llm.items import item_token

    fmt_ = id_format()
    return [list(ids) for ids in tok([fmt_.prompt([item_token(j) for j in h]) for h in histories])["input_ids"]]


def title_model(titles: list[str]):
    """Tiny default backbone on the titles, the catalog's trie and the title prompt format (last 10 titles)."""
    from causalrec.data.prompts import PromptFormat
    from causalrec.llm.trie import TitleTrie, title_token_ids

    fmt_ = PromptFormat(max_history_items=TITLE_HISTORY)
    model, tok = tiny_backbone(titles + [fmt_.template, fmt_.prompt([])])
    build_s, trie = timed(lambda: TitleTrie.from_token_ids(title_token_ids(tok, titles, context=fmt_.prompt([]))))
    return model, tok, trie, fmt_, build_s


def _id_rank(model, tok, prompts, ids, batch):
    from causalrec.llm.items import score_item_tokens

    return score_item_tokens(model, prompts, ids, batch_size=batch, pad_token_id=tok.pad_token_id)


def _trie_rank(model, prompts, trie, batch):
    from causalrec.llm.ranking import score_catalog

    return score_catalog(model, prompts, trie, batch_size=batch)


def same_scores(model, tok, prompts, ids, batch) -> dict[str, Any]:
    """Trie walk over one-token items vs the one-forward scores, same id model, same prompts."""
    from causalrec.llm.trie import TitleTrie

    trie = TitleTrie.from_token_ids([[t] for t in ids])
    fast = _id_rank(model, tok, prompts, ids, batch)
    walked = _trie_rank(model, prompts, trie, 8)
    return {
        "cases": len(prompts),
        "items": len(ids),
        "max_abs_diff": float((fast - walked).abs().max()),
        "score_std": float(fast.std()),
        "score_min": float(fast.min()),
    }


# ------------------------------------------------------------------------------------- 1. id vs title trie
def compare_ranking(
    label: str,
    titles: list[str],
    id_hist: list[list[int]],
    title_hist: list[list[str]],
    n_title: int,
    rounds: int,
    opts: Options,
) -> dict[str, Any]:
    """Per-case seconds of the id model (all ``id_hist`` cases per round) and of the title trie (the first
    ``n_title`` cases per round), interleaved; plus the same-scores check on the id model."""
    n_items = len(titles)
    build_id_s, (id_model, id_tok, ids) = timed(lambda: id_backbone(n_items))
    id_p = id_prompts(id_tok, id_hist)
    t_model, t_tok, trie, t_fmt, trie_build_s = title_model(titles)
    t_p = [list(x) for x in t_tok([t_fmt.prompt(h) for h in title_hist[:n_title]])["input_ids"]]
    log_progress(
        "item_tokens: %s: %d items (trie %d nodes), id %d cases, title %d cases, %d rounds",
        label,
        n_items,
        trie.n_nodes,
        len(id_p),
        len(t_p),
        rounds,
    )
    # warm-up: the id path on one batch, the trie on one case over a small part of the catalog (a full walk of a
    # large catalog would cost a measured round)
    _id_rank(id_model, id_tok, id_p[: opts.id_batch], ids, opts.id_batch)
    _trie_rank(t_model, t_p[:1], trie.subtrie(list(range(min(200, n_items)))), opts.title_batch)
    wall, cpu = interleaved(
        {
            "id": lambda: _id_rank(id_model, id_tok, id_p, ids, opts.id_batch),
            "title": lambda: _trie_rank(t_model, t_p, trie, opts.title_batch),
        },
        rounds,
        warmup=0,
    )
    n = {"id": len(id_p), "title": len(t_p)}
    per = {
        k: {
            "per_case_s": median(wall[k]) / n[k],
            "cpu_per_case_s": median(cpu[k]) / n[k],
            "cases": n[k],
            "rounds_s": wall[k],
        }
        for k in wall
    }
    per["id"]["prompt_tokens_mean"] = sum(map(len, id_p)) / len(id_p)
    per["title"]["prompt_tokens_mean"] = sum(map(len, t_p)) / len(t_p)
    check = same_scores(id_model, id_tok, id_p[: opts.check_users], ids, opts.id_batch)
    return {
        "label": label,
        "items": n_items,
        "id_vocabulary": len(id_tok),
        "title_vocabulary": len(t_tok),
        "trie_nodes": trie.n_nodes,
        "trie_evaluated_nodes": int(sum(len(lv.expanded) for lv in trie.levels)),
        "trie_build_s": trie_build_s,
        "id_model_build_s": build_id_s,
        "rounds": rounds,
        "id": per["id"],
        "title": per["title"],
        "speedup": ratio(per["title"]["per_case_s"], per["id"]["per_case_s"]),
        "speedup_cpu": ratio(per["title"]["cpu_per_case_s"], per["id"]["cpu_per_case_s"]),
        "same_scores": check,
    }


def online_retail_ids(source: str, split: str, n_users: int) -> list[list[int]]:
    """Histories of the first ``n_users`` test-split rows as item numbers ``1..N`` in ``items.tsv`` order (the
    order of ``ranking.online_retail_catalog``'s titles), oldest first."""
    import csv

    from causalrec.data import DataSpec, prepare

    prepared = prepare(DataSpec(dataset="online-retail", source=source, split=split), show_progress=False)
    with open(prepared.files["items.tsv"], newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        number = {row["item_id"]: k + 1 for k, row in enumerate(reader)}
    with open(prepared.files["seq_test.inter"], newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    column = rows[0].index("item_id_list:token_seq")
    return [[number[i] for i in r[column].split()] for r in rows[1 : n_users + 1]]


def run_real(opts: Options) -> dict[str, Any]:
    if not opts.real_source or not Path(opts.real_source).is_file():
        why = f"Online Retail not found at {opts.real_source} (../shared/datasets is absent)"
        log_progress("item_tokens: real titles skipped: %s", why)
        return {"skipped": why}
    from benchmarks.ranking import online_retail_catalog

    titles, title_hist = online_retail_catalog(opts.real_source, opts.real_split, opts.real_users)
    id_hist = online_retail_ids(opts.real_source, opts.real_split, opts.real_users)
    row = compare_ranking("Online Retail", titles, id_hist, title_hist, opts.real_title_users, opts.real_rounds, opts)
    row.update(
        {
            "source": opts.real_source,
            "split": opts.real_split,
            "history_items_mean": sum(map(len, id_hist)) / max(1, len(id_hist)),
        }
    )
    return row


def run_synthetic(opts: Options) -> dict[str, Any]:
    titles = catalog_titles(opts.synthetic_items)
    rng = np.random.default_rng(opts.synthetic_items)
    hist = [rng.integers(1, len(titles) + 1, ID_HISTORY).tolist() for _ in range(opts.synthetic_users)]
    title_hist = [[titles[j - 1] for j in h] for h in hist]  # the same purchases, written as titles
    return compare_ranking(
        "synthetic", titles, hist, title_hist, opts.synthetic_title_users, opts.synthetic_rounds, opts
    )


# ------------------------------------------------------------------------------------------ 2. id vs SASRec
def run_sasrec(opts: Options) -> dict[str, Any]:
    """SASRec's full_sort_predict vs the id model on the same retail-sim test cases, batches of ``id_batch``."""
    import causalrec

    with tempfile.TemporaryDirectory(prefix="bench-item-tokens-") as tmp:
        config, trainer, (_train, _valid, test) = causalrec.recbole.quick_start.build(
            "SASRec",
            "retail-sim",
            config_dict={
                "show_progress": False,
                "checkpoint_dir": tmp,
                "num_threads": torch.get_num_threads(),
                **opts.sasrec_config,
            },
        )
    sasrec = trainer.model.eval()
    inter = test._dataset.inter_feat
    cases = min(opts.sasrec_cases, len(inter))
    inter = inter[:cases]
    n_items = int(test._dataset.item_num) - 1  # RecBole item 0 is padding
    seq, lengths = inter[sasrec.ITEM_SEQ], inter[sasrec.ITEM_SEQ_LEN]
    histories = [[int(i) for i in s[: int(n)] if i] for s, n in zip(seq.tolist(), lengths.tolist())]
    model, tok, ids = id_backbone(n_items, sharpen=None)
    prompts = id_prompts(tok, histories)
    bs = opts.id_batch

    def sasrec_rank():
        with torch.no_grad():
            return [sasrec.full_sort_predict(inter[b0 : b0 + bs]) for b0 in range(0, cases, bs)]

    def id_rank():
        return _id_rank(model, tok, prompts, ids, bs)

    def id_rank_with_prompts():  # from the RecBole sequence, as LLMRecommender.full_sort_predict does
        out = []
        for b0 in range(0, cases, bs):
            s, n = seq[b0 : b0 + bs].tolist(), lengths[b0 : b0 + bs].tolist()
            out.append(
                _id_rank(model, tok, id_prompts(tok, [[i for i in r[: int(k)] if i] for r, k in zip(s, n)]), ids, bs)
            )
        return torch.cat(out)

    assert torch.equal(id_rank_with_prompts(), id_rank())
    log_progress(
        "item_tokens: SASRec vs id on retail-sim: %d items, %d cases, batch %d, %d rounds",
        n_items,
        cases,
        bs,
        opts.sasrec_rounds,
    )
    wall, cpu = interleaved(
        {"sasrec": sasrec_rank, "id": id_rank, "id_with_prompts": id_rank_with_prompts}, opts.sasrec_rounds, warmup=1
    )
    per = {
        k: {"per_case_s": median(wall[k]) / cases, "cpu_per_case_s": median(cpu[k]) / cases, "rounds_s": wall[k]}
        for k in wall
    }
    for k in ("id", "id_with_prompts"):
        per[k]["vs_sasrec"] = ratio(per[k]["per_case_s"], per["sasrec"]["per_case_s"])
        per[k]["vs_sasrec_cpu"] = ratio(per[k]["cpu_per_case_s"], per["sasrec"]["cpu_per_case_s"])
    return {
        "items": n_items,
        "cases": cases,
        "batch": bs,
        "rounds": opts.sasrec_rounds,
        "sasrec_hidden": int(config["hidden_size"]),
        "sasrec_layers": int(config["n_layers"]),
        "max_len": int(config["MAX_ITEM_LIST_LENGTH"]),
        "history_items_mean": sum(map(len, histories)) / cases,
        "id_prompt_tokens_mean": sum(map(len, prompts)) / cases,
        "id_vocabulary": len(tok),
        "sasrec_parameters": sum(p.numel() for p in sasrec.parameters()),
        "id_parameters": sum(p.numel() for p in model.parameters()),
        "variants": per,
    }


# --------------------------------------------------------------------------------------- 3. S-DPO step
def _step_trainer(kind: str, model, tok, ids, opts: Options, rows, out_dir: str):
    from causalrec.data.prompts import completion_text
    from causalrec.llm.items import item_token
    from causalrec.training import SDPOConfig, SDPOTrainer
    from causalrec.training.sdpo_trainer import make_preference_dataset

    fmt_ = id_format()
    prompts = [fmt_.prompt([item_token(j) for j in h]) for h, _, _ in rows]
    chosen = [completion_text(item_token(c)) for _, c, _ in rows]
    all_neg = kind == "all"
    rejected = None if all_neg else [[completion_text(item_token(j)) for j in neg] for _, _, neg in rows]
    ds = make_preference_dataset(prompts, chosen, rejected)
    args = SDPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=opts.step_prompts,
        num_negatives="all" if all_neg else opts.step_negatives,
        beta=0.1,
        learning_rate=5e-4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=10_000,
        seed=0,
    )
    trainer = SDPOTrainer(
        model, args=args, train_dataset=ds, processing_class=tok, item_token_ids=ids if all_neg else None
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))]))
    return trainer, inputs


def run_step(opts: Options) -> dict[str, Any]:
    from benchmarks.dpo_step import _count_forwards, _resident_bytes, _trainer_step

    base, tok, ids = id_backbone(opts.step_items, sharpen=None)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(opts.step_prompts):
        picks = rng.choice(opts.step_items, 1 + opts.step_negatives, replace=False) + 1
        rows.append(
            (
                rng.integers(1, opts.step_items + 1, opts.step_history).tolist(),
                int(picks[0]),
                [int(j) for j in picks[1:]],
            )
        )
    kinds = ["all", f"{opts.step_negatives}"]
    with tempfile.TemporaryDirectory(prefix="bench-item-step-") as tmp:
        trainers, inputs, steps = {}, {}, {}
        for kind in kinds:
            trainers[kind], inputs[kind] = _step_trainer(
                kind, copy.deepcopy(base), tok, ids, opts, rows, f"{tmp}/{kind}"
            )
            steps[kind] = (lambda t, x: lambda: _trainer_step(t, x))(trainers[kind], inputs[kind])
        forwards = {k: _count_forwards(trainers[k], steps[k]) for k in kinds}
        log_progress(
            "item_tokens: S-DPO step, %d items, batch all %s / %s %s, %d repeats",
            opts.step_items,
            tuple(inputs["all"]["input_ids"].shape),
            kinds[1],
            tuple(inputs[kinds[1]]["input_ids"].shape),
            opts.step_repeats,
        )
        wall, cpu = interleaved(steps, opts.step_repeats, warmup=opts.step_warmup)
        tensor_peak = {k: tensor_peak_bytes(steps[k])[0] for k in kinds}  # deterministic: once
        touched: dict[str, list[int]] = {k: [] for k in kinds}
        for r in range(opts.step_memory_repeats):
            for k in kinds[r % 2 :] + kinds[: r % 2]:
                touched[k].append(rss_peak_delta_bytes(steps[k])[0])
        resident = {k: _resident_bytes(trainers[k]) for k in kinds}
    ref = kinds[1]
    variants = {}
    for k in kinds:
        variants[k] = {
            "negatives_per_prompt": opts.step_items - 1 if k == "all" else opts.step_negatives,
            "batch_shape": list(inputs[k]["input_ids"].shape),
            "forwards_per_step": forwards[k],
            **timings(wall[k]),
            "cpu_median_s": median(cpu[k]),
            "step_peak_bytes": median(touched[k]),
            "step_peak_values": touched[k],
            "tensor_peak_bytes": tensor_peak[k],
            "resident_bytes": resident[k],
        }
    for k in kinds:
        v = variants[k]
        v["time_ratio"] = ratio(v["median_s"], variants[ref]["median_s"])
        v["cpu_time_ratio"] = ratio(v["cpu_median_s"], variants[ref]["cpu_median_s"])
        v["memory_ratio"] = ratio(v["step_peak_bytes"], variants[ref]["step_peak_bytes"])
        v["tensor_memory_ratio"] = ratio(v["tensor_peak_bytes"], variants[ref]["tensor_peak_bytes"])
    return {
        "items": opts.step_items,
        "prompts": opts.step_prompts,
        "history_items": opts.step_history,
        "vocabulary": len(tok),
        "variants": variants,
    }


# ---------------------------------------------------------------------------------------------------- run
def run(opts: Options | None = None) -> dict[str, Any]:
    opts = opts or Options()
    real = run_real(opts)
    synthetic = run_synthetic(opts)
    sasrec = run_sasrec(opts)
    step = run_step(opts)

    at_goal = real if not real.get("skipped") and real["items"] == GOAL_ITEMS else None
    speedup = at_goal["speedup"] if at_goal else None
    checks = [r["same_scores"]["max_abs_diff"] for r in (real, synthetic) if "same_scores" in r]
    max_diff = max(checks)
    sas = sasrec["variants"]["id"]["vs_sasrec"]
    judged_sasrec = not opts.sasrec_config  # the goal is stated for retail-sim's defaults
    return {
        "benchmark": NAME,
        "config": {
            **opts.__dict__,
            "backbone": "tiny (Llama hidden 64, 2 layers, 4 heads), default init "
            "re-drawn with std 4/sqrt(fan_in) for ranking (no shape change), fresh init for the step",
            "id_history_items": ID_HISTORY,
            "title_history_items": TITLE_HISTORY,
        },
        "goals": [
            {
                "name": f"id vs title trie, time per case at {GOAL_ITEMS:,} real items",
                "target": f">= {GOAL_SPEEDUP:g}x",
                "measured": speedup,
                "passed": None if speedup is None else speedup >= GOAL_SPEEDUP,
            },
            {
                "name": "id / SASRec full_sort_predict, time per case (retail-sim)",
                "target": f"<= {GOAL_SASREC:g}x",
                "measured": sas,
                "passed": (sas is not None and sas <= GOAL_SASREC) if judged_sasrec else None,
            },
            {
                "name": "same scores: trie over one-token items vs score_item_tokens (max abs diff)",
                "target": f"<= {GOAL_DIFF:g}",
                "measured": max_diff,
                "passed": max_diff <= GOAL_DIFF,
            },
        ],
        "results": {"real": real, "synthetic": synthetic, "sasrec": sasrec, "sdpo_step": step},
        "notes": [
            f"Ranking: id = score_item_tokens, batches of {opts.id_batch} prompts showing the last {ID_HISTORY} "
            f"history items as item tokens; title = score_catalog (trie, shared prompt KV cache), batches of "
            f"{opts.title_batch} users, prompts of the last {TITLE_HISTORY} titles; two tiny default models (each "
            "built on its own vocabulary), the same cases (the title trie on the first of them), interleaved rounds, "
            "per-case time = median round time / cases. CPU-time ratios (one thread) are less sensitive to other jobs.",
            "Same scores: on the id model, score_catalog over the trie of one-token items "
            "(TitleTrie.from_token_ids([[tok] for tok in ids])) vs score_item_tokens, the same prompts.",
            "SASRec: RecBole's SASRec built by causalrec.recbole.quick_start.build on retail-sim (untrained), "
            "full_sort_predict on test-split batches under no_grad; id: the id model over the same catalog and cases "
            "(histories from the same RecBole sequences). 'id' is timed on tokenised prompts, 'id + prompts' also "
            "builds the prompt text from the sequence and tokenises it.",
            "S-DPO step = training_step (policy and reference forward, loss, backward) + AdamW step + zero_grad, as in "
            "dpo_step; all = num_negatives 'all' (every other item a negative, one row per prompt), vs "
            f"num_negatives {opts.step_negatives} (1 + {opts.step_negatives} rows per prompt). Touched = peak RSS rise "
            "during the step (VmHWM reset, heap trimmed); allocated = peak tensor bytes (torch.profiler), which counts "
            "TRL's mostly untouched fused-LM-head scratch tile on the sampled-negatives path.",
        ],
    }


# ------------------------------------------------------------------------------------------------ summary
def summary(result: dict[str, Any]) -> list[str]:
    res = result["results"]
    lines = ["Ranking per case, id (one forward per 64 prompts) vs title trie (batches of 8):", ""]
    rows = []
    for key in ("real", "synthetic"):
        r = res[key]
        if r.get("skipped"):
            continue
        rows.append(
            [
                r["label"],
                r["items"],
                f"{r['trie_nodes']:,} ({r['trie_evaluated_nodes']:,})",
                f"{fmt(r['id']['per_case_s'] * 1e3)} ({r['id']['cases']})",
                f"{fmt(r['title']['per_case_s'] * 1e3)} ({r['title']['cases']})",
                f"{fmt(r['speedup'])}x",
                f"{fmt(r['speedup_cpu'])}x",
                f"{r['id']['prompt_tokens_mean']:.0f} / {r['title']['prompt_tokens_mean']:.0f}",
                f"{r['same_scores']['max_abs_diff']:.1e}",
            ]
        )
    lines += md_table(
        [
            "catalog",
            "items",
            "trie nodes (evaluated)",
            "id ms/case (cases)",
            "title ms/case (cases)",
            "speed-up",
            "CPU-time speed-up",
            "prompt tokens id / title",
            "trie of one-token items vs id, max abs diff",
        ],
        rows,
    )
    if res["real"].get("skipped"):
        lines += ["", f"Online Retail real titles: skipped ({res['real']['skipped']})."]
    s = res["sasrec"]
    v = s["variants"]
    lines += [
        "",
        f"id vs RecBole SASRec full_sort_predict, retail-sim ({s['items']:,} items, {s['cases']:,} test "
        f"cases, batches of {s['batch']}; SASRec hidden {s['sasrec_hidden']}, {s['sasrec_layers']} layers, max "
        f"length {s['max_len']}; id prompts {s['id_prompt_tokens_mean']:.0f} tokens):",
        "",
    ]
    lines += md_table(
        ["variant", "ms/case", "CPU ms/case", "vs SASRec", "CPU time vs SASRec"],
        [["SASRec full_sort_predict", v["sasrec"]["per_case_s"] * 1e3, v["sasrec"]["cpu_per_case_s"] * 1e3, "1x", "1x"]]
        + [
            [
                name,
                v[k]["per_case_s"] * 1e3,
                v[k]["cpu_per_case_s"] * 1e3,
                f"{fmt(v[k]['vs_sasrec'])}x",
                f"{fmt(v[k]['vs_sasrec_cpu'])}x",
            ]
            for k, name in (("id", "id (score_item_tokens)"), ("id_with_prompts", "id + prompts"))
        ],
    )
    st = res["sdpo_step"]
    lines += [
        "",
        f"S-DPO step on the id model, {st['items']:,} items, {st['prompts']} prompts of "
        f"{st['history_items']} item tokens:",
        "",
    ]
    lines += md_table(
        [
            "num_negatives",
            "negatives / prompt",
            "batch rows x tokens",
            "forwards / step",
            "median ms",
            "time ratio",
            "CPU time ratio",
            "step peak MiB (touched)",
            "ratio",
            "tensor peak MiB (allocated)",
            "ratio",
        ],
        [
            [
                k,
                d["negatives_per_prompt"],
                "x".join(map(str, d["batch_shape"])),
                d["forwards_per_step"],
                d["median_s"] * 1e3,
                f"{fmt(d['time_ratio'])}x",
                f"{fmt(d['cpu_time_ratio'])}x",
                mib(d["step_peak_bytes"]),
                f"{fmt(d['memory_ratio'])}x",
                mib(d["tensor_peak_bytes"]),
                f"{fmt(d['tensor_memory_ratio'])}x",
            ]
            for k, d in st["variants"].items()
        ],
    )
    return lines
