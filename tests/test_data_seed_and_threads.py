"""``causalrec data prepare|stats`` read the data's seed from ``data_seed`` as ``causalrec run`` does (RecBole's
``seed`` leaves the data alone), and the ``num_threads`` key sets torch's thread count for a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from causalrec import cli
from causalrec.errors import ConfigError
from causalrec.recbole import threads
from causalrec.recbole.preflight import known_config_keys, validate
from causalrec.recbole.quick_start import build, make_config

SMALL = {"sim_users": 150, "sim_items": 60}


def _cli(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def _prepared_by_cli(capsys, **params) -> Path:
    pairs = [arg for key, value in {**SMALL, **params}.items() for arg in ("-p", f"{key}={value}")]
    out = _cli(capsys, "data", "prepare", "-d", "retail-sim", *pairs)
    return Path(out.split("prepared retail-sim at ")[1].splitlines()[0])


def _prepared_by_run(**params) -> Path:
    """The directory ``causalrec run`` (through ``make_config``, which prepares the data) reads."""
    config = make_config("Pop", "retail-sim", config_dict={**SMALL, "show_progress": False, **params})
    return Path(config["prepared_dir"])


def test_data_prepare_and_run_agree_on_the_data_seed(in_tmp, capsys):
    default = _prepared_by_cli(capsys)
    assert default == _prepared_by_run()  # both default to data_seed 2020
    seven = _prepared_by_cli(capsys, data_seed=7)
    assert seven != default  # data_seed changes the data (the cache key)...
    assert seven == _prepared_by_run(data_seed=7)  # ...and run with the same data_seed reads the same files
    assert seven == _prepared_by_run(data_seed=7, seed=3)
    # RecBole's seed alone changes nothing, in data prepare as in run (it used to become the data's seed here)
    assert _prepared_by_cli(capsys, seed=7) == default == _prepared_by_run(seed=7)
    assert _prepared_by_cli(capsys, seed=3, data_seed=7) == seven


def test_data_stats_follow_data_seed_not_seed(in_tmp, capsys):
    def stats(*pairs):
        return _cli(capsys, "data", "stats", "-d", "retail-sim", "-p", "sim_users=150", "-p", "sim_items=60", *pairs)

    default = stats()
    assert "users" in default
    assert stats("-p", "seed=7") == default
    assert stats("-p", "data_seed=7") != default  # another simulated shop


def test_num_threads_is_a_known_key_listed_by_keys(capsys):
    assert "num_threads" in known_config_keys()
    assert "num_threads" in _cli(capsys, "keys").split()
    validate("Pop", "retail-sim", {"num_threads": 1})
    validate("Pop", "retail-sim", {"num_threads": "auto"})
    for bad in (0, -2, "many", 1.5):
        with pytest.raises(ConfigError, match="num_threads"):
            validate("Pop", "retail-sim", {"num_threads": bad})


def test_build_applies_num_threads(in_tmp, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        torch.set_num_threads(1)
        build("Pop", "retail-sim", config_dict={**SMALL, "show_progress": False, "num_threads": 2})
        assert torch.get_num_threads() == 2
        # the default, auto (also what ``num_threads: ~`` means): OMP_NUM_THREADS where the environment sets it
        build("Pop", "retail-sim", config_dict={**SMALL, "show_progress": False, "num_threads": None})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_auto_leaves_the_cores_other_processes_keep_busy(in_tmp, monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "allowed_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 2.8)  # three of four cores taken
    monkeypatch.setattr(threads, "quota_cores", lambda: None)  # no container quota
    try:
        with caplog.at_level("INFO", logger="causalrec.recbole.threads"):
            build("Pop", "retail-sim", config_dict={**SMALL, "show_progress": False})
        assert torch.get_num_threads() == 1
        assert "num_threads auto: 1 thread(s), 2.8 of 4 cores busy at start" in caplog.text
        monkeypatch.setattr(threads, "busy_cores", lambda cores: 0.3)  # a quiet machine: one thread per core
        assert threads.resolve_num_threads("auto") == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's (and the test suite's) explicit choice wins
        assert threads.resolve_num_threads("auto") == 3
        assert threads.resolve_num_threads(2) == 2 and threads.resolve_num_threads(None) is None
    finally:
        torch.set_num_threads(before)


def test_auto_stays_within_the_cgroups_cpu_quota(tmp_path, monkeypatch):
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    (v1 / "cpu").mkdir(parents=True)
    assert threads.quota_cores(str(tmp_path / "none")) is None
    (v2 / "cpu.max").write_text("max 100000\n")
    assert threads.quota_cores(str(v2)) is None
    (v2 / "cpu.max").write_text("150000 100000\n")  # --cpus 1.5: two threads, the second one half used
    assert threads.quota_cores(str(v2)) == 2
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.quota_cores(str(v1)) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert threads.quota_cores(str(v1)) == 3
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "allowed_cores", lambda: list(range(64)))  # a container on a 64-core host
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 10.0)
    monkeypatch.setattr(threads, "quota_cores", lambda: 3)
    assert threads.resolve_num_threads("auto") == 3
    monkeypatch.setattr(threads, "quota_cores", lambda: None)
    assert threads.resolve_num_threads("auto") == 54


def test_auto_threads_count_a_core_busy_from_half_its_time():
    assert [threads.auto_threads(2, b) for b in (0.0, 0.49, 0.51, 1.0, 1.6, 2.0)] == [2, 2, 1, 1, 1, 1]
    assert [threads.auto_threads(2, b, taken_from=0.25) for b in (0.2, 0.3, 1.2, 1.3)] == [2, 1, 1, 1]
    assert threads.auto_threads(8, 3.2) == 5 and threads.auto_threads(1, 0.9) == 1


def test_busy_cores_reads_the_allowed_cpus_of_proc_stat(tmp_path, monkeypatch):
    def stat(cpu0, cpu1, cpu2):  # user nice system idle iowait irq softirq steal per cpu
        lines = ["cpu  0 0 0 0 0 0 0 0"] + [
            f"cpu{i} " + " ".join(map(str, v)) for i, v in enumerate((cpu0, cpu1, cpu2))
        ]
        return "\n".join(lines + ["intr 1 2 3", "ctxt 99"]) + "\n"

    path = tmp_path / "stat"
    path.write_text(stat([100, 0, 0, 100, 0, 0, 0, 0], [100, 0, 0, 100, 0, 0, 0, 0], [0, 0, 0, 100, 0, 0, 0, 0]))
    after = stat([130, 10, 10, 140, 10, 0, 0, 0], [150, 0, 40, 100, 0, 5, 5, 0], [100, 0, 0, 100, 0, 0, 0, 0])
    monkeypatch.setattr(threads.time, "sleep", lambda s: path.write_text(after))
    # cpu0: 50 busy of 100 (idle and iowait are not busy); cpu1: 100 of 100; cpu2 is not this process's
    assert threads.busy_cores([0, 1], path=str(path)) == pytest.approx(1.5)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.0, 1.0, 1.0))
    assert threads.busy_cores([0, 1], path=str(tmp_path / "absent")) == 2.0  # no /proc: the load average, capped
    real = threads.busy_cores(threads.allowed_cores(), sample_s=0.05)
    assert 0.0 <= real <= len(threads.allowed_cores()) + 1e-9


def test_the_auto_default_keeps_the_keys_of_cells_published_before_it(in_tmp):
    """A cell computed when the default was None (torch's own count) is found again: published cells and every
    ``--out`` cache stay valid (docs/results/retail-sim-dial, a grid run without ``num_threads``)."""
    import json

    from causalrec.experiments.compare import CompareConfig, plan

    published = Path(__file__).resolve().parents[1] / "docs/results/retail-sim-dial/dial-0.0-d2021-context/cells"
    record = json.loads(next(published.glob("BPR-seasonal-seed2020-*.json")).read_text())
    assert "num_threads" not in record["params"]
    params = {k: v for k, v in record["params"].items() if k not in ("split", "seed")}
    (cell,) = plan(CompareConfig(models=["BPR"], splits=["seasonal"], seeds=[2020], out=in_tmp / "o", params=params))
    assert cell.key == record["key"]
    (other,) = plan(
        CompareConfig(
            models=["BPR"], splits=["seasonal"], seeds=[2020], out=in_tmp / "o", params={**params, "num_threads": 1}
        )
    )
    assert other.key != record["key"]  # an explicit count is a setting of its own


class _Machine:
    """A fake /proc/stat, wall clock and process CPU clock for ThreadGovernor: ``run(seconds, own, others)`` lets
    ``seconds`` pass with this process using ``own`` cores and other processes ``others`` cores of two."""

    def __init__(self, path: Path):
        self.path, self.wall, self.own, self.busy = path, 0.0, 0.0, 0.0
        self._write()

    def _write(self):
        jiffies = round(self.busy * 100)  # USER_HZ 100, split over cpu0 and cpu1; cpu2 is not ours and always busy
        busy = (jiffies // 2, jiffies - jiffies // 2, 10**6)
        lines = [f"cpu{i} {b} 0 0 {10**6} 0 0 0 0" for i, b in enumerate(busy)]
        self.path.write_text("cpu  0 0 0 0 0 0 0 0\n" + "\n".join(lines) + "\n")

    def run(self, seconds, own, others):
        self.wall += seconds
        self.own += own * seconds
        self.busy += (own + others) * seconds
        self._write()

    def governor(self, start=2, **kw):
        self.set_to: list[int] = []
        return threads.ThreadGovernor(
            start,
            [0, 1],
            ceiling=kw.pop("ceiling", 2),
            stat_path=str(self.path),
            clock=lambda: self.wall,
            cpu_clock=lambda: self.own,
            set_threads=self.set_to.append,
            **kw,
        )


def test_governor_drops_a_thread_when_a_job_starts_later_and_takes_it_back(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    machine = _Machine(tmp_path / "stat")
    gov = machine.governor(start=2)
    machine.run(30, own=2.0, others=0.0)  # quiet: this run keeps both cores
    assert gov.check() is None and gov.threads == 2
    machine.run(30, own=1.9, others=0.1)  # a daemon's tenth of a core: no change
    assert gov.check() is None
    # another job starts: under autogroups it gets about half a core beside two spinning threads, here a bit less
    machine.run(30, own=1.6, others=0.4)
    assert gov.others(*_two_samples(gov, machine, own=1.6, others=0.4)) == pytest.approx(0.4)
    assert gov.check() is None  # the first look that disagrees waits for a second one
    machine.run(30, own=1.6, others=0.4)
    assert gov.check() == 1 and machine.set_to == [1] and gov.threads == 1
    machine.run(30, own=1.0, others=1.0)  # the job keeps its core: stay at one
    assert gov.check() is None and gov.check() is None
    machine.run(30, own=1.0, others=0.0)  # it ended: back to two after two quiet looks
    assert gov.check() is None
    machine.run(30, own=1.0, others=0.0)
    assert gov.check() == 2 and machine.set_to == [1, 2]


def _two_samples(gov, machine, own, others):
    before = gov._sample()
    machine.run(10, own=own, others=others)
    return before, gov._sample()


def test_governor_ignores_a_burst_and_keeps_within_its_ceiling(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    machine = _Machine(tmp_path / "stat")
    gov = machine.governor(start=2)
    machine.run(30, own=1.0, others=1.0)
    assert gov.check() is None  # one busy look
    machine.run(30, own=2.0, others=0.0)
    assert gov.check() is None  # then quiet again: no change, and the pending one is forgotten
    machine.run(30, own=1.0, others=1.0)
    assert gov.check() is None and machine.set_to == []
    capped = machine.governor(start=1, ceiling=1)  # a CPU quota of one core: never two
    for _ in range(3):
        machine.run(30, own=1.0, others=0.0)
        assert capped.check() is None
    assert machine.set_to == []


def test_governor_ticks_after_optimizer_steps_at_most_every_interval(tmp_path, monkeypatch):
    machine = _Machine(tmp_path / "stat")
    gov = machine.governor(start=2, interval_s=30.0)
    looks = []
    check = gov.check
    monkeypatch.setattr(gov, "check", lambda: (looks.append(machine.wall), check())[1])
    machine.run(10, own=2.0, others=0.0)
    gov.tick()
    machine.run(25, own=2.0, others=0.0)
    gov.tick()
    gov.tick()
    assert looks == [35.0]  # not at 10 s; once at 35 s, not again in the same interval
    # govern_threads hooks every optimizer's step and replaces the last run's governor
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.measured("auto") and not threads.measured(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not threads.measured("auto")
    live = threads.govern_threads(torch.get_num_threads())
    try:
        calls = []
        live.interval_s = 0.0  # look after every step
        monkeypatch.setattr(live, "check", lambda: calls.append(1))
        param = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([param], lr=0.1)
        param.sum().backward()
        opt.step()
        assert len(calls) == 1
    finally:
        threads.govern_threads(None)
    opt.step()
    assert len(calls) == 1  # stopped: no hook left


def test_a_run_with_auto_threads_is_governed_while_it_trains_and_not_after(in_tmp, monkeypatch):
    from causalrec.recbole import quick_start

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 0.0)
    seen = []
    build = quick_start.build

    def spy(*args, **kwargs):
        out = build(*args, **kwargs)
        seen.append(threads._governor)
        return out

    monkeypatch.setattr(quick_start, "build", spy)
    from recbole.evaluator import Collector

    ticks, collects, collect = [], [], Collector.eval_batch_collect
    monkeypatch.setattr(threads, "tick", lambda: ticks.append(threads._governor is not None))
    monkeypatch.setattr(Collector, "eval_batch_collect", lambda *a, **k: (collects.append(1), collect(*a, **k))[1])
    try:
        quick_start.run("BPR", "retail-sim", config_dict={**SMALL, "show_progress": False, "epochs": 2})
        assert seen and seen[0] is not None  # auto, measured: governed during training
        # ... and during evaluation (validation after each epoch, the test), a look before every batch
        assert len(collects) >= 3 and ticks == [True] * len(collects)
        assert threads._governor is None  # and stopped with the run: the process's next work is left alone
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's count: nothing to govern
        quick_start.run("BPR", "retail-sim", config_dict={**SMALL, "show_progress": False, "epochs": 1})
        assert seen[1] is None
    finally:
        threads.govern_threads(None)
        torch.set_num_threads(before)
