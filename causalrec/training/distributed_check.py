"""Check that the TRL stages train the same model under ``accelerate launch`` as in one process.

Runs SFT, S-DPO and CausalDPO for a few optimizer steps on a tiny offline Llama and synthetic purchase rows, and
writes each process's per-step losses and final weights. A data-parallel run with N processes and
``per_device_train_batch_size`` b sees the same global batches, in the same order, as one process with batch b and
``gradient_accumulation_steps`` N (accelerate hands global batch k to process k mod N), so the two must agree up
to float32 summation order. Run it on your own hardware before a long multi-GPU job::

    accelerate launch --num_processes 2 -m causalrec.training.distributed_check --out runs/ddp --expect-processes 2
    python -m causalrec.training.distributed_check --gradient-accumulation-steps 2 --out runs/one --compare runs/ddp

On a CPU-only machine start the processes with ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ...`` (or
``torchrun``): ``accelerate launch --cpu --num_processes 2`` starts ONE process unless given ``--mpirun_hostfile``,
which ``--expect-processes`` catches. See docs/scale.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from causalrec.data.prompts import PromptFormat
from causalrec.errors import CausalRecError, ConfigError, UnknownNameError
from causalrec.io import atomic_path

logger = logging.getLogger(__name__)

STAGES = ("sft", "sdpo", "causal_dpo")
LORA_SUFFIX = "+lora"  # "causal_dpo+lora": the stage on LoRA adapters (the reference is TRL's frozen "ref" adapter)
RESULT_FILE = "rank{rank}.pt"
# float32, same global batches: measured 0 (bitwise) between 2 CPU processes and gradient accumulation, <= 5e-7
# between 2 x 2 rows and one 4-row batch (padding), on losses and weights after 4 Adam steps; half the global
# batch differs by > 8e-3 (tests/test_scale_accelerate.py). The margin is for other thread counts and kernels.
DEFAULT_RTOL, DEFAULT_ATOL = 1e-4, 1e-5

TITLES = (
    "red mug",
    "blue cup",
    "green tea pot",
    "paper star",
    "wool scarf",
    "garden gnome",
    "sun hat",
    "beach towel",
    "candle set",
    "snow globe",
    "rain coat",
    "lunch box",
    "picnic rug",
    "ice scraper",
    "fan heater",
    "kite",
)
SEASONS = ("winter", "summer")


@dataclass
class CheckConfig:
    """What the check trains; the same values must be given to the runs being compared.

    Attributes:
        stages: which of ``sft``, ``sdpo``, ``causal_dpo`` to run, each optionally with ``+lora`` (LoRA adapters of
            rank ``lora_r``, no dropout); each starts from the same fresh tiny model.
        rows: synthetic training rows (keep ``>= global batch x max_steps`` so no run wraps around an epoch).
        per_device_train_batch_size: rows per process per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step in each process.
        max_steps: optimizer steps per stage.
        learning_rate: large enough that the steps move the weights visibly.
        seed: data, model initialisation, sampler and prototype seeding.
        num_negatives: rejected titles per row (S-DPO / CausalDPO).
        env_source: CausalDPO environments: ``latent`` (prototypes, EMA prior) or ``season`` (labels).
        n_environments: latent environments.
        prior_momentum: EMA momentum of the latent prior (low, so a prior that differs between processes shows).
        hidden_size / layers: size of the tiny Llama.
        lora_r: LoRA rank of the ``+lora`` stages (tiny backbone).
        backbone: ``tiny`` (built here), or a Hugging Face model directory: then it is loaded with its backbone
            preset's settings (``causalrec.llm.presets``: LoRA rank 16 and alpha 32 in the ``+lora`` stages, the
            preset's dtype), as a run with that ``backbone`` loads it, so the check covers the ``pretrained`` preset.
    """

    stages: tuple[str, ...] = (*STAGES, "causal_dpo" + LORA_SUFFIX)
    rows: int = 48
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_steps: int = 4
    learning_rate: float = 1e-2
    seed: int = 0
    num_negatives: int = 2
    env_source: str = "latent"
    n_environments: int = 2
    prior_momentum: float = 0.5
    hidden_size: int = 16
    layers: int = 1
    lora_r: int = 4
    backbone: str = "tiny"

    def __post_init__(self):
        self.stages = tuple(self.stages)
        for stage in self.stages:
            if stage.removesuffix(LORA_SUFFIX) not in STAGES:
                raise UnknownNameError("stage", stage, [*STAGES, *(s + LORA_SUFFIX for s in STAGES)])
        if min(self.rows, self.per_device_train_batch_size, self.gradient_accumulation_steps, self.max_steps) < 1:
            raise ConfigError(
                "rows, per_device_train_batch_size, gradient_accumulation_steps and max_steps must be >= 1"
            )
        if self.num_negatives >= len(TITLES):
            raise ConfigError(f"num_negatives must be < {len(TITLES)} (the synthetic catalog size)")


def synthetic_records(rows: int, num_negatives: int, seed: int = 0):
    """Deterministic purchase rows: 1-3 history titles, a target, distinct negatives, a season and a region."""
    from causalrec.training.records import PreferenceRecord

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        picks = rng.choice(len(TITLES), size=4 + num_negatives, replace=False)
        n_hist = int(rng.integers(1, 4))
        season = SEASONS[int(rng.integers(len(SEASONS)))]
        out.append(
            PreferenceRecord(
                history=[TITLES[i] for i in picks[:n_hist]],
                target=TITLES[picks[3]],
                negatives=[TITLES[i] for i in picks[4:]],
                season=season,
                region="north" if picks[3] % 2 else "south",
            )
        )
    return out


def _backbone(cfg: CheckConfig, fmt: PromptFormat, lora: bool):
    from causalrec.llm.backbone import BackboneConfig, load_backbone
    from causalrec.llm.presets import TINY_BACKBONE, backbone_settings

    corpus = list(TITLES) + [fmt.template, fmt.prompt([])]
    # No LoRA dropout: each process would draw its own masks, so runs would agree only statistically.
    if cfg.backbone == TINY_BACKBONE:
        backbone = BackboneConfig(
            tiny_hidden_size=cfg.hidden_size,
            tiny_layers=cfg.layers,
            tiny_heads=2,
            seed=cfg.seed,
            device="cpu",  # the Trainer moves it to its process's device
            lora_r=cfg.lora_r if lora else 0,
            lora_dropout=0.0,
        )
    else:  # the preset's settings, as a run with this backbone would load it
        preset = backbone_settings({"backbone": cfg.backbone, "lora_r": None, "lora_alpha": None, "dtype": None})
        backbone = BackboneConfig(
            backbone=cfg.backbone,
            seed=cfg.seed,
            device="cpu",
            lora_r=preset["lora_r"] if lora else 0,
            lora_alpha=preset["lora_alpha"],
            lora_dropout=0.0,
            dtype=preset["dtype"],
        )
    return load_backbone(backbone, corpus)


def _common_args(cfg: CheckConfig) -> dict[str, Any]:
    return {
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def _flat(module: torch.nn.Module) -> torch.Tensor:
    # FSDP2 holds each process's shard as a DTensor: full_tensor() gathers it (every process calls this).
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for _, p in sorted(module.named_parameters())]
    return torch.cat([p.detach().float().cpu().flatten() for p in params])


def _summary(trainer) -> dict[str, Any]:
    history = trainer.state.log_history
    out = {
        "losses": torch.tensor([h["loss"] for h in history if "loss" in h], dtype=torch.float64),
        "training_loss": float(next(h["train_loss"] for h in history if "train_loss" in h)),
        "weights": _flat(trainer.accelerator.unwrap_model(trainer.model)),
    }
    env = getattr(trainer, "environment_model", None)
    if env is not None:
        out["env_prior"] = env.prior.detach().float().cpu().clone()
        out["prototypes"] = env.prototypes.detach().float().cpu().clone()
    return out


def run_stage(stage: str, cfg: CheckConfig, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Train one stage from a fresh model (``cfg.backbone``); returns per-step ``losses``, ``training_loss``, flat ``weights``
    (and ``env_prior``/``prototypes`` for latent CausalDPO), identical in every process of a DDP run."""
    from causalrec.training import (
        CausalDPOConfig,
        CausalDPOTrainer,
        SDPOConfig,
        SDPOTrainer,
        build_sft_config,
        preference_dataset,
        run_sft,
        sft_dataset,
    )

    fmt = PromptFormat()
    records = synthetic_records(cfg.rows, cfg.num_negatives, cfg.seed)
    model, tokenizer = _backbone(cfg, fmt, lora=stage.endswith(LORA_SUFFIX))
    out = str(Path(output_dir) / stage)
    stage = stage.removesuffix(LORA_SUFFIX)
    if stage == "sft":
        trainer = run_sft(model, tokenizer, sft_dataset(records, fmt), build_sft_config(out, **_common_args(cfg)))
        return _summary(trainer)
    if stage == "sdpo":
        args = SDPOConfig(output_dir=out, num_negatives=cfg.num_negatives, **_common_args(cfg))
        trainer = SDPOTrainer(
            model, args=args, train_dataset=preference_dataset(records, fmt), processing_class=tokenizer
        )
    else:
        args = CausalDPOConfig(
            output_dir=out,
            num_negatives=cfg.num_negatives,
            env_source=cfg.env_source,
            n_environments=cfg.n_environments,
            prior_momentum=cfg.prior_momentum,
            lambda_inv=0.5,
            env_init_samples=cfg.rows,
            **_common_args(cfg),
        )
        trainer = CausalDPOTrainer(
            model, args=args, train_dataset=preference_dataset(records, fmt), processing_class=tokenizer
        )
    trainer.train()
    return _summary(trainer)


