"""Transformers models from streamed weights: the CUDA load path, ``from_pretrained`` otherwise.

``load_pretrained(cls, path, options)`` is what the family adapters call instead of
``cls.from_pretrained``. With ``options.stream`` (CUDA and ``MODELHOST_GPU_STREAM``) it builds
the model as ``from_pretrained`` does, without its file reading:

1. the checkpoint's headers are checked (``streamer.plan_checkpoint``), config.json read and
   the dtype chosen as ``from_pretrained`` chooses it (``dtype="auto"``: the config's, else the
   first floating tensor's);
2. the model is built on the meta device (no memory), weights untied, like ``from_pretrained``;
3. the checkpoint's keys are matched with the model's: anything ``from_pretrained`` would
   have to convert (renamed or fused keys, other shapes, missing parameters it would
   initialise at random, quantized checkpoints, ``keep_in_fp32`` modules) is not streamed;
4. the tensors are streamed onto the device (``streamer.Stream``, started before step 2 so
   the reads overlap the build), cast there when the model's dtype differs from the file's,
   and assigned (``load_state_dict(assign=True)``: no copy);
5. what the file does not hold is finished as ``from_pretrained`` finishes it: buffers
   (``position_ids``, rotary ``inv_freq``) are allocated on the CPU, filled by the model's
   own ``initialize_weights`` (which skips every loaded tensor) and moved; tied weights tied
   with ``tie_weights(missing_keys=...)``, the generation config read; then ``eval()``.

A checkpoint the streaming path does not take (``StreamUnsupported``) is logged and loaded
with ``from_pretrained``, the path every CPU load takes.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.runtime.memory import release_cached
from modelhost.runtime.streamer import (
    TORCH_DTYPES,
    FilePlan,
    Stream,
    StreamSettings,
    StreamStats,
    StreamUnsupported,
    plan_checkpoint,
)

if TYPE_CHECKING:  # imported where used: the server starts without torch
    import torch
    from torch import nn

    from modelhost.runtime.families.base import LoadOptions

log = logging.getLogger(__name__)

# Checkpoint keys from_pretrained drops without a word: buffers older Transformers saved.
ALWAYS_IGNORED = (r"(^|\.)position_ids$", r"rotary_emb\.inv_freq$")
# What the streamed build needs from the model class (Transformers 5's PreTrainedModel).
REQUIRED_METHODS = ("tie_weights", "initialize_weights", "named_non_persistent_buffers")


def stream_enabled(device: torch.device, setting: bool) -> bool:
    """Whether a load onto ``device`` streams its weights: CUDA only, when the setting
    (``MODELHOST_GPU_STREAM``) is on. CPU loads keep from_pretrained's memory-mapped files."""
    return bool(setting) and device.type == "cuda"


def load_pretrained(cls: Any, path: Path, options: LoadOptions) -> nn.Module:
    """``cls.from_pretrained(path, ...)`` as the loaders call it, or the streamed build when
    ``options.stream``; a checkpoint the stream does not take falls back, with a log line."""
    kwargs = options.hf_kwargs()
    if options.stream:
        try:
            return stream_pretrained(cls, path, options.device, kwargs["dtype"])
        except StreamUnsupported as exc:
            log.info("%s: weights not streamed (%s); loading with from_pretrained", path, exc)
            release_cached(options.device)
    return cls.from_pretrained(path, **kwargs)


@dataclass(frozen=True)
class KeyPlan:
    """How the checkpoint's tensors map onto the model: the keys assigned, the model's keys
    the files lack (tied weights and buffers, finished after), the keys dropped."""

    load: tuple[str, ...]
    missing: frozenset[str]
    ignored: frozenset[str]


