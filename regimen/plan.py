"""`regimen plan`: will a strategy fit, how long will it take, and what to change.

```
regimen plan [CONFIG.toml] [section.key=value ...] [--devices N] [--device cpu|cuda|NAME]
             [--memory GiB] [--calibrate] [--apply OUT.toml]
```

For the strategy as given and for the alternatives that matter (parallel mode over N devices,
activation checkpointing, CPU offload, each with the largest micro-batch that fits), a table of
the peak memory of one device split into parameters, gradients, optimizer state, activations
and the rest, whether it fits, the time of a step, tokens/s and the time of the whole budget.
Then the recommendation: the fastest layout that fits; `--apply OUT.toml` writes it as a
strategy file that `regimen train` runs. The model is `regimen.estimate`'s (docs/plan.md):
state counted exactly, activations traced on fake tensors, time from this machine's measured
speed (or a datasheet's, for a named accelerator that is not here). `--calibrate` runs a few
real steps here and corrects both models with what it measured.

Example:
    $ regimen plan                                    # the default task on this machine
    $ regimen plan big.toml --devices 8 --device h100-sxm
    $ regimen plan big.toml --memory 2 --apply fits.toml && regimen train fits.toml
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regimen import devices, estimate
from regimen.devices import Accelerator
from regimen.errors import UserError
from regimen.micro import GiB, allocator_fraction, resident_bytes
from regimen.registry import OPTIMIZERS
from regimen.strategy import Strategy

# What an accelerator holds outside torch's allocator: the CUDA context and library
# workspaces (cuBLAS, cuDNN). A prediction; `--calibrate` on the device measures it.
CUDA_CONTEXT_BYTES = 0.5 * GiB
# Optimizers FSDP2's DTensor shards cannot step (the registry's `fsdp = False`): ddp only.
FSDP_UNSUPPORTED = frozenset(e.name for e in OPTIMIZERS.entries() if not e.meta.get("fsdp", True))


@dataclass
class Target:
    """The devices planned for: what they are, their memory, their speed, and whether measured here."""

    name: str
    devices: int
    memory: float  # bytes per device
    memory_source: str
    host_is_device: bool  # a CPU: no host/device split (offload moves nothing)
    here: bool  # this machine's own device: speed measured, --calibrate possible
    torch_device: torch.device
    accelerator: Accelerator | None = None


@dataclass
class Row:
    """One line of the plan."""

    layout: estimate.Layout
    footprint: estimate.Footprint
    fits: bool
    step: estimate.StepTime
    tokens_per_s: float
    budget_s: float
    given: bool = False


@dataclass
class Plan:
    """The table, its recommendation, and what the figures rest on."""

    rows: list[Row]
    best: Row | None
    target: Target
    notes: list[str]
    strategy: Strategy
    tokens_per_sample: int
    max_batch: int


# ---- the command ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`regimen plan ...` (see the module docstring); prints the plan, writes `--apply`'s file."""
    strategy = Strategy.from_cli(args.config, args.overrides).resolve()
    if args.apply is not None and Path(args.apply).exists():
        raise UserError(f"--apply {args.apply!r}: the file exists; name a new file (nothing was written)")
    n = parse_devices(args.devices)
    memory = devices.parse_memory_gib(args.memory) if args.memory is not None else None
    target = resolve_target(args.device, n, memory)
    if args.calibrate and not target.here:
        raise UserError(f"--calibrate runs steps on this machine: it cannot measure --device {args.device!r}; use --device cpu or cuda")
    planner = Planner(strategy, target)
    plan = planner.plan()
    if args.calibrate:
        plan = planner.calibrate(plan)
    print(render(plan))
    if args.apply is not None:
        if plan.best is None:
            raise UserError("--apply: no layout fits, so nothing was written; see the table for what each needs")
        path = write_strategy(plan.best.layout.applied_to(strategy), Path(args.apply))
        nproc = f" --nproc {n}" if n > 1 else ""
        print(f"\nwrote {path}: regimen train {path}{nproc}")
    return 0


def parse_devices(text: str | None) -> int:
    """`--devices N`: a positive integer (default 1)."""
    if text is None:
        return 1
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--devices = {text!r}: must be a positive integer (the number of devices, or of processes on a CPU)")
    return n


