"""``causalrec.run``: RecBole's ``run_recbole`` with validation, one protocol and clean errors.

Differences from ``recbole.quick_start.run_recbole`` (which also works after ``import causalrec``):
unknown model/dataset/config keys fail early with the valid choices; the command line is not
re-parsed by RecBole's Config; a per-epoch ``callback_fn`` is passed through (Optuna pruning);
and the result carries the evaluation protocol and per-environment metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable, Sequence

from causalrec.recbole import protocol, repeat_mix
from causalrec.recbole.evaluation import ENV_FIELDS, evaluate_with_environments
from causalrec.recbole.preflight import check_against_data, preflight, read_config_files, resolve_nulls
from causalrec.recbole.threads import govern_threads, measured, resolve_num_threads, tick_between_batches

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def _argv_isolated():
    """RecBole's Config parses ``--key=value`` out of sys.argv; causalrec passes settings explicitly."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _datasets_bars_off(off: bool):
    """Hugging Face ``datasets``' own bars (TRL's tokenizing and filtering maps) follow ``show_progress`` too; the
    switch is global, so it is put back afterwards."""
    import datasets

    if not off or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def make_config(model: str, dataset: str, config_file_list=None, config_dict=None, *, output=None, saved=True):
    """A RecBole ``Config`` after the preflight (``causalrec.recbole.preflight``: every key, the training stages'
    arguments, input files and the folders a run writes, incl. ``output``); prepares causalrec datasets."""
    from recbole.config import Config

    params = resolve_nulls({**read_config_files(config_file_list), **(config_dict or {})})
    preflight(model, dataset, params, output=output, saved=saved)
    if params.get("log_dir") is None:  # a run writes under one folder: RecBole's logs beside its checkpoints
        params["log_dir"] = params.get("checkpoint_dir") or "saved/"
    with _argv_isolated():
        return Config(model=model, dataset=dataset, config_dict=params)


def build(model: str, dataset: str, config_file_list=None, config_dict=None, *, output=None, saved=True):
    """``(config, trainer, (train, valid, test))`` for a run, the way RecBole's ``run_recbole`` sets them up
    (seeds, logger, dataset, data loaders with causalrec's history protocol, model on its device).
    ``num_threads`` (when set) becomes torch's intra-op thread count here, before any tensor work."""
    import torch
    from recbole.data import create_dataset
    from recbole.quick_start import quick_start
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    config = make_config(model, dataset, config_file_list, config_dict, output=output, saved=saved)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    threads = resolve_num_threads(config["num_threads"])  # after the logger: ``auto`` logs its choice
    if threads is not None:
        torch.set_num_threads(threads)
    govern_threads(threads if measured(config["num_threads"]) else None)  # a job that starts later: fewer threads
    data = create_dataset(config)
    loaders = quick_start.data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    check_against_data(config, loaders[0]._dataset)
    recommender = get_model(config["model"])(config, loaders[0]._dataset).to(config["device"])
    trainer_cls = get_trainer(config["MODEL_TYPE"], config["model"])
    if config[
        "resume"
    ]:  # classical models: a last-epoch checkpoint after every epoch (causalrec.recbole.classical_trainer)
        from causalrec.recbole.classical_trainer import resumable

        trainer_cls = resumable(trainer_cls)
    trainer = trainer_cls(config, recommender)
    if hasattr(trainer, "eval_collector"):  # evaluation takes no optimizer step: the governor looks there too
        tick_between_batches(trainer.eval_collector)
    if config[
        "context_rerank"
    ]:  # the case's environment at test time, for any model (causalrec.recbole.context_rerank)
        from causalrec.recbole import context_rerank

        context_rerank.install(
            trainer, loaders[0]._dataset, config["context_rerank"], float(config["context_rerank_alpha"] or 1.0)
        )
    if config["repeat_mix"] and not getattr(recommender, "ranks_repeats_itself", False):
        # any model: the customer's own purchase shares (the LLM models mix inside full_sort_predict)
        weight = repeat_mix.training_weight(config["repeat_mix"])
        repeat_mix.install(trainer, loaders[0]._dataset, loaders[1]._dataset, loaders[2], weight)
        if config["repeat_mix"] == repeat_mix.AUTO:  # each epoch's validation at its best weight
            repeat_mix.choose_weight_per_validation(trainer, loaders[2])
    return config, trainer, loaders


