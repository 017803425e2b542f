"""Input checks shared by the public functions: one helper per decision.

Each raises :class:`~attention_hooker.errors.AttentionHookerError` with a message
that says what was expected, what came, and where.
"""

from __future__ import annotations

import numbers
import os
from typing import Optional, Sequence, Tuple

from .errors import AttentionHookerError
from ._map_kinds import refuse_kind

__all__ = [
    "is_int",
    "index_list",
    "check_heads",
    "positive_int",
    "non_negative_int",
    "positive_number",
    "one_of",
    "check_flag",
    "check_device",
    "prepare_output_path",
    "check_probabilities",
    "token_lists",
]


def is_int(value) -> bool:
    """A true integer: Python/numpy ints and 0-dim integer tensors; not bool, not float."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    return dtype is not None and shape is not None and len(shape) == 0 and "int" in str(dtype)


def index_list(
    value, name: str, *, length: Optional[int] = None, where: str = "", allow_negative: bool = False, noun: str = ""
) -> Tuple[int, ...]:
    """A non-empty tuple of integer indices from an int or a sequence of ints.

    Args:
        value: an int, or a list/tuple/range/array of ints (not a string, not floats).
        name: the option's name, for the message.
        length: when given, every index must be in ``0..length-1`` (or ``-length..-1``
            with ``allow_negative``); negative ones are then returned counted from the end.
        where: what the indices point into, for the message (e.g. "layer 'h.0.attn'").
        noun: what an index names ("head", "position"), for the message.

    Example:
        >>> index_list([0, 2], "heads", length=4)
        (0, 2)
    """
    if is_int(value):
        value = [value]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        kind = f"{noun} indices" if noun else "indices"
        raise AttentionHookerError(f"{name}={value!r} is not a sequence of {kind}; expected e.g. [0, 3]")
    items = list(value)
    bad = [v for v in items if not is_int(v)]
    if bad:
        raise AttentionHookerError(f"{name}={items!r} holds non-integer entries {bad!r}; expected whole numbers such as [0, 3]")
    indices = [int(v) for v in items]
    if not indices:
        raise AttentionHookerError(f"{name} is empty; expected at least one index")
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise AttentionHookerError(f"{name}={indices} names {repeated} more than once; expected distinct indices")
    if length is None:
        if not allow_negative and any(i < 0 for i in indices):
            raise AttentionHookerError(f"{name}={indices} has negative entries; expected non-negative indices")
        return tuple(indices)
    low = -length if allow_negative else 0
    out_of_range = [i for i in indices if not low <= i < length]
    if out_of_range:
        span = f"{low}..{length - 1}" if length else "none: it is empty"
        place = f" of {where}" if where else ""
        raise AttentionHookerError(
            f"{name}={indices} names {out_of_range}, out of range{place}: it has {length} (valid indices {span})"
        )
    return tuple(i % length for i in indices)


def check_heads(heads: Sequence[int], n_heads: int, where: str) -> Tuple[int, ...]:
    """Head indices (non-negative, distinct) checked against a layer's head count.

    Example:
        >>> check_heads([1], 2, "layer 'a'")
        (1,)
    """
    heads = index_list(heads, "heads", noun="head")
    bad = [h for h in heads if h >= n_heads]
    if bad:
        raise AttentionHookerError(
            f"heads={list(heads)} names head(s) {bad}, but {where} has {n_heads} heads (indices 0..{n_heads - 1})"
        )
    return heads


def positive_int(value, name: str, *, allow_none: bool = False) -> Optional[int]:
    """An int >= 1 (``None`` passes when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not is_int(value) or int(value) < 1:
        raise AttentionHookerError(f"{name}={value!r} must be a positive int{' or None' if allow_none else ''}")
    return int(value)


def non_negative_int(value, name: str) -> int:
    """An int >= 0."""
    if not is_int(value) or int(value) < 0:
        raise AttentionHookerError(f"{name}={value!r} must be an int >= 0")
    return int(value)


def positive_number(value, name: str) -> float:
    """A finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or value != value or value == float("inf"):
        raise AttentionHookerError(f"{name}={value!r} must be a finite number > 0")
    return float(value)


def one_of(value, name: str, choices: Sequence) -> object:
    """``value`` when it is one of ``choices``."""
    if not isinstance(value, (str, int, float, type(None))) or value not in choices:
        raise AttentionHookerError(f"{name}={value!r} must be one of {tuple(choices)}")
    return value


def check_flag(value, name: str) -> bool:
    """A bool (Python or numpy), nothing else: ``keep_grad="no"`` is a mistake, not ``True``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise AttentionHookerError(f"{name}={value!r} must be True or False")


def check_device(device, option: str = "device", *, auto: bool = False):
    """A ``torch.device`` that exists on this machine (``None`` passes): the one check of a
    device for the library's options and the command line's ``--device``.

    Args:
        device: what was given.
        option: how the message names it: ``"device"`` (``device='cuda:3'``) or a
            command-line flag (``--device 'cuda:3'``).
        auto: ``"auto"`` passes too, as itself (the hooker's ``device``).

    Raises:
        AttentionHookerError: for a value that names no device type, or a device this
            machine does not have (``"cuda"`` without a GPU, ``"cuda:3"`` with two).

    Example:
        >>> check_device("cpu"), check_device(None)
        (device(type='cpu'), None)
    """
    import torch

    if device is None or (auto and isinstance(device, str) and device == "auto"):
        return device
    shown = f"{option} {device!r}" if option.startswith("-") else f"{option}={device!r}"
    expected = ("expected e.g. " + ("'auto', " if auto else "") + "'cpu', 'cuda:0', 'mps'"
                + ("" if option.startswith("-") else " or None"))
    if not isinstance(device, (str, torch.device)) and not is_int(device):
        raise AttentionHookerError(f"{shown} is not a torch device; {expected}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise AttentionHookerError(f"{shown} is not a torch device ({err}): it is not a device type torch knows; "
                                   f"{expected}") from None
    shown = f"{option} {str(device)!r}" if option.startswith("-") else f"{option}={str(device)!r}"
    if device.type == "meta":
        raise AttentionHookerError(f"{shown} holds no data; expected a device such as 'cpu' or 'cuda:0'")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise AttentionHookerError(
            f"{shown} is not available on this machine: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, AttributeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AttentionHookerError(f"{shown} is not available on this machine ({first_line})") from None
    return device


def prepare_output_path(path, *, what: str = "file") -> str:
    """``path`` as a string, its missing folders created.

    Raises:
        AttentionHookerError: when ``path`` is not a path, names a folder, or its
            folder cannot be made (a file stands where a folder should be, no permission).

    Example:
        >>> import tempfile
        >>> p = prepare_output_path(os.path.join(tempfile.mkdtemp(), "new", "a.png"))
        >>> os.path.isdir(os.path.dirname(p))
        True
    """
    if not isinstance(path, (str, os.PathLike)):
        raise AttentionHookerError(f"the {what} path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not path or path.endswith(os.sep):
        raise AttentionHookerError(f"the {what} path {path!r} names no file")
    if os.path.isdir(path):
        raise AttentionHookerError(f"the {what} path {path!r} is a folder; expected a file name inside it")
    folder = os.path.dirname(path)
    if folder:
        try:
            os.makedirs(folder, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise AttentionHookerError(
                f"cannot write the {what} {path!r}: a part of {folder!r} is a file, not a folder"
            ) from None
        except OSError as err:
            raise AttentionHookerError(f"cannot create the folder {folder!r} for the {what}: {err.strerror}") from None
    return path


def token_lists(tokens, name: str = "tokens") -> Optional[list]:
    """Token labels as a list of string lists: one list (``["a", "b"]``), or several
    (``[source_tokens, target_tokens]``) for axes of different lengths. ``None`` passes.

    Raises:
        AttentionHookerError: for a string (``"abc"`` is not three tokens), a number,
            or anything that is not a sequence of labels.

    Example:
        >>> token_lists(["a", "b"]), token_lists([["a"], ["b", "c"]])
        ([['a', 'b']], [['a'], ['b', 'c']])
    """
    if tokens is None:
        return None
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__") or not hasattr(tokens, "__iter__"):
        raise AttentionHookerError(
            f"{name} must be a list of token strings (or a list of such lists), got {type(tokens).__name__}"
            + (f" {tokens[:20]!r}" if isinstance(tokens, str) else "")
        )
    items = list(tokens)
    nested = [t for t in items if not isinstance(t, (str, bytes)) and hasattr(t, "__iter__") and hasattr(t, "__len__")]
    if items and len(nested) == len(items):
        return [token_lists(t, name)[0] for t in items]
    if nested:
        raise AttentionHookerError(f"{name} mixes labels and lists of labels; expected one list of strings, or a list of lists")
    return [[str(t) for t in items]]


def check_probabilities(attn, where: str, *, atol: Optional[float] = None) -> None:
    """Checks that ``(..., query, key)`` rows are attention probabilities: no negative
    weight, and no row summing to more than 1. Rows may sum to less: 0 for a query
    with every key masked, and less than 1 where a learned attention sink (gpt-oss)
    took the rest of the weight, on no key.

    ``atol`` defaults to what the dtype can hold (1e-2 for half precision,
    1e-4 otherwise), since captures may be stored in float16.

    A map the library stored as another kind (:mod:`._map_kinds`: the map that multiplies the
    values but is not a softmax, as DiffLlama's, Nystromformer's or CaiT's; a map over channels;
    a call kept per window) is refused whatever its numbers: one whose entries happen to be
    non-negative would pass the numeric check with a wrong meaning.

    Raises:
        AttentionHookerError: naming the kind and why, or the first offending row and its sum.
    """
    import torch

    refuse_kind(attn, where)
    a = attn if isinstance(attn, torch.Tensor) else torch.as_tensor(attn)
    if a.numel() == 0:
        return
    if atol is None:
        atol = 2e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-4
    a = a.detach().double()
    if not torch.isfinite(a).all():
        raise AttentionHookerError(f"{where} holds NaN or infinite weights; expected attention probabilities")
    if (a < -atol).any():
        raise AttentionHookerError(
            f"{where} holds negative weights (min {float(a.min()):.3g}); expected attention probabilities "
            "(softmax output, rows summing to 1)"
        )
    sums = a.sum(-1)
    bad = sums - 1 > atol * max(1.0, a.shape[-1] ** 0.5)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise AttentionHookerError(
            f"{where} is not attention probabilities: row {index} sums to {float(sums[index]):.4g}, "
            "expected at most 1 (1 for a softmax over the keys); pass softmax output, not scores"
        )
