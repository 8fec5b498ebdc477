"""Each compat patch fixes a real failure: shown in a fresh interpreter without causalrec,
and fixed with it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import causalrec  # noqa: F401
from causalrec.errors import CausalRecError
from causalrec.recbole import checkpoints
from causalrec.recbole import patches as compat

# Makes `import ray` fail the way it does on Python >= 3.12 or without pkg_resources.
BLOCK_RAY = textwrap.dedent(
    """
    import sys, importlib.abc
    class _NoRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError("no ray here")
    sys.meta_path.insert(0, _NoRay())
    """
)


def _python(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_numpy_aliases_needed_and_fixed(tmp_path):
    code = "from recbole.config import Config; Config(model='Pop', dataset='ml-100k')"
    without = _python(BLOCK_RAY + code, tmp_path)
    if without.returncode == 0:
        pytest.skip("this numpy still has the aliases RecBole needs: the patch is a no-op here")
    assert "np.float_" in without.stderr or "float_" in without.stderr
    with_patch = _python(BLOCK_RAY + "import causalrec\n" + code, tmp_path)
    assert with_patch.returncode == 0, with_patch.stderr[-2000:]


def test_ray_stub_needed_and_fixed(tmp_path):
    without = _python(BLOCK_RAY + "import recbole.quick_start", tmp_path)
    assert without.returncode != 0
    fixed = _python(BLOCK_RAY + "import causalrec, recbole.quick_start as q\nq.objective_function", tmp_path)
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_ray_stub_report_is_noop():
    assert compat.stub_ray_if_broken() in (True, False)
    import ray.tune

    if getattr(sys.modules["ray"], "_causalrec_stub", False):
        assert ray.tune.report(ndcg=1.0) is None


def test_scipy_dok_update():
    probe = _python("import scipy.sparse as sp; print(hasattr(sp.dok_matrix, '_update'))", ".")
    if probe.stdout.strip() == "True":
        pytest.skip("this scipy still has dok_matrix._update: the patch is a no-op here")
    matrix = sp.dok_matrix((3, 4), dtype=np.float32)
    matrix._update({(0, 1): 1.0, (2, 3): 2.0})
    dense = matrix.toarray()
    assert dense[0, 1] == 1.0 and dense[2, 3] == 2.0 and dense.sum() == 3.0


def test_trusted_torch_load_is_scoped(tmp_path):
    from recbole.config import Config

    config = Config(model="Pop", dataset="ml-100k")
    path = tmp_path / "ckpt.pth"
    torch.save({"config": config, "state_dict": {}}, path, pickle_protocol=4)  # as RecBole's Trainer does
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        torch.load(path)  # torch >= 2.6 default: what breaks RecBole's evaluate(load_best_model=True)
    with checkpoints.trusted_torch_load():
        loaded = torch.load(path)
        with pytest.raises(Exception):  # noqa: B017 - torch's error class differs across versions
            torch.load(path, weights_only=True)  # an explicit choice is respected
    assert loaded["config"]["model"] == "Pop"
    with pytest.raises(Exception):  # noqa: B017 - torch's error class differs across versions
        torch.load(path)  # the default is restored outside the context


def test_pandas_3_refused(monkeypatch):
    import pandas as pd

    monkeypatch.setattr(pd, "__version__", "3.0.1")
    with pytest.raises(CausalRecError, match="pandas<3|pandas>=2.2,<3"):
        compat.check_pandas()


def test_pop_counts_every_purchase_in_a_batch():
    """RecBole's Pop counted an item once per batch however often it occurs (upstream bug)."""
    from recbole.data.interaction import Interaction
    from recbole.model.general_recommender.pop import Pop

    model = Pop.__new__(Pop)
    torch.nn.Module.__init__(model)
    model.ITEM_ID, model.device = "item_id", torch.device("cpu")
    model.item_cnt = torch.zeros(5, 1, dtype=torch.long)
    batch = Interaction({"item_id": torch.tensor([1, 1, 1, 2, 3, 3]), "label": torch.tensor([1, 1, 1, 1, 1, 0])})
    model.calculate_loss(batch)
    assert model.item_cnt.squeeze(1).tolist() == [0, 3, 1, 1, 0]  # the negative row (label 0) is not a purchase


def test_ensure_dir_has_no_race_window(tmp_path, monkeypatch):
    """B17: RecBole's ensure_dir checked os.path.exists, then os.makedirs; the second of two processes creating
    the same folder died with FileExistsError. Simulated: the folder appears between the check and the call."""
    import os

    from recbole.trainer import trainer
    from recbole.utils import logger

    folder = tmp_path / "saved"
    folder.mkdir()
    monkeypatch.setattr(os.path, "exists", lambda path: False)  # what the losing process saw a moment earlier
    trainer.ensure_dir(str(folder))
    logger.ensure_dir(str(folder))
    assert folder.is_dir()


def test_log_dir_puts_recbole_logs_under_one_folder(tmp_path, monkeypatch):
    """B16: with log_dir (causalrec.run sets it to checkpoint_dir) RecBole's log and TensorBoard folders go under
    it instead of the working directory."""

    monkeypatch.chdir(tmp_path)
    causalrec.run(
        "Pop",
        "retail-sim",
        config_dict={
            "sim_users": 150,
            "sim_items": 60,
            "epochs": 1,
            "show_progress": False,
            "checkpoint_dir": str(tmp_path / "out"),
        },
    )
    assert not (tmp_path / "log").exists() and not (tmp_path / "log_tensorboard").exists()
    assert list((tmp_path / "out" / "log" / "Pop").glob("Pop-retail-sim-*.log"))
    assert (tmp_path / "out" / "log_tensorboard").is_dir()
