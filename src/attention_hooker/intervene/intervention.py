"""HeadIntervention: the acts on heads, named layer by layer, put on a model for the runs in its context."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..capture.discovery import check_module
from ..errors import InterventionError
from .acts import Gate, GivenMap, MapOfOwn, Mean, PatchOutput, PatchWeights, Zero
from .engine import Engine, take_off
from .families import act_refusal
from .plans import LayerPlan, head_list, refuse_compiled, resolve_layer
from .recording import HeadRecording

__all__ = ["HeadIntervention"]

Heads = Union[int, Sequence[int], None]


class HeadIntervention:
    """Knocks out, scales, replaces or patches attention heads, for the runs inside its context.

    Unlike :class:`~attention_hooker.TransformerAttentionHooker`, which never changes what the
    model computes, an intervention does: inside its ``with`` block the named heads compute
    what it says, every other head and layer exactly what they computed before (an untouched
    head's output is bitwise the kernel's), and outside it the model is exactly as before (no
    hook, no mode, nothing of it is left, on success or on exception). It acts on the output of
    each head, ``(batch, heads, query, head_dim)`` before the heads are merged, on every route:
    the output of ``F.scaled_dot_product_attention`` (the kernel still computes every head), the
    product of an eager softmax with its values, and the heads of ``nn.MultiheadAttention``
    (computed by its own per-head path; refused in training with dropout). A hooker inside the
    context records the weights the model computed, not the replacements.

    Each method adds acts and returns the intervention, so they chain; a head takes at most one
    act on its weights (``replace_weights``, ``patch(what="weights")``) and one on its output
    (``knock_out``, ``scale``, ``patch(what="output")``), the weights first. A layer that runs
    in the context without an attention call the intervention can act on raises
    :class:`~attention_hooker.InterventionError`: an intervention never silently does nothing.
    On a layer of a windowed or pieced family (Swin windows, Qwen2-VL segments, Nystromformer,
    DiffLlama, Longformer, ...) an act that would not be exact there is refused when it is given,
    naming the family and why (:mod:`.families`).

    Args:
        model: any ``nn.Module``; layers are named by their ``model.named_modules()`` names
            (as :func:`~attention_hooker.find_attention_modules` gives them).

    Raises:
        AttentionHookerTypeError: when ``model`` is not an ``nn.Module``.

    Example:
        >>> attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(1, 5, 8)
        >>> with HeadIntervention(attention).knock_out("", heads=[0, 1]):
        ...     out, _ = attention(x, x, x)
        >>> bool(torch.allclose(out, attention.out_proj.bias.expand(1, 5, 8)))
        True
    """

    def __init__(self, model: nn.Module):
        check_module(model)
        refuse_compiled(model)
        self.model = model
        self._plans: Dict[str, LayerPlan] = {}
        self._engine: Optional[Engine] = None
        self._parents: Optional[Dict[int, nn.Module]] = None

    # ------------------------------------------------------------------ acts
    def knock_out(self, layer: str, heads: Heads, *, mode: str = "zero",
                  reference: Optional[HeadRecording] = None, reference_mask=None) -> "HeadIntervention":
        """Knocks heads out: their output ``(batch, query, head_dim)`` becomes 0, or their mean.

        Args:
            layer: the attention module's name.
            heads: a head index or a list of them; ``None``: every head of the layer.
            mode: ``"zero"``, or ``"mean"``: each head's output becomes its mean over the
                reference run's items and query positions (one ``(head_dim,)`` vector per head,
                the same at every position; it fits an input of any length).
            reference: with ``mode="mean"``, a :class:`HeadRecording` of the layer (:func:`record_heads`).
            reference_mask: with ``mode="mean"``, the reference's real tokens ``(batch, query)``
                (``attention_mask``: 1 real, 0 padding): padded query positions are left out of
                the mean. Without it every position counts, padding included.

        Returns:
            This intervention.

        Raises:
            InterventionError: on an unknown layer, a head the layer lacks, an unknown mode, or
                a reference that does not hold the layer.
        """
        plan = self._plan(layer)
        listed = head_list(plan, heads)
        if mode in ("zero", "mean"):
            self._check_family(plan, "knock_out" if mode == "zero" else "knock_out(mode='mean')", "output",
                               averaged=mode == "mean")
        if mode == "zero":
            if reference is not None or reference_mask is not None:
                raise InterventionError("knock_out(mode='zero') takes no reference (it is for mode='mean')")
            plan.add(listed, lambda _: Zero(), kind="output")
        elif mode == "mean":
            means = _mean_outputs(reference, plan.name, reference_mask)  # (H, Dv)
            plan.add(listed, lambda _: Mean(means), kind="output")
        else:
            raise InterventionError(f"knock_out mode must be 'zero' or 'mean', got {mode!r}")
        return self

    def scale(self, layer: str, gates, *, heads: Heads = None) -> "HeadIntervention":
        """Scales heads' outputs by a gate each: ``output[:, h] * gates[i]``.

        Args:
            layer: the attention module's name.
            gates: a tensor ``(len(heads),)`` (or a list of numbers), or ``(batch, len(heads))``
                for a gate per batch item (many knock-outs in one forward: item ``i`` gated
                its own way); pass one with ``requires_grad=True`` to get gradients with
                respect to the gates (it is used as it is, not copied).
            heads: the heads the gates belong to, in order; ``None``: every head of the layer.

        Returns:
            This intervention.

        Raises:
            InterventionError: on an unknown layer, a head the layer lacks, or gates of
                another length than the heads.
        """
        plan = self._plan(layer)
        listed = head_list(plan, heads)
        if not isinstance(gates, torch.Tensor):
            try:
                gates = torch.tensor(gates, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise InterventionError(f"gates must be a tensor (heads,) or a list of numbers, got {gates!r}") from None
        if gates.dim() not in (1, 2) or gates.shape[-1] != len(listed):
            raise InterventionError(
                f"layer {plan.name!r}: gates of shape {tuple(gates.shape)} for {len(listed)} heads {listed}: "
                f"expected ({len(listed)},), one gate per head, or (batch, {len(listed)}), one per item and head")
        if not gates.is_floating_point():
            raise InterventionError(f"gates must be floating point, got {gates.dtype}")
        self._check_family(plan, "scale", "output", per_item=gates.dim() == 2)
        plan.add(listed, lambda position: Gate(gates, position), kind="output")
        return self

    def replace_weights(self, layer: str, heads: Heads,
                        weights: Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]) -> "HeadIntervention":
        """Replaces heads' weights: each head's output becomes ``weights @ its values``.

        Args:
            layer: the attention module's name.
            heads: a head index or a list of them; ``None``: every head of the layer.
            weights: the map, ``(batch, query, key)`` or ``(query, key)`` (every item alike), used
                for each of ``heads``; or a function of the head's own map, ``(batch, query, key)
                -> (batch, query, key)``, called on each call (:func:`top_k_keys`,
                :func:`block_keys`, :func:`uniform_weights`, or your own).

        Returns:
            This intervention.

        Raises:
            InterventionError: on an unknown layer or a head the layer lacks; when the model
                runs, on a map of the wrong shape for the call.
        """
        plan = self._plan(layer)
        listed = head_list(plan, heads)
        self._check_family(plan, "replace_weights (a given map, top_k_keys, block_keys, uniform_weights)", "weights")
        if isinstance(weights, torch.Tensor):
            if weights.dim() not in (2, 3):
                raise InterventionError(
                    f"layer {plan.name!r}: a replacement map is (batch, query, key) or (query, key); got a "
                    f"{weights.dim()}-D tensor {tuple(weights.shape)}")
            act = GivenMap(weights)
        elif callable(weights):
            act = MapOfOwn(weights)
        else:
            raise InterventionError(
                f"weights must be a tensor (batch, query, key) or a function of the head's own map, got "
                f"{type(weights).__name__}")
        plan.add(listed, lambda _: act, kind="weights")
        return self

    def patch(self, layer: str, recording: HeadRecording, *, heads: Heads = None,
              what: str = "output") -> "HeadIntervention":
        """Patches heads from a recorded run (activation patching at head level).

        The n-th call of the layer in this context takes the n-th recorded call; the two runs
        must have the same batch and length (a run of another shape is refused when the call
        comes).

        Args:
            layer: the attention module's name.
            recording: a :class:`HeadRecording` of the layer (:func:`record_heads`), from the
                clean run.
            heads: a head index or a list of them; ``None``: every head of the layer.
            what: ``"output"``: the heads' outputs are the recorded ones; ``"weights"``: their
                weights are (recorded with ``weights=True``), times this run's values.

        Returns:
            This intervention.

        Raises:
            InterventionError: on an unknown layer, a head the layer lacks, a recording without
                the layer (or without weights, for ``what="weights"``); when the model runs, on a
                call of another shape than the recorded one.
        """
        plan = self._plan(layer)
        listed = head_list(plan, heads)
        if not isinstance(recording, HeadRecording):
            raise InterventionError(f"patch needs a HeadRecording (from record_heads), got {type(recording).__name__}")
        if what in ("output", "weights"):
            self._check_family(plan, f"patch(what={what!r})", what)
        if what == "output":
            if not recording.outputs.get(plan.name):
                raise InterventionError(f"the recording holds no call of layer {plan.name!r}; it holds "
                                        f"{sorted(recording.outputs) or 'nothing (was the model run inside it?)'}")
            plan.add(listed, lambda _: PatchOutput(recording, plan.name), kind="output")
        elif what == "weights":
            if not recording.weights.get(plan.name):
                raise InterventionError(
                    f"the recording holds no weights of layer {plan.name!r}: record with record_heads(..., weights=True)")
            plan.add(listed, lambda _: PatchWeights(recording, plan.name), kind="weights")
        else:
            raise InterventionError(f"patch what must be 'output' or 'weights', got {what!r}")
        return self

    # --------------------------------------------------------------- context
    @property
    def layers(self):
        """The names of the layers the intervention acts on."""
        return list(self._plans)

    @property
    def calls(self) -> Dict[str, int]:
        """``{layer: calls acted on}`` since the context was entered."""
        return {name: plan.calls for name, plan in self._plans.items()}

    def __enter__(self) -> "HeadIntervention":
        if self._engine is not None:
            raise RuntimeError("this intervention is already on the model")
        if not self._plans:
            raise InterventionError("the intervention has no act: call knock_out, scale, replace_weights or patch first")
        for plan in self._plans.values():
            plan.calls = 0
        self._engine = Engine(self.model, self._plans)
        self._engine.install()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        engine, self._engine = self._engine, None
        take_off(engine, ran=exc_type is not None or any(plan.calls for plan in self._plans.values()),
                 nothing_ran=f"no layer of this intervention ({', '.join(map(repr, self._plans))}) ran inside its "
                             "block: nothing was changed")

    def __repr__(self) -> str:
        parts = []
        for name, plan in self._plans.items():
            acts = sorted(set(plan.weight_acts) | set(plan.output_acts))
            parts.append(f"{name}: heads {acts}")
        return f"HeadIntervention({'; '.join(parts) or 'no act'}{', on' if self._engine else ''})"

    def _check_family(self, plan: LayerPlan, act: str, kind: str, *, per_item: bool = False,
                      averaged: bool = False) -> None:
        """Refuses ``act`` on a layer of a windowed or pieced family where it would not be exact
        (:mod:`.families`), before any run."""
        if self._parents is None:
            self._parents = {id(child): parent for parent in self.model.modules() for child in parent.children()}
        reason = act_refusal(plan.module, self._parents, act, kind, per_item=per_item, averaged=averaged)
        if reason is not None:
            raise InterventionError(f"layer {plan.name!r}: {reason}")

    def _plan(self, layer: str) -> LayerPlan:
        name, module = resolve_layer(self.model, layer)
        plan = self._plans.get(name)
        if plan is None and self._engine is not None:
            raise InterventionError(
                f"layer {name!r} is new to this intervention, which is already on the model: its hooks are on the "
                f"layers it had when the block began ({', '.join(map(repr, self._plans))}); add every layer before "
                "`with`")
        if plan is None:
            plan = self._plans[name] = LayerPlan(name, module)
        return plan


def _mean_outputs(reference, layer: str, mask=None) -> torch.Tensor:
    """Each head's mean output ``(heads, head_dim)`` over every item and query position of the
    reference's calls of ``layer`` (with ``mask`` ``(batch, query)``: its real positions only)."""
    if not isinstance(reference, HeadRecording):
        raise InterventionError(
            "knock_out(mode='mean') needs reference=, a HeadRecording of the layer (from record_heads), got "
            f"{type(reference).__name__}")
    calls = reference.outputs.get(layer)
    if not calls:
        raise InterventionError(f"the reference holds no call of layer {layer!r}; it holds {sorted(reference.outputs)}")
    if mask is None:
        total = sum(call.double().sum(dim=(0, 2)) for call in calls)  # (H, Dv)
        count = sum(call.shape[0] * call.shape[2] for call in calls)
        return (total / count).to(calls[0].dtype)
    mask = torch.as_tensor(mask)
    total, count = 0, 0
    for call in calls:  # (B, H, Q, Dv)
        if tuple(mask.shape) != (call.shape[0], call.shape[2]):
            raise InterventionError(
                f"reference_mask is {tuple(mask.shape)}; the reference's calls of layer {layer!r} are (rows, query) "
                f"= {(call.shape[0], call.shape[2])}, where rows are the batch's items (batch x segments for a layer "
                "whose calls run one image segment at a time)")
        real = mask.to(device=call.device, dtype=torch.float64)[:, None, :, None]  # (B, 1, Q, 1)
        total = total + (call.double() * real).sum(dim=(0, 2))
        count = count + real.sum()
    if float(count) == 0:
        raise InterventionError("reference_mask marks no real token: nothing to average")
    return (total / count).to(calls[0].dtype)