def stream_pretrained(
    cls: Any,
    path: Path,
    device: torch.device,
    dtype: Any = "auto",
    settings: StreamSettings | None = None,
) -> nn.Module:
    """The model of ``path`` built by ``cls`` (a Transformers model or Auto class) with its
    weights streamed onto ``device``; ``dtype``: a ``torch.dtype`` or ``"auto"``. Raises
    ``StreamUnsupported`` (nothing stays allocated) for what only from_pretrained loads, and
    ``MalformedWeights`` for a damaged file."""
    import transformers

    path = Path(path)
    plans = plan_checkpoint(path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "quantization_config", None) is not None:
        raise StreamUnsupported("the checkpoint is quantized")
    chosen = resolve_dtype(dtype, config, plans)
    stream = Stream(plans, device, settings)  # the readers start; the model is built meanwhile
    try:
        model = build_skeleton(cls, config, chosen)
        keys = match_keys(model, plans, chosen)
    except BaseException:
        stream.cancel()
        release_cached(device)
        raise
    tensors: dict[str, torch.Tensor] = {}
    try:
        tensors, stats = stream.result()
        assemble(model, tensors, keys, device)
    except BaseException:
        tensors.clear()
        del model
        release_cached(device)
        raise
    _finish(model, cls, path)
    model._modelhost_stream = stats  # for the loader's log line and the tests
    log.info(
        "%s: streamed %d file(s), %.3f GB in %.2f s (%.2f GB/s) onto %s",
        path.name, stats.files, stats.bytes / 1e9, stats.seconds, stats.gb_per_s, device,
    )  # fmt: skip
    return model


def stream_stats(model: Any) -> StreamStats | None:
    """What streaming ``model`` moved, or None when it was loaded by from_pretrained."""
    return getattr(model, "_modelhost_stream", None)


def resolve_dtype(setting: Any, config: Any, plans: list[FilePlan]) -> torch.dtype:
    """The dtype from_pretrained would build the model in: ``setting`` when it is a dtype;
    for ``"auto"``, config.json's dtype, else the first floating tensor's (key order)."""
    import torch

    if isinstance(setting, torch.dtype):
        return setting
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if isinstance(stored, torch.dtype):
        return stored
    entries = sorted(plans[0].tensors.items()) if plans else []
    dtypes = [getattr(torch, TORCH_DTYPES[e.dtype]) for _, e in entries]
    floating = [d for d in dtypes if d.is_floating_point]
    return (floating or dtypes or [torch.get_default_dtype()])[0]