def run(
    model: str,
    dataset: str,
    config_file_list: Sequence[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    *,
    saved: bool = True,
    callback_fn: Callable[[int, float], None] | None = None,
    resume: bool = False,
    output: str | os.PathLike | None = None,
) -> dict[str, Any] | None:
    """Train ``model`` on ``dataset`` and evaluate it on the test split.

    ``resume=True`` (config key ``resume``) makes the LLM models' TRL stages write step checkpoints and
    continue an interrupted stage from its last one; finished stages are reused either way (``stage_cache``).
    RecBole's classical models (trained by its ``Trainer.fit`` epoch loop) then write a last-epoch checkpoint after
    every epoch and continue at the next epoch (``causalrec.recbole.classical_trainer``); it is deleted once the test
    result exists, and the result gets ``epochs`` (``trained`` here, ``resumed_from``, ``last``, ``best``).

    ``output``: the file the caller will write the result to; the preflight probes its folder for writing, so a
    run never trains for hours and then loses its result.

    Returns RecBole's result dict (``best_valid_score``, ``best_valid_result``, ``test_result``)
    plus ``protocol`` (one line), when enabled ``test_env_result`` (metrics per environment) and, for the
    LLM models, ``stages`` (per training stage: validation score, reused from the stage cache or trained, ...).

    Under ``accelerate launch``/``torchrun`` every process trains (the LLM models' TRL stages as one DDP run), the
    main process (rank 0) evaluates and returns the result, the other processes return None.
    """
    if resume:
        config_dict = {**(config_dict or {}), "resume": True}
    try:
        return _train_and_test(model, dataset, config_file_list, config_dict, saved, callback_fn, output)
    finally:
        govern_threads(None)  # the run's thread governor must not touch what the process does next


def epoch_cap(trainer, valid_data) -> dict[str, int] | None:
    """Where a RecBole fit loop ran out of ``epochs`` before its early stopping fired (the model may still have been
    improving: not converged), the cap, the patience and the evaluations since the best; else None. RecBole stops
    once ``cur_step`` exceeds ``stopping_step``; models of one epoch and the LLM trainer (its stages early-stop
    themselves) have nothing to report."""
    from causalrec.recbole.trainer import LLMTrainer

    epochs, patience = getattr(trainer, "epochs", 0), getattr(trainer, "stopping_step", None)
    if (
        isinstance(trainer, LLMTrainer)
        or patience is None
        or epochs <= 1
        or not valid_data
        or getattr(trainer, "eval_step", 1) <= 0
    ):
        return None
    if trainer.cur_step > patience:
        return None
    return {"epochs": int(epochs), "stopping_step": int(patience), "evaluations_since_best": int(trainer.cur_step)}


def _train_and_test(model, dataset, config_file_list, config_dict, saved, callback_fn, output):
    config, trainer, (train_data, valid_data, test_data) = build(
        model, dataset, config_file_list, config_dict, output=output, saved=saved
    )
    from causalrec.recbole.trainer import LLMTrainer

    show = bool(config["show_progress"])
    with _datasets_bars_off(not show and isinstance(trainer, LLMTrainer)):
        return _fit_and_test(config, trainer, train_data, valid_data, test_data, saved, callback_fn, show)


def _fit_and_test(config, trainer, train_data, valid_data, test_data, saved, callback_fn, show):
    discard_last_epoch = getattr(trainer, "discard_last_epoch", None)
    if discard_last_epoch is not None:  # keep a finished last-epoch checkpoint until the test result exists
        trainer.keep_finished_checkpoint = True
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=show, callback_fn=callback_fn
    )
    from causalrec.recbole.trainer import process_rank

    capped = epoch_cap(trainer, valid_data)
    if capped:
        _log.warning(
            "%s ran all %d epochs without its early stopping firing (stopping_step %d; %d evaluations since the best): "
            "it may still have been improving; raise epochs to train it to convergence",
            config["model"],
            capped["epochs"],
            capped["stopping_step"],
            capped["evaluations_since_best"],
        )
    rank, processes = process_rank()
    if rank != 0:
        _log.info("process %d of %d: training done; the main process evaluates", rank, processes)
        return None
    chosen = None
    if config["repeat_mix"] == repeat_mix.AUTO and valid_data:  # the copy weight: the best model's best on validation
        from recbole.utils import calculate_valid_score

        if getattr(trainer.model, "ranks_repeats_itself", False):  # LLM stages early-stop without the mixture
            repeat_mix.choose_weight_per_validation(trainer, test_data)
        best_valid_result = trainer.evaluate(valid_data, load_best_model=saved, show_progress=show)
        best_valid_score = calculate_valid_score(best_valid_result, trainer.valid_metric)
        weight, by_weight = trainer.repeat_mix_sweep
        chosen = {"weight": weight, "valid_score_by_weight": {str(w): s for w, s in by_weight.items()}}
    test_result, test_env_result = evaluate_with_environments(
        trainer,
        test_data,
        load_best_model=saved,
        show_progress=show,
        fields=ENV_FIELDS if config["env_metrics"] else (),
    )
    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": dict(best_valid_result or {}),
        "test_result": dict(test_result),
        "test_env_result": test_env_result,
        "protocol": protocol.describe_protocol(config),
    }
    if chosen is not None:
        result["repeat_mix"] = chosen
    if capped:
        result["epoch_cap"] = capped
    if getattr(trainer, "stage_results", None) is not None:
        result["stages"] = trainer.stage_results
    if discard_last_epoch is not None:
        if trainer.last_epoch_file:  # it checkpointed (models of one epoch do not)
            result["epochs"] = dict(trainer.epoch_summary)
        discard_last_epoch()
    _log.info("test result: %s", result["test_result"])
    return result