def resolve_target(name: str | None, n: int, memory_gib: float | None) -> Target:
    """The devices `--device` names: this machine's CPU or GPU, or a known accelerator."""
    name = (name or ("cuda" if torch.cuda.is_available() else "cpu")).lower()
    if name == "cpu":
        free = devices.host_memory_available() / n  # processes of one machine share its memory
        source = "available here" + (f", 1/{n} each" if n > 1 else "")
        memory, src = (memory_gib * GiB, "--memory") if memory_gib is not None else (free, source)
        return Target("cpu", n, memory, src, True, True, torch.device("cpu"))
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: this machine has no CUDA device; name the accelerator instead (e.g. --device h100-sxm)")
        dev = torch.device("cuda", 0)
        memory, src = (memory_gib * GiB, "--memory") if memory_gib is not None else (torch.cuda.mem_get_info(dev)[0], "free here")
        return Target(torch.cuda.get_device_name(dev), n, memory, src, False, True, dev)
    acc = devices.lookup(name)
    memory, src = (memory_gib * GiB, "--memory") if memory_gib is not None else (acc.memory_gib * GiB, "datasheet")
    return Target(acc.name, n, memory, src, False, False, torch.device("cpu"), acc)


# ---- the planner --------------------------------------------------------------------------------


class Planner:
    """Traces a strategy once per checkpointing policy, then prices every layout from the traces."""

    def __init__(self, strategy: Strategy, target: Target) -> None:
        from regimen.data import load_source
        from regimen.task import Task, cross_entropy

        self.strategy = s = strategy
        self.target = target
        self.data = load_source(s.data, s.model.context)
        self.baseline = resident_bytes()  # Python, torch and the data: what a training process holds first
        self.model_kind = self._probe()
        # The trace passes its own fake model to `Task.forward`; the task's module is never run.
        self.task = Task(nn.Module(), self.data, loss=cross_entropy)
        self.n = target.devices
        self.share = max(1, math.ceil(estimate.largest_batch(s.batch, len(self.data.train)) / self.n))
        self.traces: dict[str, estimate.PolicyTrace] = {}
        self.time_scale = 1.0  # measured / predicted compute of one rank (`calibrate`)
        self.mode_scale: dict[str, float] = {}  # measured / predicted step of a parallel mode's N processes (`calibrate`)
        self.calibrated: dict[str, Any] = {}
        self._speed: devices.Speed | None = None
        self._untimed_collectives = ""  # why gloo's collectives could not be timed here, if they could not

    def make_model(self, mode: Any) -> nn.Module:
        """The strategy's model built directly as fake tensors (no memory, whatever its size)."""
        from regimen.models import build_model

        s, d = self.strategy, self.data
        torch.manual_seed(s.train.seed)
        try:
            with mode:
                return build_model(s.model, vocab_size=d.vocab_size, num_features=d.num_features, num_classes=d.num_classes)
        except UserError:
            raise
        except Exception as e:  # a factory that reads files or data cannot run on fake tensors
            raise UserError(f"model.name = {s.model.name!r}: cannot be traced on fake tensors ({type(e).__name__}: {e})") from None

    def _probe(self) -> dict[str, bool]:
        from regimen.trace import fake_mode

        model = self.make_model(fake_mode())
        blocks = isinstance(getattr(model, "blocks", None), nn.ModuleList)
        return {"blocks": blocks, "checkpointable": blocks or bool(self.strategy.parallel.checkpoint_modules)}

    def trace(self, policy: str) -> estimate.PolicyTrace:
        if policy not in self.traces:
            try:
                self.traces[policy] = estimate.trace_policy(
                    self.make_model, self.task, self.strategy, policy, estimate.traced_sizes(self.share)
                )
            except UserError:
                raise
            except Exception as e:
                raise UserError(
                    f"model.name = {self.strategy.model.name!r}: its training step cannot be traced ({type(e).__name__}: {e})"
                ) from None
        return self.traces[policy]

    # ---- the alternatives ----------------------------------------------------------------

    def given_layout(self) -> estimate.Layout:
        p = self.strategy.parallel
        mode = p.mode if p.mode != "auto" else ("ddp" if self.n > 1 else "none")
        if self.n == 1:
            mode = "none"
        offload = p.cpu_offload and mode == "fsdp"
        micro = self.strategy.batch.micro
        return estimate.Layout(mode, self.n, p.activation_checkpointing, offload, micro if isinstance(micro, int) else self.share)

    def layouts(self) -> list[tuple[str, str, bool]]:
        """(mode, checkpointing, offload) for every alternative worth a row."""
        policies = ["none", "block", "selective"] if self.model_kind["checkpointable"] else ["none"]
        modes = ["none"] if self.n == 1 else ["ddp"]
        if self.n > 1 and self.model_kind["blocks"] and self.strategy.optimizer.name not in FSDP_UNSUPPORTED:
            modes.append("fsdp")
        return [(mode, pol, off) for mode in modes for pol in policies for off in ([False, True] if mode == "fsdp" else [False])]

    def _offers_fsdp(self) -> bool:
        return any(mode == "fsdp" for mode, _, _ in self.layouts())

    def runtime(self) -> estimate.Runtime:
        if self.calibrated.get("runtime") is not None:
            return self.calibrated["runtime"]
        if self.target.host_is_device:
            return estimate.Runtime(self.baseline, allocator_fraction("cpu"), "the process (Python, torch, data) and glibc's heap")
        return estimate.Runtime(CUDA_CONTEXT_BYTES, allocator_fraction("cuda"), "the CUDA context and the caching allocator")

    def threads(self) -> int:
        """torch threads of one rank: a CPU's are shared by the processes on it."""
        return max(1, torch.get_num_threads() // self.n) if self.target.host_is_device else torch.get_num_threads()

    def step(self, layout: estimate.Layout, share: float, speed: devices.Speed | None = None) -> estimate.StepTime:
        """Predicted seconds of a step with `share` samples per rank, with what `calibrate` measured."""
        trace = self.trace(layout.checkpointing)
        bf16 = self.strategy.parallel.fsdp_bf16
        st = estimate.step_time(trace, layout, share, speed or self.speed(), self.target.host_is_device, bf16, self.time_scale)
        f = self.mode_scale.get(layout.mode, 1.0) if layout.devices > 1 else 1.0
        return estimate.StepTime(st.compute * f, st.communication * f)

    def row(self, layout: estimate.Layout, speed: devices.Speed, steps: float, mean_batch: float, given: bool = False) -> Row:
        trace = self.trace(layout.checkpointing)
        bf16 = self.strategy.parallel.fsdp_bf16
        fp = estimate.footprint(trace, layout, self.share, self.runtime(), self.target.host_is_device, bf16)
        st = self.step(layout, mean_batch / self.n, speed)
        tokens = mean_batch * self.data.tokens_per_sample / st.total
        return Row(layout, fp, estimate.fits(fp, self.target.memory), st, tokens, steps * st.total, given)

    def plan(self) -> Plan:
        """Every alternative's row, and the fastest that fits."""
        s = self.strategy
        given = self.given_layout()
        speed = self.speed()
        steps, mean_batch = self.budget()
        if s.batch.micro == "auto":
            given = self._largest(given) or replace(given, micro=1)
        rows = [self.row(given, speed, steps, mean_batch, given=True)]
        for mode, pol, off in self.layouts():
            layout = self._largest(estimate.Layout(mode, self.n, pol, off, 1)) or estimate.Layout(mode, self.n, pol, off, 1)
            if layout != given:
                rows.append(self.row(layout, speed, steps, mean_batch))
        fitting = [r for r in rows if r.fits]
        best = min(fitting, key=lambda r: (r.step.total, r.footprint.peak)) if fitting else None
        max_batch = estimate.largest_batch(s.batch, len(self.data.train))
        return Plan(rows, best, self.target, self.notes(speed), s, self.data.tokens_per_sample, max_batch)

    def _largest(self, layout: estimate.Layout) -> estimate.Layout | None:
        trace = self.trace(layout.checkpointing)
        choice = estimate.largest_fitting(
            trace, layout, self.strategy.batch, self.share, self.target.memory, self.runtime(), self.target.host_is_device, 0.0
        )
        return replace(layout, micro=choice.micro) if choice.micro is not None else None

    def budget(self) -> tuple[float, float]:
        """(steps of the budget, mean global batch in samples)."""
        from regimen.progress import Progress
        from regimen.schedules import build_batch_schedule, simulate_budget

        s = self.strategy
        schedule = build_batch_schedule(s.batch, seed=s.train.seed, multiple=self.n, dataset_size=len(self.data.train))
        unit, amount = s.train.budget()
        if unit == "epochs":
            unit, amount = "samples", amount * len(self.data.train)
        try:
            steps = simulate_budget(schedule, unit, amount, "steps", self.data.tokens_per_sample)  # type: ignore[arg-type]
            samples = simulate_budget(schedule, unit, amount, "samples", self.data.tokens_per_sample)  # type: ignore[arg-type]
        except UserError:  # adaptive: the batch follows measurements; its starting size stands in
            b = schedule(Progress())
            steps = amount if unit == "steps" else math.ceil(amount / (b * (self.data.tokens_per_sample if unit == "tokens" else 1)))
            samples = steps * b
        return steps, samples / max(steps, 1)

    def speed(self) -> devices.Speed:
        """This machine's measured speed on the target device, or the named accelerator's datasheet (once).

        Every alternative is traced first: the measurement times the ops the traces hold, and an op
        traced after it would fall back to the matmul throughput (a step priced at that alone
        was about half the measured one).
        """
        if self._speed is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _, pol, _ in self.layouts():
                    self.trace(pol)
                self.trace(self.given_layout().checkpointing)
            self._speed = self._measure_speed()
            if self._offers_fsdp():
                # FSDP2's hooks run on this host whatever the device; timed with a rank's threads.
                with devices.torch_threads(self.threads()):
                    self._speed.fsdp = devices.fsdp_overhead()
        return self._speed

    def _measure_speed(self) -> devices.Speed:
        t = self.target
        if t.here:
            keys: dict[Any, float] = {}
            large: dict[Any, float] = {}  # op -> the bytes it moves
            for trace in self.traces.values():
                for phase in [*trace.first.values(), *trace.later.values(), trace.update]:
                    keys.update(phase.tally.flops_of)
                    large.update({k: phase.tally.bytes_of[k] for k in phase.tally.large})
            threads = self.threads()
            link = devices.loopback_bandwidth() if t.host_is_device else 0.0
            speed = devices.measure(t.torch_device, threads, list(keys.items()), link, max_bytes=64 * 2**20, other_ops=list(large.items()))
            if t.host_is_device and t.devices > 1 and torch.distributed.is_available() and torch.distributed.is_gloo_available():
                # CPU processes of this host talk through gloo: its collectives are timed, latency included
                # (where loopback connections fail, the bytes keep the link's bandwidth, and the notes say so).
                try:
                    speed.collectives = devices.measure_collectives(t.devices, threads)
                except RuntimeError as e:
                    self._untimed_collectives = str(e)
            if not t.host_is_device:
                speed.link = speed.host_link = 25e9  # a GPU's link cannot be measured alone: PCIe 4.0 stands in
            return speed
        assert t.accelerator is not None
        overhead, module_call = devices.dispatch_overhead()
        return devices.from_datasheet(t.accelerator, self.strategy.train.precision == "bf16", overhead, module_call)

    def notes(self, speed: devices.Speed) -> list[str]:
        t = self.target
        if t.here:
            how = (
                f"step time: each matmul, attention and other op moving over 1 MiB timed here at its shapes and in the step's cache state "
                f"({len(speed.op_seconds)} timed), smaller ops at {speed.bandwidth / 1e9:.1f} GB/s plus "
                f"{speed.overhead_s * 1e6:.1f} us each"
            )
            if self._untimed_collectives:
                how += f"; communication at {speed.link / 1e9:.2f} GB/s loopback ({self._untimed_collectives})"
            if speed.collectives:
                how += (
                    "; communication: gloo's "
                    + ", ".join(
                        f"{kind} {c.latency_s * 1e3:.2f} ms + {c.bytes_per_s / 1e9:.2f} GB/s" for kind, c in speed.collectives.items()
                    )
                    + f" among {t.devices} ranks, timed here beside their compute"
                )
        else:
            how = (
                f"step time: predicted from the datasheet ({devices.MATMUL_EFFICIENCY:.0%} of peak FLOP/s for matmuls, "
                f"{devices.BANDWIDTH_EFFICIENCY:.0%} of memory bandwidth), unmeasured"
            )
        if speed.fsdp is not None:
            f = speed.fsdp
            how += (
                f"; FSDP2's own work: its copies at the memory bandwidth, hooks {f.unit_s * 1e3:.2f} ms a unit + "
                f"{f.param_s * 1e6:.0f} us a parameter a micro-batch, {f.dtensor_op_s * 1e6:.1f} us more an update op (DTensor), timed here"
            )
        elif self._offers_fsdp():
            how += "; FSDP2's hooks unmeasured (no one-rank gloo group could be made in this process): its copies alone priced"
        rt = self.runtime()
        notes = [
            "params, grads and optim are counted exactly from the real tensors' shapes; activations (with the backward's and "
            "the optimizer's temporaries) are traced on fake tensors; all per device, at the step's peak",
            f"rest: communication buffers (DDP's gradient buckets, FSDP's gathered blocks) and {rt.what}"
            + (f" ({rt.fixed / GiB:.2f} GiB + {rt.fraction:.0%} of the peak)" if not self.calibrated else " (measured by --calibrate)"),
            how,
            f"memory per device: {t.memory / GiB:.2f} GiB ({t.memory_source})",
        ]
        if t.host_is_device and any(r[2] for r in self.layouts()):
            notes.append("CPU offload on a CPU device keeps everything where it already is: same memory, same time")
        if self.n > 1 and self.strategy.optimizer.name in FSDP_UNSUPPORTED:
            notes.append(
                f"fsdp is not offered: {self.strategy.optimizer.name} cannot step FSDP2's DTensor shards (it reads norms on the host)"
            )
        return notes

    # ---- calibration ---------------------------------------------------------------------

    def calibrate(self, plan: Plan) -> Plan:
        """Measure here, correct the models, re-plan (`regimen.calibrate`).

        One rank's work alone (the recommended layout, else the given one) scales every row's
        compute and replaces the predicted rest of memory with the measured one. With several
        devices, each parallel mode the plan offers is then trained by its N processes here
        (its fastest fitting row) and that mode's rows are scaled by measured / predicted: the
        wrappers' own work and collectives under load are in that figure and in no model.
        """
        from regimen import calibrate

        self.mode_scale = {}
        row = plan.best or plan.rows[0]
        alone = replace(row.layout, mode="none", devices=1, offload=False)
        measured = calibrate.one_rank(self.strategy, alone, self.share, self.threads())
        predicted = self.step(alone, self.share).compute / self.time_scale
        self.time_scale = measured["step_s"] / predicted
        # The rest, as measured: the process's peak beyond the training tensors it held.
        runtime = estimate.Runtime(max(measured["rest"], 0.0), 0.0, "the process and the allocator")
        fp = estimate.footprint(self.trace(alone.checkpointing), alone, self.share, runtime, self.target.host_is_device)
        # What was measured, and the layouts the measurements ran (one rank alone, then each mode's processes).
        self.calibrated = {"runtime": runtime, **measured, "layouts": [alone], "predicted_step_s": predicted}
        where = f"{self.threads()} thread{'s' if self.threads() > 1 else ''}, " if self.target.host_is_device else ""
        notes = [
            f"calibrated, one rank alone here ({alone.label()}, {where}{self.share} samples, micro {alone.micro}): step measured "
            f"{measured['step_s']:.3g} s vs predicted {predicted:.3g} s (compute x {self.time_scale:.3f}); tensors' peak "
            f"measured {measured['tensor_peak'] / GiB:.3f} GiB vs predicted {(fp.peak - fp.rest) / GiB:.3f} GiB; the rest "
            f"measured {measured['rest'] / GiB:.3f} GiB (peak resident set beyond the tensors)"
        ]
        if self.n > 1:
            why_not = self._why_no_processes()
            for mode in dict.fromkeys(r.layout.mode for r in plan.rows if r.layout.devices > 1):
                fitting = [r for r in plan.rows if r.layout.mode == mode and r.fits]
                if why_not or not fitting:
                    notes.append(f"{mode} x{self.n} not calibrated: {why_not or 'no layout of it fits'}")
                    continue
                layout = min(fitting, key=lambda r: r.step.total).layout
                seconds = calibrate.processes(self.strategy, layout, self.share * self.n, self.threads())
                self.calibrated["layouts"].append(layout)
                predicted_n = self.step(layout, self.share).total
                self.mode_scale[mode] = seconds / predicted_n
                notes.append(
                    f"calibrated, {layout.label()} trained by {self.n} processes here (micro {layout.micro}): step measured "
                    f"{seconds:.3g} s vs predicted {predicted_n:.3g} s after the compute correction ({mode}'s rows x "
                    f"{self.mode_scale[mode]:.3f})"
                )
        new = self.plan()
        new.notes[:0] = notes
        return new

    def _why_no_processes(self) -> str:
        """Why N processes cannot train here ('' when they can)."""
        t = self.target
        if t.host_is_device:
            return "" if torch.distributed.is_available() and torch.distributed.is_gloo_available() else "torch has no gloo backend here"
        count = torch.cuda.device_count()
        return "" if count >= self.n else f"{self.n} processes need {self.n} devices here, this machine has {count}"


def write_strategy(strategy: Strategy, path: Path) -> Path:
    """Write a strategy file beside and rename it into place (never a torn file); refuses to replace one."""
    if path.exists():
        raise UserError(f"--apply {str(path)!r}: the file exists; name a new file (nothing was written)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    strategy.save(tmp)
    os.replace(tmp, path)
    return path


# ---- the table ------------------------------------------------------------------------------


def _size(nbytes: float, unit: float) -> str:
    return f"{nbytes / unit:.2f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def render(plan: Plan) -> str:
    """The plan as a text table, the recommendation and the notes."""
    t = plan.target
    unit, unit_name = (GiB, "GiB") if max(r.footprint.peak for r in plan.rows) >= GiB else (2**20, "MiB")
    where = f"{t.devices} x {t.name}" if t.devices > 1 else t.name
    s = plan.strategy
    head = (
        f"regimen plan: {s.model.name} model, optimizer {s.optimizer.name}, global batch up to {plan.max_batch} "
        f"on {where} ({t.memory / GiB:.2f} GiB each; memory in {unit_name} per device)"
    )
    columns = ["layout", "micro", "params", "grads", "optim", "activ", "rest", "peak", "fits", "step", "tokens/s", "budget"]
    lines = []
    for r in plan.rows:
        f = r.footprint
        mark = "*" if r is plan.best else (">" if r.given else " ")
        lines.append(
            [
                f"{mark} {r.layout.label()}" + (" (given)" if r.given else ""),
                str(r.layout.micro),
                *(_size(v, unit) for v in (f.params, f.grads, f.optimizer, f.activations, f.rest, f.peak)),
                "yes" if r.fits else "no",
                f"{r.step.total * 1e3:.0f} ms" if r.step.total < 10 else f"{r.step.total:.1f} s",
                f"{r.tokens_per_s:,.0f}",
                _duration(r.budget_s),
            ]
        )
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 1 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [head, "", fmt.format(*columns), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    out.append("")
    if plan.best is not None:
        b = plan.best
        offload = b.footprint.host
        out.append(
            f"recommended (*): {b.layout.label()}, micro-batch {b.layout.micro}: peak {b.footprint.peak / GiB:.2f} GiB per device, "
            f"{_duration(b.step.total) if b.step.total >= 1 else f'{b.step.total * 1e3:.0f} ms'} a step, "
            f"{_duration(b.budget_s)} for the budget" + (f"; {offload / GiB:.2f} GiB per device in host memory" if offload else "")
        )
    else:
        out.append("nothing fits: more devices (--devices), a larger device, or a smaller model or batch")
    out += [f"- {n}" for n in plan.notes]
    return "\n".join(out)
