"""``optimize``: make a loaded model faster for real, or leave it exactly as it was.

Per device:

- CPU: dynamic int8 quantisation of the ``nn.Linear`` layers, per output channel
  (``torch.ao.quantization.quantize_dynamic``; per channel keeps outputs closer than per
  tensor at the same speed), applied to a copy of the model.
- CUDA: half precision, bfloat16 where the GPU supports it (else float16), converted in
  place with a CPU snapshot to restore from; then, when ``compile=True``, ``torch.compile``
  of the model's forward.

Each step is measured on the family's representative input (``probes``): the median
latency over several runs before and after (alternating the two models where both exist),
and the largest difference between their outputs. A step is kept only when it is at least
``MIN_SPEEDUP`` faster, agrees within the probe's tolerance, and the model still serves a
real request; otherwise the model is left unchanged and the report says why.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelhost.runtime.errors import ModelNotLoaded
from modelhost.runtime.families.registry import adapter_for
from modelhost.runtime.loaded import MB, LoadedModel
from modelhost.runtime.memory import (
    count_parameters,
    read_allocator,
    release_cached,
    weights_bytes,
)
from modelhost.runtime.probes import Probe

MIN_SPEEDUP = 1.03  # below a 3% gain a "speed-up" is within run-to-run noise
TARGET_SECONDS = 1.5  # measuring time per model and step, spread over the runs
MIN_RUNS, MAX_RUNS = 5, 30


@dataclass
class OptimizeReport:
    """What ``optimize`` measured and decided. Latencies are medians in milliseconds."""

    applied: bool
    technique: str
    device: str
    latency_ms_before: float | None
    latency_ms_after: float | None
    memory_mb_before: float
    memory_mb_after: float
    max_abs_diff: float | None
    tolerance: float | None
    compared: str
    runs: int
    message: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Step:
    technique: str
    applied: bool
    before_ms: float
    after_ms: float
    diff: float
    message: str
    candidate_mb: float | None = None  # the candidate's memory, kept or not


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - started) * 1000.0


def _runs_for(one_ms: float, models: int) -> int:
    budget = TARGET_SECONDS * 1000.0 / max(models, 1)
    return int(min(MAX_RUNS, max(MIN_RUNS, budget // max(one_ms, 1e-3))))


def _measure_pair(
    first: Callable[[], Any], second: Callable[[], Any], device: torch.device
) -> tuple[float, float, int]:
    """Median latencies of two callables, run alternately after a warm-up of each."""
    for _ in range(2):
        first()
        second()
    runs = _runs_for(max(_timed(first, device), _timed(second, device)), 2)
    a, b = [], []
    for _ in range(runs):
        a.append(_timed(first, device))
        b.append(_timed(second, device))
    return statistics.median(a), statistics.median(b), runs


def _measure(fn: Callable[[], Any], device: torch.device, warmup: int = 2) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    runs = _runs_for(_timed(fn, device), 1)
    return statistics.median(_timed(fn, device) for _ in range(runs)), runs


def _diff(probe: Probe, reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Largest absolute difference (relative to the reference's peak for audio);
    infinity when shapes differ or the candidate is not finite."""
    if reference.shape != candidate.shape or not torch.isfinite(candidate).all():
        return float("inf")
    diff = (reference - candidate).abs().max().item() if reference.numel() else 0.0
    if probe.relative:
        diff /= max(reference.abs().max().item(), 1e-12)
    return float(diff)


def probe_for(loaded: LoadedModel) -> Probe:
    """The probe of ``loaded``'s family (its adapter's ``probe``), its inputs prepared once."""
    return adapter_for(loaded.family).probe(loaded)


def smoke_inputs(loaded: LoadedModel) -> tuple[str, dict]:
    """A small real request for the family (its adapter's ``smoke``):
    ``("synthesize"|"predict", kwargs)``."""
    request = adapter_for(loaded.family).smoke(loaded)
    return request.kind, request.kwargs


def _serves(loaded: LoadedModel, model: nn.Module, vocoder: nn.Module | None) -> str | None:
    """None when a real request succeeds with the candidate, else why it failed."""
    from modelhost.runtime import inference

    trial = dataclasses.replace(loaded, model=model, vocoder=vocoder)
    kind, kwargs = smoke_inputs(loaded)
    try:
        if kind == "synthesize":
            inference.synthesize(trial, **kwargs)
        else:
            inference.predict(trial, **kwargs)
    except Exception as exc:  # any failure means the candidate cannot serve
        return f"{type(exc).__name__}: {exc}"
    return None


def _verdict(technique: str, before: float, after: float, diff: float, tol: float) -> str | None:
    if diff == float("inf"):
        return f"{technique}: outputs differ (shape changed or values not finite), left unchanged"
    if diff > tol:
        return (
            f"{technique}: outputs differ (max abs diff {diff:.4g} > tolerance {tol:g}), "
            "left unchanged"
        )
    if after * MIN_SPEEDUP > before:
        return f"{technique}: not faster: {before:.3f} ms -> {after:.3f} ms, left unchanged"
    return None