def build_skeleton(cls: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device in ``dtype``, weights not tied: as from_pretrained
    builds it before reading weights (no memory, no initialisation work)."""
    import torch
    from transformers import initialization

    contexts = [torch.device("meta")]
    for name in ("no_tie_weights", "meta_device_safe_creation_ops"):
        maker = getattr(initialization, name, None)
        if maker is not None:
            contexts.append(maker())
    build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        model = build(config, dtype=dtype)
    missing = [m for m in REQUIRED_METHODS if not hasattr(model, m)]
    if missing or not hasattr(model, "all_tied_weights_keys"):
        raise StreamUnsupported(f"{type(model).__name__} lacks {missing or 'tied-weight keys'}")
    return model


def match_keys(model: nn.Module, plans: list[FilePlan], dtype: torch.dtype) -> KeyPlan:
    """The checkpoint's keys against the model's, or ``StreamUnsupported`` naming what
    from_pretrained would have to convert or initialise."""
    _refuse_fp32_modules(model, dtype)
    expected = model.state_dict(keep_vars=True)
    entries = {key: entry for plan in plans for key, entry in plan.tensors.items()}
    ignore = _ignored_pattern(model)
    ignored = {k for k in entries if k not in expected and ignore.search(k)}
    unexpected = sorted(set(entries) - set(expected) - ignored)
    if unexpected:
        raise StreamUnsupported(
            f"{len(unexpected)} checkpoint keys the model does not have ({unexpected[:3]})"
        )
    for key, entry in entries.items():
        if key in expected and tuple(expected[key].shape) != entry.shape:
            raise StreamUnsupported(
                f"{key!r} is {list(entry.shape)} in the file, {list(expected[key].shape)} "
                "in the model"
            )
    missing = {k for k in expected if k not in entries}
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = dict(model.all_tied_weights_keys)
    untied = sorted(k for k in missing & parameters if not _tie_covered(k, tied, entries))
    if untied:
        raise StreamUnsupported(
            f"{len(untied)} parameters are not in the checkpoint ({untied[:3]}); "
            "from_pretrained initialises them"
        )
    load = tuple(k for k in entries if k in expected)
    return KeyPlan(load, frozenset(missing), frozenset(ignored))


def _refuse_fp32_modules(model: nn.Module, dtype: torch.dtype) -> None:
    """Modules kept in float32 in a half-precision model are from_pretrained's to place."""
    import torch

    halves = (torch.float16, torch.bfloat16)
    if (dtype == torch.float16 and getattr(model, "_keep_in_fp32_modules", None)) or (
        dtype in halves and getattr(model, "_keep_in_fp32_modules_strict", None)
    ):
        raise StreamUnsupported(f"{type(model).__name__} keeps some modules in float32")


def _ignored_pattern(model: nn.Module) -> re.Pattern[str]:
    own = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    patterns = [*ALWAYS_IGNORED, *own]
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def _tie_covered(key: str, tied: dict[str, str], present: Iterable[str]) -> bool:
    """Whether a missing parameter gets its value by tying to one the checkpoint holds."""
    present = set(present)
    for target, source in tied.items():
        if key == target and source in present:
            return True
        if key == source and (target in present or any(
            t in present for t, s in tied.items() if s == source
        )):  # fmt: skip
            return True
    return False


def assemble(
    model: nn.Module, tensors: dict[str, torch.Tensor], keys: KeyPlan, device: torch.device
) -> None:
    """Put the streamed tensors into ``model`` (cast to its dtypes on the device), then
    finish what the files do not hold as from_pretrained does. ``tensors`` is emptied."""
    import torch

    expected = model.state_dict(keep_vars=True)
    state = {}
    for key in keys.load:
        tensor = tensors.pop(key)
        want = expected[key].dtype
        # One tensor at a time: its streamed bytes are freed as soon as the cast exists.
        state[key] = tensor if tensor.dtype == want else tensor.to(want)
    tensors.clear()  # the ignored keys
    with torch.no_grad():
        model.load_state_dict(state, strict=False, assign=True)
    for key in state:
        model.get_parameter_or_buffer(key)._is_hf_initialized = True
    state.clear()
    for target in model.all_tied_weights_keys:
        with contextlib.suppress(AttributeError):  # tied later: not to be initialised
            model.get_parameter_or_buffer(target)._is_hf_initialized = True
    # The buffers are computed on the CPU, as from_pretrained + .to(device) computes them
    # (bit for bit the values of the loader's other path), then moved.
    created = _materialize_buffers(model, keys)
    model.initialize_weights()  # fills the buffers just allocated; skips everything loaded
    for module, leaf in created:
        module._buffers[leaf] = module._buffers[leaf].to(device)
    model.tie_weights(missing_keys=set(keys.missing), recompute_mapping=False)
    left = [n for n, t in _named_tensors(model) if t.device.type == "meta"]
    if left:
        raise StreamUnsupported(f"{len(left)} tensors were left unset ({left[:3]})")


def _materialize_buffers(model: nn.Module, keys: KeyPlan) -> list[tuple[nn.Module, str]]:
    """Empty CPU storage for the buffers the files lack (non-persistent ones, and persistent
    ones missing), for ``initialize_weights`` to fill; returns (module, name) of each."""
    import torch

    names = {name for name, _ in model.named_non_persistent_buffers()}
    names |= {name for name, _ in model.named_buffers() if name in keys.missing}
    created = []
    for name in sorted(names):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        buffer = module._buffers[leaf]
        if buffer is not None and buffer.device.type == "meta":
            module._buffers[leaf] = torch.empty_like(buffer, device="cpu")
            created.append((module, leaf))
    return created


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from ((n, b) for n, b in model.named_buffers() if b is not None)


def _finish(model: nn.Module, cls: Any, path: Path) -> None:
    """What from_pretrained does after the weights: the config's path, evaluation mode, and
    a generative model's generation config (generation_config.json, else from config.json)."""
    model.config.name_or_path = str(path)
    model.eval()
    if model.can_generate() and hasattr(model, "adjust_generation_fn"):
        model.adjust_generation_fn(
            None,
            cls.__name__.startswith("Auto"),
            False,
            str(path),
            cache_dir=None,
            force_download=False,
            proxies=None,
            local_files_only=True,
            token=None,
            revision="main",
            subfolder="",
            trust_remote_code=False,
        )
