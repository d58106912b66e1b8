"""`regimen plan`: exact state counts, traced activations, the table's decisions, and its bad inputs.

- The planner counts parameters, gradients and optimizer state from the optimizer's own state
  built over fake tensors; after a real step of the same strategy the real tensors hold exactly
  as many bytes, for every registered optimizer.
- Activations traced on fake tensors equal what the same step holds on real tensors (the same
  ops run; only the data is missing).
- Every row says it fits exactly when its peak is within the memory; each alternative runs the
  largest micro-batch that fits; the recommendation is the fastest row that fits.
- `--apply` writes a strategy that `regimen train` runs; bad input is one line and exit 2.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from regimen import calibrate, devices, estimate
from regimen.errors import UserError
from regimen.optim import NAMES, build_optimizer
from regimen.plan import Planner, resolve_target
from regimen.strategy import Strategy
from regimen.task import build_task
from regimen.trace import Recorder, fake_copy
from tests.conftest import TINY_GPT, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [*TINY_GPT, "model.n_layer=2", "batch.size=8", "train.steps=20", "train.device=cpu"]


def _strategy(corpus: Path, *extra: str) -> Strategy:
    return Strategy.load(None, [*SMALL, f"data.source=text:{corpus}", *extra]).resolve()


def _optimizer_args(name: str) -> list[str]:
    full = ["batch.schedule=full"] if name == "gd" else []  # gd is full-batch descent
    constant = ["lr.schedule=constant"] if name.startswith("schedulefree") else []  # it replaces the schedule
    return [f"optimizer.name={name}", *full, *constant]


def _real_step(s: Strategy) -> tuple[int, int, int]:
    """(param, grad, optimizer-state bytes) of the real tensors after one real step of `s`."""
    task = build_task(s)
    model = task.model
    optimizer = build_optimizer(model, s.optimizer)
    assert task.data is not None
    batch = task.data.train.gather(torch.arange(4).numpy())
    loss, _, _ = task.forward(batch, model)
    loss.backward()
    params = list({id(p): p for p in model.parameters()}.values())
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    optimizer.step()
    state = {id(v.untyped_storage()): v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)}
    return (
        sum(p.untyped_storage().nbytes() for p in params),
        sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None),
        sum(v.untyped_storage().nbytes() for v in state.values()),
    )


@pytest.mark.parametrize("name", NAMES)
def test_state_counts_equal_the_real_tensors(name: str, corpus: Path) -> None:
    s = _strategy(corpus, *_optimizer_args(name))
    task = build_task(s)
    trace = estimate.trace_policy(lambda mode: fake_copy(task.model, mode), task, s, "none", [2, 4])
    counted = trace.state
    params, grads, state = _real_step(s)
    assert (counted.param_bytes, counted.grad_bytes, counted.optimizer_bytes) == (params, grads, state)


def test_state_counts_differ_as_the_algorithms_do(corpus: Path) -> None:
    """Not 0 == 0: Adam keeps two moments, Lion and momentum one, SGD none, Adafactor factored rows and columns."""
    counted = {}
    for name in ("sgd", "momentum", "lion", "adamw", "adafactor", "schedulefree_adamw"):
        s = _strategy(corpus, *_optimizer_args(name))
        task = build_task(s)
        counted[name] = estimate.trace_policy(lambda mode, t=task: fake_copy(t.model, mode), task, s, "none", [2]).state
    p = counted["sgd"].param_bytes
    assert counted["sgd"].optimizer_bytes == 0
    assert counted["momentum"].optimizer_bytes == counted["lion"].optimizer_bytes == p
    assert 2 * p < counted["adamw"].optimizer_bytes < 2 * p + 1024  # two moments and a 4-byte step per tensor
    assert counted["schedulefree_adamw"].optimizer_bytes == 2 * p  # z and the second moment
    assert 0 < counted["adafactor"].optimizer_bytes < p / 4


def test_traced_activations_equal_a_real_step(corpus: Path) -> None:
    """The same forward and backward on real tensors peaks at the very bytes the fake trace predicted."""
    s = _strategy(corpus, "optimizer.name=adamw")
    task = build_task(s)
    trace = estimate.trace_policy(lambda mode: fake_copy(task.model, mode), task, s, "none", [4, 8])
    model = task.model
    params = list({id(p): p for p in model.parameters()}.values())
    recorder = Recorder()
    recorder.hold(params, "params")
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: recorder.hold([p.grad], "grads"))
    assert task.data is not None
    batch = task.data.train.gather(torch.arange(8).numpy())
    with recorder:
        recorder.hold([*batch], "activations")
        loss, _, _ = task.forward(batch, model)
        (loss * 0.5).backward()
    real = recorder.peak
    assert (real["grads"], real["activations"]) == (trace.first[8].grads, trace.first[8].activations)
    assert trace.first[8].activations > trace.first[4].activations > 0


def test_fsdp_shards_follow_torch_chunk() -> None:
    """FSDP2 shards dim 0 as torch.chunk does: the first rank holds ceil(rows / n) rows."""
    p = estimate.ParamState((10, 3), 4, 4, (((10, 3), 120), ((), 4)), unit=0)
    count = estimate.StateCount([p])
    assert count.sharded(4) == (3 * 3 * 4, 3 * 3 * 4, 3 * 3 * 4 + 4)  # chunk(10, 4) -> 3, 3, 3, 1; the step is replicated
    assert [len(c) for c in torch.arange(10).chunk(4)] == [3, 3, 3, 1]


# ---- the table's decisions -------------------------------------------------------------------------


def test_every_row_fits_exactly_when_its_peak_does(corpus: Path) -> None:
    s = _strategy(corpus, "optimizer.name=adamw", "batch.size=16", "model.context=64")
    planner = Planner(s, resolve_target("h100-sxm", 2, None))
    first = planner.plan()
    plain = next(r for r in first.rows if r.layout.mode == "ddp" and r.layout.checkpointing == "none")
    # Memory for ddp without checkpointing at micro 2 but not 4: the planner must pick 2 there.
    trace = planner.trace("none")
    at = {m: estimate.footprint(trace, replace(plain.layout, micro=m), 8, planner.runtime(), False).peak for m in (2, 4)}
    assert at[2] < at[4]
    planner.target.memory = (at[2] + at[4]) / 2
    plan = planner.plan()
    for row in plan.rows:
        assert row.fits == (row.footprint.peak <= planner.target.memory), row.layout
    ddp = next(r for r in plan.rows if r.layout.mode == "ddp" and r.layout.checkpointing == "none" and not r.given)
    assert ddp.layout.micro == 2
    assert plan.best is not None and plan.best.fits
    assert plan.best.step.total == min(r.step.total for r in plan.rows if r.fits)
    assert {r.layout.mode for r in plan.rows} == {"ddp", "fsdp"}
    assert any(r.layout.offload for r in plan.rows) and any(r.layout.checkpointing == "selective" for r in plan.rows)


def test_device_table_reads_the_users_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "devices.toml"
    table.write_text(
        "[devices.my-gpu]\nmemory_gib = 48\nbf16_tflops = 180\nfp32_tflops = 45\nmemory_bandwidth_gbs = 960\ninterconnect_gbs = 32\n"
    )
    monkeypatch.setenv("REGIMEN_DEVICES", str(table))
    assert devices.lookup("My-GPU").memory_gib == 48
    assert devices.lookup("h100-sxm").bf16_tflops == 989  # the built-in ones stay
    table.write_text("[devices.h100-sxm]\nmemory_gib = 94\n")  # corrects one figure of a known device
    assert devices.lookup("h100-sxm").memory_gib == 94 and devices.lookup("h100-sxm").bf16_tflops == 989
    table.write_text("[devices.bad]\nmemory_gib = -1\n")
    with pytest.raises(UserError, match=r"\[devices.bad\] takes positive numbers"):
        devices.lookup("bad")


def test_memory_available_reads_meminfo_and_cgroups(tmp_path: Path) -> None:
    assert devices.parse_meminfo("MemTotal: 8 kB\nMemAvailable:  1024 kB\n") == 2**20
    assert devices.parse_meminfo("MemTotal: 8 kB\n") is None
    (tmp_path / "memory.max").write_text("1000\n")
    (tmp_path / "memory.current").write_text("400\n")
    assert devices.cgroup_free(tmp_path) == 600
    (tmp_path / "memory.max").write_text("max\n")  # cgroup v2 without a limit
    assert devices.cgroup_free(tmp_path) is None
    assert 0 < devices.host_memory_available() <= os_total()


def os_total() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---- the command --------------------------------------------------------------------------------------


def test_apply_writes_a_strategy_that_trains(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "planned.toml"
    args = [*SMALL, f"data.source=text:{corpus}", "parallel.activation_checkpointing=block", "batch.micro=auto"]
    planned = run_cli("plan", *args, "--memory", "8", "--apply", str(out))
    assert planned.returncode == 0, planned.stderr
    text = planned.stdout
    assert "layout" in text and "peak" in text and "recommended (*):" in text and f"wrote {out}" in text
    written = Strategy.load(out)
    assert isinstance(written.batch.micro, int) and written.batch.micro >= 1
    trained = run_cli(
        "train", str(out), "train.steps=2", "observe.report=false", "observe.progress=none", "--run-dir", str(tmp_path / "run")
    )
    assert trained.returncode == 0, trained.stderr
    again = run_cli("plan", *args, "--memory", "8", "--apply", str(out))
    assert again.returncode == 2 and "the file exists" in again.stderr  # never replaced


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "h100-sxn"], "--device 'h100-sxn': unknown device (did you mean 'h100-sxm'?)"),
        (["--memory", "-1"], "--memory = '-1': must be a positive number of GiB"),
        (["--memory", "lots"], "--memory = 'lots': must be a positive number of GiB"),
        (["--devices", "0"], "--devices = '0': must be a positive integer"),
        (["--calibrate", "--device", "l4"], "--calibrate runs steps on this machine"),
        (["model.name=tests.untraceable_model:factory"], "cannot be traced"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, corpus: Path) -> None:
    done = run_cli("plan", *SMALL, f"data.source=text:{corpus}", *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regimen: error: ") and message in lines[0], done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_target("cuda", 1, None)


def test_memory_is_split_between_cpu_processes() -> None:
    one, two = resolve_target("cpu", 1, None), resolve_target("cpu", 2, None)
    assert two.memory == pytest.approx(one.memory / 2, rel=0.05)  # the machine's memory changes a little meanwhile
    assert resolve_target("cpu", 2, 3.0).memory == 3 * 2**30
    assert math.isclose(resolve_target("l4", 1, None).memory, 22.0 * 2**30)


def test_calibrate_measures_here_and_says_so(corpus: Path) -> None:
    """--calibrate runs real steps of the recommended layout and replaces the rest with what it measured."""
    done = run_cli("plan", *SMALL, f"data.source=text:{corpus}", "--device", "cpu", "--calibrate")
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stdout.splitlines() if line.startswith("- ")]
    assert notes[0].startswith("- calibrated, one rank alone here (none, ") and "8 samples, micro 8): step measured " in notes[0]
    assert "tensors' peak measured" in notes[0] and "(measured by --calibrate)" in done.stdout


def test_calibrate_trains_each_parallel_mode_with_its_processes(corpus: Path) -> None:
    """With 2 devices, ddp and fsdp are each trained by 2 processes here; the row each ran shows the measured step."""
    done = run_cli("plan", *SMALL, f"data.source=text:{corpus}", "--device", "cpu", "--devices", "2", "--calibrate")
    assert done.returncode == 0, done.stderr
    rows = {line[2:].split("  ")[0].removesuffix(" (given)").strip(): line for line in done.stdout.splitlines() if " x2" in line[:40]}
    measured = re.findall(r"- calibrated, (\S+ x2[^(]*) trained by 2 processes here \(micro \d+\): step measured (\S+) s", done.stdout)
    assert sorted(m for m, _ in measured) == ["ddp x2", "fsdp x2"], done.stdout
    for label, seconds in measured:
        shown = re.search(r"yes\s+(\S+) ms", rows[label.strip()])  # the table's step column, in ms
        assert shown is not None, rows[label.strip()]
        assert abs(float(shown.group(1)) - float(seconds) * 1e3) <= 0.5 + 1e-9, (label, seconds, shown.group(1))


def test_cpu_ops_are_timed_with_cold_operands_and_outputs_out_of_cache() -> None:
    """Each timed call of a CPU op reads its own copy of the cold operands, shares the hot ones, and writes where no recent call wrote."""
    from regimen.trace import OpKey, TensorSpec

    read_cold, read_hot, written = [], [], []

    def op(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        read_cold.append(x.data_ptr())
        read_hot.append(y.data_ptr())
        out = x + y
        written.append(out.data_ptr())
        return out

    nbytes = 8 * 2**20  # each operand, and the output
    spec = TensorSpec((nbytes // 4,), (1,), torch.float32)
    key = OpKey(op, (spec, replace(spec, hot=True)), ())
    assert devices._time_op(key, torch.device("cpu"), lambda: None) > 0
    copies = devices.COLD_BYTES // (2 * nbytes)  # the cold operand and the output take turns
    assert devices._cold_copies(2 * nbytes, torch.device("cpu")) == copies > 1
    assert len(set(read_cold)) == copies  # every copy of the cold operand read in turn
    assert len(set(read_hot)) == 1  # the hot one is the same tensor in every call, as in the step
    assert len(set(written[-copies:])) == copies  # a turn's outputs are held: each call writes other memory
    assert devices._cold_copies(2 * nbytes, torch.device("meta")) == 1  # an accelerator's op is timed as before


def test_an_operand_written_just_before_is_traced_hot_and_an_old_one_cold() -> None:
    """`TensorSpec.hot`: what the step touched less than HOT_BYTES ago (a forward op's input), not what it touched long before."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from regimen.trace import HOT_BYTES

    with FakeTensorMode():
        x, w, big = torch.ones(256, 256), torch.ones(256, 256), torch.ones(HOT_BYTES // 4)
        with Recorder() as r:
            a = x.relu()
            a @ w  # a: just written; w: never touched in the recorded step
            big.neg()  # reads and writes 2 x HOT_BYTES
            a @ w  # a: touched before all of that traffic
    keys = list(r.tally.compute)
    assert [tuple(s.hot for s in k.args) for k in keys] == [(True, False), (False, False)]
    assert r.tally.compute[keys[0]] == r.tally.compute[keys[1]] == 1  # the same shapes, timed apart


def test_large_ops_are_timed_alone_and_small_ones_priced_by_bandwidth() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from regimen.trace import TIMED_BYTES, OpKey, TensorSpec

    big_n = TIMED_BYTES // 4  # float32 elements: the input alone is TIMED_BYTES
    with FakeTensorMode():
        x, y, small = torch.ones(big_n), torch.ones(big_n), torch.ones(16)
        with Recorder() as r:
            torch.nn.functional.gelu(x)  # reads and writes 2 x TIMED_BYTES: kept by kind
            torch.nn.functional.gelu(y)  # the same kind again (an operand as cold): counted twice, one key
            small.exp()  # 64 + 64 bytes
    tally = r.tally
    (key,) = tally.large
    assert key.op is torch.ops.aten.gelu.default and tally.large[key] == 2
    assert tally.bytes_of[key] == 2 * TIMED_BYTES
    assert tally.memory_bytes == 128  # the small op, by bytes

    # An op random data cannot drive (mismatched matmul shapes) is left to the bandwidth's price.
    broken = OpKey(torch.ops.aten.mm.default, (TensorSpec((3, 4), (4, 1), torch.float32), TensorSpec((5, 6), (6, 1), torch.float32)), ())
    # One too large to run here (a zeros() of 1 GiB has no operands) is not run either.
    huge = OpKey(torch.ops.aten.zeros.default, ((2**28,),), (("device", torch.device("cpu")), ("dtype", torch.float32)))
    other = [(key, tally.bytes_of[key]), (broken, 0.0), (huge, 2.0**30)]
    speed = devices.measure(torch.device("cpu"), 1, [], 0.0, max_bytes=2**26, other_ops=other)
    assert set(speed.op_seconds) == {key} and speed.op_seconds[key] > 0

    # The phase's time: the timed op's own seconds, the rest at the bandwidth, plus dispatch per op.
    timed = replace(speed, op_seconds={key: 0.25}, overhead_s=0.0, module_call_s=0.0, bandwidth=1e6)
    assert estimate.phase_seconds(tally, timed, host_is_device=True) == pytest.approx(2 * 0.25 + tally.memory_bytes / 1e6)
    untimed = replace(timed, op_seconds={})
    assert estimate.phase_seconds(tally, untimed, True) == pytest.approx((2 * 2 * TIMED_BYTES + tally.memory_bytes) / 1e6)


def test_speed_times_every_alternatives_ops_whoever_asks_first(corpus: Path) -> None:
    # The benchmark asked for the speed before any row was traced: nothing was timed and every
    # matmul fell back to one throughput (a step predicted at about half the measured one).
    p = Planner(_strategy(corpus, "parallel.activation_checkpointing=block"), resolve_target("cpu", 1, 1024.0))
    speed = p.speed()
    assert {"none", "block", "selective"} <= set(p.traces)
    for trace in p.traces.values():
        for phase in [*trace.first.values(), *trace.later.values(), trace.update]:
            assert set(phase.tally.flops_of) <= set(speed.op_seconds)


def test_communication_pays_each_collectives_latency() -> None:
    """With timed collectives a step pays one latency per call: DDP per bucket; FSDP2 per unit,
    blocks gathered for the forward and again for the backward in every micro-batch, the root
    once per micro-batch, every unit's gradients reduce-scattered once."""
    latency = devices.Collective
    free = 1e30  # bytes/s: only the latencies count
    speed = devices.Speed(0.0, 1e9, 1e9, 1e9, 1e9, True)
    speed.collectives = {
        "all_reduce": latency(1.0, free),
        "all_gather": latency(10.0, free),
        "reduce_scatter": latency(100.0, free),
    }
    blocks, k = 3, 2
    params = [estimate.ParamState((64, 64), 4, 4, (), unit=u) for u in range(blocks) for _ in range(2)]
    params.append(estimate.ParamState((100, 64), 4, 4, (), unit=-1))
    st = estimate.StateCount(params)
    assert estimate.fsdp_communication(st, 2, k, speed, fsdp_bf16=False) == pytest.approx(
        10.0 * k * (2 * blocks + 1) + 100.0 * (blocks + 1)
    )
    # Muon's matrices are gathered whole once more per step, for Newton-Schulz.
    muon = estimate.StateCount([replace(p, whole_update=p.unit >= 0) for p in params])
    assert estimate.fsdp_communication(muon, 2, k, speed, fsdp_bf16=False) == pytest.approx(
        10.0 * (k * (2 * blocks + 1) + 2 * blocks) + 100.0 * (blocks + 1)
    )
    grad_bytes = 60 * 2**20  # buckets of 1, 25, 25 and 9 MiB
    assert estimate.ddp_communication(grad_bytes, 2, speed) == pytest.approx(4 * 1.0)
    # The step's host sync: one small all-reduce, and one more for FSDP2's sharded norm.
    assert [estimate.sync_communication(m, 2, speed) for m in ("ddp", "fsdp")] == pytest.approx([1.0, 2.0])
    assert estimate.sync_communication("none", 1, speed) == 0.0
    # Untimed (an accelerator that is not here): the bytes at the link's bandwidth, no latency.
    speed.collectives = {}
    assert estimate.ddp_communication(grad_bytes, 2, speed) == pytest.approx(grad_bytes / 1e9)
    gathered = (2 * blocks * 2 * 64 * 64 * 4 + 100 * 64 * 4) * k
    assert estimate.fsdp_communication(st, 2, k, speed, fsdp_bf16=False) == pytest.approx((gathered + st.grad_bytes) / 2 / 1e9)


def test_fsdp_own_work_is_its_copies_at_the_bandwidth_and_its_hooks_per_unit_and_parameter() -> None:
    """Each gather copies a rank's shard in and the gathered unit out (a block twice a micro-batch,
    the root once); the gradients are copied into the reduce-scatter and its shard out once a step;
    a copy reads and writes. The hooks cost a unit's and a parameter's host time every micro-batch."""
    blocks, k, n = 3, 2, 2
    params = [estimate.ParamState((64, 64), 4, 4, (), unit=u) for u in range(blocks) for _ in range(2)]
    params.append(estimate.ParamState((100, 64), 4, 4, (), unit=-1))
    st = estimate.StateCount(params)
    block, root = 2 * 64 * 64 * 4, 100 * 64 * 4
    gathered = k * (2 * blocks * block + root)
    assert estimate.fsdp_copy_bytes(st, n, k, fsdp_bf16=False) == pytest.approx(2 * (gathered + st.grad_bytes) * (1 + 1 / n))
    speed = devices.Speed(0.0, 1e9, 1e9, 1e9, 1e9, True)
    assert estimate.fsdp_hook_seconds(st, speed) == 0.0  # unmeasured
    speed.fsdp = devices.FSDPCost(unit_s=1.0, param_s=0.01, dtensor_op_s=0.0)
    assert estimate.fsdp_hook_seconds(st, speed) == pytest.approx((blocks + 1) * 1.0 + len(params) * 0.01)
    # A root holding no parameter is a unit all the same.
    only_blocks = estimate.StateCount(params[:-1])
    assert estimate.fsdp_hook_seconds(only_blocks, speed) == pytest.approx((blocks + 1) * 1.0 + (len(params) - 1) * 0.01)


def test_an_fsdp_rank_dispatches_every_update_op_through_dtensor_and_computes_its_shard(corpus: Path) -> None:
    p = Planner(_strategy(corpus, "optimizer.name=adamw"), resolve_target("cpu", 2, 1024.0))
    trace = p.trace("none")
    layout = estimate.Layout("fsdp", 2, "none", False, p.share)
    speed = devices.Speed(1e-5, 1e9, 1e12, 1e9, 1e9, True)
    update = trace.update.tally
    assert update.ops > 0
    whole = estimate.phase_seconds(update, speed, True)
    dispatch = update.ops * speed.overhead_s
    # Half of the update's arithmetic (a rank's shards), all of its dispatch.
    assert estimate.phase_seconds(update, speed, True, device_share=0.5) == pytest.approx(dispatch + (whole - dispatch) / 2)
    # On an accelerator dispatch overlaps the arithmetic: the longer of the two.
    assert estimate.phase_seconds(update, speed, False, 0.5, 3.0) == pytest.approx(max((whole - dispatch) / 2, dispatch + 3.0))
    base = p.step(layout, p.share, speed)
    copies = estimate.fsdp_copy_bytes(trace.state, 2, 1, fsdp_bf16=False) / speed.bandwidth
    assert base.communication == pytest.approx(estimate.fsdp_communication(trace.state, 2, 1, speed, False) + copies)
    speed.fsdp = devices.FSDPCost(unit_s=0.0, param_s=0.0, dtensor_op_s=1.0)
    assert p.step(layout, p.share, speed).total - base.total == pytest.approx(update.ops * 1.0)
    # The hooks are host time of each micro-batch: added to its compute on a CPU, once per micro-batch.
    speed.fsdp = devices.FSDPCost(unit_s=1.0, param_s=0.0, dtensor_op_s=0.0)
    units = len(trace.state.per_unit(lambda _: 1) | {-1: 0})
    with_hooks = p.step(layout, p.share, speed)
    assert with_hooks.communication == pytest.approx(base.communication)
    assert with_hooks.compute - base.compute == pytest.approx(units * 1.0)
    two_micro = replace(layout, micro=max(1, p.share // 2))
    k = math.ceil(p.share / two_micro.micro)
    speed.fsdp = None
    plain_two = p.step(two_micro, p.share, speed)
    speed.fsdp = devices.FSDPCost(unit_s=1.0, param_s=0.0, dtensor_op_s=0.0)
    assert p.step(two_micro, p.share, speed).compute - plain_two.compute == pytest.approx(k * units * 1.0)
    # On an accelerator the hooks overlap the device's work: under a slow device's arithmetic they cost nothing.
    slow = replace(speed, flops_per_s=1e6, fsdp=None)
    hooked = replace(slow, fsdp=devices.FSDPCost(unit_s=1e-3, param_s=0.0, dtensor_op_s=0.0))
    on_accelerator = [estimate.step_time(trace, layout, p.share, sp, host_is_device=False).compute for sp in (slow, hooked)]
    assert on_accelerator[1] == pytest.approx(on_accelerator[0])
    on_cpu = [estimate.step_time(trace, layout, p.share, sp, host_is_device=True).compute for sp in (slow, hooked)]
    assert on_cpu[1] - on_cpu[0] == pytest.approx(units * 1e-3)


def test_fsdp_hooks_are_timed_in_a_one_rank_group_that_is_then_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    cost = devices.fsdp_overhead()
    assert cost is not None and not dist.is_initialized()
    # The hooks and DTensor's dispatch cost host time on any machine (about 0.3 ms a unit and
    # 9 us an op here, against a plain step of 1.4 ms): measured, not zero, not absurd.
    assert 0.0 < cost.unit_s + cost.param_s < 0.1 and 0.0 < cost.dtensor_op_s < 0.01
    # A process already in a group (a rank of a job) is left as it is: unmeasured.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert devices.fsdp_overhead() is None
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()

    # Where no gloo group can be made (a sandbox without sockets), unmeasured rather than failed.
    def refused(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no sockets here")

    monkeypatch.setattr(dist, "init_process_group", refused)
    assert devices.fsdp_overhead() is None


def test_ops_are_timed_on_values_a_step_computes_them_on() -> None:
    """sqrt and log of a negative number take the CPU's NaN path (30x slower here): the timed
    operands are finite and positive, as Adam's second moment and a softmax's sums are."""
    from regimen.trace import OpKey, TensorSpec

    spec = TensorSpec((64, 32), (32, 1), torch.float32, False)
    for op in (torch.ops.aten.sqrt.default, torch.ops.aten.log.default):
        args, _ = devices._materialize(OpKey(op, (spec, (spec, spec)), ()), torch.device("cpu"))
        operands = [args[0], *args[1]]
        assert all(t.shape == (64, 32) and bool((t > 0).all()) for t in operands)
        assert bool(op(args[0]).isfinite().all())
    index = TensorSpec((8,), (1,), torch.int64, False)
    (indices,), _ = devices._materialize(OpKey(torch.ops.aten.embedding.default, (index,), ()), torch.device("cpu"))
    assert indices.tolist() == [0] * 8  # a valid index into any table


def test_collectives_are_timed_among_threads_of_this_process() -> None:
    timed = devices.measure_collectives(2, repeats=2)
    assert sorted(timed) == ["all_gather", "all_reduce", "reduce_scatter"]
    for c in timed.values():
        assert c.latency_s >= 0.0 and 0.0 < c.bytes_per_s < math.inf


class _FakeDist:
    def __init__(self, others_want: int) -> None:
        self.others_want = others_want  # the step count the other ranks asked for

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return torch.minimum(t, torch.tensor([float(self.others_want)]))


class _SleepingTrainer:
    def __init__(self, step_s: float, others_want: int = 10**6) -> None:
        self.dist, self.step_s, self.steps = _FakeDist(others_want), step_s, 0
        self.device = torch.device("cpu")

    def train_step(self) -> None:
        time.sleep(self.step_s)
        self.steps += 1


def test_calibration_times_at_least_its_steps_and_about_its_seconds_the_same_count_on_every_rank() -> None:
    t = _SleepingTrainer(0.01)
    times = calibrate.timed_steps(t, steps=3, seconds=0.1)  # type: ignore[arg-type]
    assert len(times) == t.steps == max(3, math.ceil(0.1 / times[0]))  # from the first step's time
    assert 3 <= len(times) <= 10 and min(times) >= 0.01
    assert len(calibrate.timed_steps(_SleepingTrainer(0.01), steps=5, seconds=0.0)) == 5  # type: ignore[arg-type]
    assert len(calibrate.timed_steps(_SleepingTrainer(0.0), steps=2, seconds=100.0)) == calibrate.MAX_STEPS  # type: ignore[arg-type]
    # Another rank asks for fewer: every rank runs the smallest count (each step ends in a collective).
    assert len(calibrate.timed_steps(_SleepingTrainer(0.01, others_want=4), steps=3, seconds=1.0)) == 4  # type: ignore[arg-type]


def test_a_collective_is_timed_by_its_mean_call_what_a_step_of_many_calls_pays_without_a_lone_stall() -> None:
    # Every run of calls: two of 1 ms and one of 30 ms. A step of many such calls pays their mean
    # (>= 10.7 ms, sleeps only overrun), where the median (~1 ms) would miss the slow mode.
    slow_mode = [0.001, 0.001, 0.03] * devices.PASSES
    # And one stall of the host in one run: the mean of all calls would carry it (>= 42 ms).
    stall = [*slow_mode[:-1], 0.5]

    for delays in (slow_mode, stall):

        class Group:
            def __init__(self) -> None:
                self.calls = 0

            def _allgather_base(self, out: torch.Tensor, shard: torch.Tensor, delays: list[float] = delays) -> Group:
                time.sleep(([0.0, *delays])[self.calls])  # the first call sets gloo up, untimed
                self.calls += 1
                return self

            def wait(self) -> None:
                pass

        groups = [Group(), Group()]
        seconds = devices._time_collective(groups, "all_gather", 4096, repeats=len(delays))
        assert all(g.calls == len(delays) + 1 for g in groups)
        assert sum(slow_mode[:3]) / 3 <= seconds < 0.02


def test_muons_matrices_are_counted_as_whole_matrix_updates(corpus: Path) -> None:
    from regimen.optim.muon import Muon

    s = _strategy(corpus, "optimizer.name=muon")
    task = build_task(s)
    optimizer = build_optimizer(task.model, s.optimizer)
    inner = next(o for o in optimizer.optimizers if isinstance(o, Muon))  # type: ignore[attr-defined]
    hidden = {tuple(p.shape) for g in inner.param_groups for p in g["params"]}
    st = estimate.count_state(task.model, optimizer)
    assert {p.shape for p in st.params if p.whole_update} == hidden
    assert any(not p.whole_update for p in st.params)  # embeddings, norms: AdamW
    adamw = build_optimizer(task.model, _strategy(corpus).optimizer)
    assert not any(p.whole_update for p in estimate.count_state(task.model, adamw).params)


def test_two_cpu_processes_time_gloo_or_say_why_not(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = Planner(_strategy(corpus), resolve_target("cpu", 2, 1024.0))
    speed = p.speed()
    assert sorted(speed.collectives) == ["all_gather", "all_reduce", "reduce_scatter"]
    assert any("gloo's all_reduce" in note for note in p.notes(speed))

    def refused(*_: object, **__: object) -> None:
        raise RuntimeError("connection refused")

    monkeypatch.setattr(devices, "measure_collectives", refused)
    p = Planner(_strategy(corpus), resolve_target("cpu", 2, 1024.0))
    speed = p.speed()
    assert speed.collectives == {}
    assert any("loopback (connection refused)" in note for note in p.notes(speed))
    assert all(row.step.communication > 0 for row in p.plan().rows)