# --------------------------------------------------------------------------- CPU


def _quantize_cpu(loaded: LoadedModel, probe: Probe) -> tuple[_Step, int]:
    model = loaded.model
    assert model is not None
    technique = "dynamic int8 quantization of nn.Linear, per channel (torch.ao)"
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        return _Step(technique, False, 0.0, 0.0, 0.0, "no nn.Linear layers to quantize"), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        candidate = quantize_dynamic(
            model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=False
        )
    vocoder = loaded.vocoder
    candidate_mb = round(weights_bytes(candidate, vocoder) / MB, 3)
    reference = probe.run(model, vocoder)
    try:
        diff = _diff(probe, reference, probe.run(candidate, vocoder))
    except Exception as exc:  # an operator without a quantized kernel, say
        reason = f"{technique}: the quantized model fails ({type(exc).__name__}: {exc})"
        return _Step(technique, False, 0.0, 0.0, float("inf"), reason), 0
    before, after, runs = _measure_pair(
        lambda: probe.run(model, vocoder),
        lambda: probe.run(candidate, vocoder),
        model_device(model),
    )
    reason = _verdict(technique, before, after, diff, probe.tolerance)
    if reason is None:
        failure = _serves(loaded, candidate, vocoder)
        if failure is not None:
            reason = f"{technique}: the quantized model fails a real request ({failure})"
    if reason is not None:
        return _Step(technique, False, before, after, diff, reason, candidate_mb), runs
    loaded.model = candidate
    message = f"{technique}: {before:.3f} ms -> {after:.3f} ms ({before / after:.2f}x)"
    return _Step(technique, True, before, after, diff, message, candidate_mb), runs


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- CUDA


def _snapshot(modules: list[nn.Module]) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """CPU copies of every parameter and buffer, to restore after a rejected conversion."""
    saved = []
    for module in modules:
        for sub in module.modules():
            for kind in ("_parameters", "_buffers"):
                for key, tensor in getattr(sub, kind).items():
                    if tensor is not None:
                        saved.append((sub, kind, key, tensor.detach().to("cpu", copy=True)))
    return saved


def _restore(saved: list[tuple[nn.Module, str, str, torch.Tensor]], device: torch.device):
    with torch.no_grad():
        for sub, kind, key, tensor in saved:
            if kind == "_parameters":
                sub._parameters[key].data = tensor.to(device)
            else:
                sub._buffers[key] = tensor.to(device)


def _half_cuda(loaded: LoadedModel, probe: Probe, device: torch.device) -> tuple[_Step, int]:
    model, vocoder = loaded.model, loaded.vocoder
    assert model is not None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    name = str(dtype).replace("torch.", "")
    technique = f"{name} weights (half precision on CUDA)"
    modules = [m for m in (model, vocoder) if m is not None]
    floats = [p.dtype for m in modules for p in m.parameters() if p.is_floating_point()]
    if floats and all(d in (torch.float16, torch.bfloat16) for d in floats):
        return _Step(technique, False, 0.0, 0.0, 0.0, "weights are already half precision"), 0
    reference = probe.run(model, vocoder)
    before, runs = _measure(lambda: probe.run(model, vocoder), device)
    saved = _snapshot(modules)
    allocated_before = read_allocator(device)
    for module in modules:
        module.to(dtype)
    release_cached(device)
    allocated_after = read_allocator(device)
    delta = allocated_after.allocated - allocated_before.allocated
    candidate_mb = round(max(0, loaded.allocated_bytes + delta) / MB, 3)
    try:
        diff = _diff(probe, reference, probe.run(model, vocoder))
        after, _ = _measure(lambda: probe.run(model, vocoder), device)
        reason = _verdict(technique, before, after, diff, probe.tolerance)
    except Exception as exc:  # an operator without a half-precision kernel, say
        diff, after = float("inf"), float("nan")
        reason = f"{technique}: the converted model fails ({type(exc).__name__}: {exc})"
    if reason is None:
        failure = _serves(loaded, model, vocoder)
        if failure is not None:
            reason = f"{technique}: the converted model fails a real request ({failure})"
    if reason is not None:
        _restore(saved, device)
        del saved
        release_cached(device)
        return _Step(technique, False, before, after, diff, reason, candidate_mb), runs
    del saved
    loaded.allocated_bytes = max(0, loaded.allocated_bytes + delta)
    loaded.reserved_bytes = max(
        loaded.allocated_bytes,
        loaded.reserved_bytes + allocated_after.reserved - allocated_before.reserved,
    )
    message = f"{technique}: {before:.3f} ms -> {after:.3f} ms ({before / after:.2f}x)"
    return _Step(technique, True, before, after, diff, message, candidate_mb), runs