def run_check(cfg: CheckConfig, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Run ``cfg.stages`` in this process (one of N under ``accelerate launch``) and return
    ``{"world_size", "rank", "config", "distributed_type", "stages": {stage: run_stage(...)}}``."""
    from accelerate.state import AcceleratorState

    stages = {stage: run_stage(stage, cfg, output_dir) for stage in cfg.stages}
    state = AcceleratorState()  # set up by the Trainers' Accelerator from the launcher's settings (DDP, FSDP, ...)
    return {
        "world_size": state.num_processes,
        "rank": state.process_index,
        "config": dataclasses.asdict(cfg),
        "distributed_type": str(state.distributed_type),
        "stages": stages,
    }


def save_result(result: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write ``result`` to ``<directory>/rank<r>.pt`` (tensors, numbers and strings only)."""
    path = Path(directory) / RESULT_FILE.format(rank=result["rank"])
    with atomic_path(path) as tmp:
        torch.save(result, tmp)
    return path


def load_result(directory: str | os.PathLike, rank: int = 0) -> dict[str, Any]:
    return torch.load(Path(directory) / RESULT_FILE.format(rank=rank), weights_only=True)


def differences(got: dict[str, Any], expected: dict[str, Any]) -> dict[str, float]:
    """Largest absolute difference of every compared quantity, keyed ``<stage>/<quantity>``."""
    out = {}
    for stage, exp in expected["stages"].items():
        if stage not in got["stages"]:
            continue
        for key, value in exp.items():
            a = torch.as_tensor(got["stages"][stage][key], dtype=torch.float64)
            b = torch.as_tensor(value, dtype=torch.float64)
            out[f"{stage}/{key}"] = float("inf") if a.shape != b.shape else float((a - b).abs().max())
    return out


def compare(
    got: dict[str, Any], expected: dict[str, Any], rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> list[str]:
    """A message per quantity (losses, training loss, weights, prior, prototypes) outside ``atol + rtol |expected|``;
    empty when the runs agree. A stage of ``got`` that ``expected`` lacks is reported (it cannot be checked)."""
    problems = [f"{stage}: not in the reference run" for stage in got["stages"] if stage not in expected["stages"]]
    for stage, res in got["stages"].items():
        if stage not in expected["stages"]:
            continue
        for key, value in expected["stages"][stage].items():
            a = torch.as_tensor(res[key], dtype=torch.float64)
            b = torch.as_tensor(value, dtype=torch.float64)
            if a.shape != b.shape:
                problems.append(f"{stage}/{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            elif not torch.allclose(a, b, rtol=rtol, atol=atol):
                problems.append(
                    f"{stage}/{key}: max |difference| {float((a - b).abs().max()):.3g} (atol {atol:g}, rtol {rtol:g})"
                )
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The check's options, one per ``CheckConfig`` field (its default), then ``--out``, ``--compare``,
    ``--expect-processes``, ``--rtol``, ``--atol``: shared by ``main`` and ``causalrec check``."""
    defaults = CheckConfig()
    for f in dataclasses.fields(CheckConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "stages":
            parser.add_argument(flag, default=",".join(defaults.stages), help=f"comma-separated subset of {STAGES}")
        else:
            default = getattr(defaults, f.name)
            parser.add_argument(flag, type=type(default), default=default)
    parser.add_argument("--out", required=True, help="directory for rank<r>.pt")
    parser.add_argument(
        "--compare", metavar="DIR", help="compare rank 0's result with DIR/rank0.pt; exit 1 on mismatch"
    )
    parser.add_argument("--expect-processes", type=int, help="fail unless the launcher started this many processes")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL)
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    return parser


def config_from_args(args: argparse.Namespace) -> CheckConfig:
    """The ``CheckConfig`` of options parsed with ``add_arguments`` (``--stages``: comma-separated)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(CheckConfig)}
    values["stages"] = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    return CheckConfig(**values)


def check(
    config: CheckConfig,
    out: str | os.PathLike,
    *,
    compare_with: str | os.PathLike | None = None,
    expect_processes: int | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> int:
    """Run the check and save this process's result under ``out``; rank 0 logs each stage's losses and, with
    ``compare_with``, compares its result with ``compare_with``/rank0.pt. Returns 0, or 1 on a mismatch. Raises
    ``ConfigError`` (nothing saved) when the launcher did not start ``expect_processes`` processes."""
    result = run_check(config, out)
    if expect_processes is not None and result["world_size"] != expect_processes:
        raise ConfigError(
            f"the launcher started {result['world_size']} process(es), expected {expect_processes}. On a "
            "CPU-only machine 'accelerate launch --cpu' starts one process unless given --mpirun_hostfile; use "
            "'ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N' or torchrun"
        )
    save_result(result, out)
    if result["rank"] != 0:
        return 0
    for stage, res in result["stages"].items():
        logger.info(
            "%s: %s, %d process(es), losses %s",
            stage,
            result["distributed_type"],
            result["world_size"],
            " ".join(f"{x:.6f}" for x in res["losses"].tolist()),
        )
    if compare_with:
        problems = compare(result, load_result(compare_with), rtol, atol)
        for problem in problems:
            logger.error("mismatch with %s: %s", compare_with, problem)
        if problems:
            return 1
        logger.info("matches %s (rtol %g, atol %g)", compare_with, rtol, atol)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m causalrec.training.distributed_check`` (the module ``accelerate launch -m`` and ``torchrun -m``
    start); ``causalrec check`` takes the same options. A ``CausalRecError`` is logged and exits 2."""
    parser = argparse.ArgumentParser(
        prog="python -m causalrec.training.distributed_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ns = add_arguments(parser).parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return check(
            config_from_args(ns),
            ns.out,
            compare_with=ns.compare,
            expect_processes=ns.expect_processes,
            rtol=ns.rtol,
            atol=ns.atol,
        )
    except CausalRecError as err:
        logger.error("%s", err)
        return 2
    finally:
        close_process_group()


def close_process_group() -> None:
    """Destroy the process group accelerate created, before the interpreter exits: left to exit, gloo's threads
    can abort a process whose work is done ("terminate called without an active exception", exit -6; seen once
    in CI under load after every stage had logged its losses)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