def _compile(loaded: LoadedModel, probe: Probe, device: torch.device) -> tuple[_Step, int]:
    model, vocoder = loaded.model, loaded.vocoder
    assert model is not None
    technique = "torch.compile of the model's forward"
    reference = probe.run(model, vocoder)
    before, runs = _measure(lambda: probe.run(model, vocoder), device)
    model.forward = torch.compile(model.forward, dynamic=True)  # instance attribute
    try:
        candidate = probe.run(model, vocoder)  # compiles
        diff = _diff(probe, reference, candidate)
        after, _ = _measure(lambda: probe.run(model, vocoder), device, warmup=3)
        reason = _verdict(technique, before, after, diff, probe.tolerance)
        if reason is None:
            failure = _serves(loaded, model, vocoder)
            if failure is not None:
                reason = f"{technique}: the compiled model fails a real request ({failure})"
    except Exception as exc:  # compilation failures come in many kinds
        diff, after = float("inf"), float("nan")
        reason = f"{technique}: compilation failed ({type(exc).__name__}: {exc})"
    if reason is not None:
        del model.forward  # back to the class's forward
        return _Step(technique, False, before, after, diff, reason), runs
    message = f"{technique}: {before:.3f} ms -> {after:.3f} ms ({before / after:.2f}x)"
    return _Step(technique, True, before, after, diff, message), runs


# --------------------------------------------------------------------------- entry point


def optimize(loaded: LoadedModel, compile: bool = False) -> OptimizeReport:
    """Optimise ``loaded`` for its device, keeping only measured, agreeing speed-ups.

    Blocking (seconds to minutes); holds the model's lock, so requests wait meanwhile.
    """
    with loaded.lock:
        if loaded.model is None:
            raise ModelNotLoaded(f"Model {loaded.name!r} was unloaded; load it again")
        device = model_device(loaded.model)
        memory_before = _memory_mb(loaded, device)
        if loaded.optimized and loaded.optimization:
            previous = loaded.optimization
            return OptimizeReport(
                applied=False,
                technique=str(previous.get("technique")),
                device=loaded.device,
                latency_ms_before=previous.get("latency_ms_after"),
                latency_ms_after=previous.get("latency_ms_after"),
                memory_mb_before=memory_before,
                memory_mb_after=memory_before,
                max_abs_diff=None,
                tolerance=None,
                compared=str(previous.get("compared")),
                runs=0,
                message="already optimized; unload and load the model to start over",
            )
        probe = probe_for(loaded)
        steps: list[tuple[_Step, int]] = []
        notes: list[str] = []
        with torch.no_grad():  # not inference_mode: converted weights stay normal tensors
            if device.type == "cpu":
                steps.append(_quantize_cpu(loaded, probe))
                if compile:
                    notes.append("torch.compile is applied on CUDA only")
            elif device.type == "cuda":
                steps.append(_half_cuda(loaded, probe, device))
                if compile:
                    steps.append(_compile(loaded, probe, device))
            else:
                notes.append(f"no optimisation is implemented for {device.type} yet")
        applied = [s for s, _ in steps if s.applied]
        measured = [s for s, r in steps if r > 0]
        if device.type == "cpu":
            loaded.allocated_bytes = loaded.reserved_bytes = weights_bytes(
                loaded.model, loaded.vocoder
            )
        loaded.weights_bytes = weights_bytes(loaded.model, loaded.vocoder)
        loaded.parameters = count_parameters(loaded.model, loaded.vocoder)
        # Before: the model as it was. After: the kept result, or the rejected candidate's
        # measurement when nothing was kept (the figure the decision rests on).
        shown = applied[-1] if applied else (measured[0] if measured else None)
        report = OptimizeReport(
            applied=bool(applied),
            technique=" + ".join(s.technique for s in applied) if applied else "none",
            device=loaded.device,
            latency_ms_before=_ms(measured[0].before_ms) if measured else None,
            latency_ms_after=_ms(shown.after_ms) if shown else None,
            memory_mb_before=memory_before,
            memory_mb_after=_memory_mb(loaded, device),
            max_abs_diff=_finite(max(s.diff for s in applied) if applied else shown.diff)
            if shown
            else None,
            tolerance=probe.tolerance,
            compared=probe.compared + (" (relative to peak)" if probe.relative else ""),
            runs=sum(r for _, r in steps),
            message="; ".join([s.message for s, _ in steps] + notes),
            steps=[
                {
                    "technique": s.technique,
                    "applied": s.applied,
                    "latency_ms_before": _ms(s.before_ms),
                    "latency_ms_after": _ms(s.after_ms),
                    "max_abs_diff": _finite(s.diff),
                    "memory_mb_candidate": s.candidate_mb,
                    "runs": r,
                    "message": s.message,
                }
                for s, r in steps
            ],
        )
        if applied:
            loaded.optimized = True
            loaded.optimization = report.to_dict()
        return report


def _ms(value: float) -> float | None:
    return round(value, 4) if value == value and value != float("inf") else None


def _finite(value: float) -> float | None:
    return float(value) if value == value and abs(value) != float("inf") else None


def _memory_mb(loaded: LoadedModel, device: torch.device) -> float:
    if device.type == "cpu":
        return round(weights_bytes(loaded.model, loaded.vocoder) / MB, 3)
    return round(loaded.allocated_bytes / MB, 3)
