"""TransformerAttentionHooker: selection, hook lifetime, attribution."""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .keep.allocator import unreachable_tensors
from .capture.coverage import Coverage, CoverageReport
from .capture.diagnostics import check_hf_implementation, job_rank
from .capture.forwards import ForwardWatch
from .capture.hooks import HookHandles, install_layer_hooks
from .capture.finalizer import finalize_take_off, watch_collections
from .capture.live import LIVE, take_off, weakly
from .capture.routes.mha import inner_mha_targets
from .capture.parallel import head_shard
from .capture.session import CaptureSession
from .capture.discovery import check_module, display_names, select_modules
from .errors import AttentionCaptureWarning, AttentionHookerError
from .keep.reduction import Reduction
from .keep.router import Router
from .keep.policy import StoragePolicy
from .values import AttentionValues, natural_order

__all__ = ["TransformerAttentionHooker"]



class TransformerAttentionHooker:
    """Captures per-head attention weights of a PyTorch model, without changing it.

    Three capture routes work together: ``nn.MultiheadAttention`` is asked for
    per-head weights (and the caller gets back exactly what it asked for);
    ``F.scaled_dot_product_attention`` calls have their weights recomputed from
    their own inputs while the real kernel produces the output; and in eager or
    handwritten attention the softmax over the last dim of a 4-D tensor is
    taken. A call belongs to the innermost hooked module running when it happens.

    Args:
        model: the model (any ``nn.Module``); it is not modified.
        layer_regex: searched (``re.search``) in ``model.named_modules()`` names;
            ``None`` hooks every module in which attention happens.
        device: where stored tensors go. ``"auto"`` (the default): on the computing device
            while what the hooker keeps there stays within half of the device memory that
            was free (or the hooker's) when the forward began; the call that would pass it,
            and every later one until ``clear()``, on the CPU; on the CPU on a machine
            without an accelerator. A device (``"cpu"``): there. ``None``:
            the computing device. Copies to the CPU go through pinned, double-buffered
            buffers that overlap the next tile's compute.
        dtype: stored dtype (``torch.float16`` halves memory); ``None`` keeps it.
        heads: only these head indices are computed and stored.
        max_calls: at most this many calls kept per layer.
        keep: with ``max_calls``: ``"first"`` (later calls are not computed) or ``"last"``.
        keep_grad: also keep ``gradients``: d(loss)/d(weights) per stored call,
            filled by ``backward()``. On the sdpa route the real kernel still computes
            the output, bitwise unchanged, and the gradient comes from the output's:
            ``dL/dP = dL/dO @ V^T`` (with dropout in a training call, whose mask is out of
            reach, the output is computed as ``dropout(weights) @ value`` instead).
        rows: the query rows kept of each call: ``"last"``, an index, a list of
            indices (negative ones count from the end of each call's rows) or a
            slice; stored ``(batch, heads, len(rows), key)``. On the sdpa route
            only those rows are computed, so the cost follows the selection
            ("what did the last token look at" at long context).
        keys: the keys kept of each row, in the same forms (``slice(0, 4)``: the
            first four, the usual attention sinks); stored ``(batch, heads, rows,
            len(keys))``. Each row is still normalised over all its keys; on the
            sdpa route a tile of rows at a time, so no row of all keys is held for
            the whole call.
        wrapper_names: report layers under their full names in a wrapped model
            (``module.`` of DDP/DataParallel, FSDP's ``_fsdp_wrapped_module.``,
            ``_checkpoint_wrapped_module.``); by default they are reported as in the
            unwrapped model, the same on every rank.
        keep_values: also keep ``value_vectors``: each call's value vectors ``(batch,
            kv_heads, key, head_dim)``, for value-weighted norms (every route; see
            :attr:`value_vectors`).
        windows: how the calls of windowed layers (Swin in transformers, timm and
            torchvision, torchvision MaxViT, timm Twins) are stored. ``"dense"`` (the
            default): placed at the image's tokens, ``(batch, heads, H*W, H*W)``, refused
            above 2 GiB a call. ``"keep"``: as the model computed them, ``(batch * windows,
            heads, N, N)`` (no dense map is made), with each call's window-to-position index
            in :attr:`window_index`; ``WindowIndex.dense(call)`` (or
            :func:`attention_hooker.window_index.dense_values`) gives the dense map on demand,
            and ``save()`` keeps the index. Not with ``rows=``/``keys=`` (slots are not
            tokens), ``reduce_into()`` or ``stream_to()``.
        output_from: what gives the model the output of an ``F.scaled_dot_product_attention``
            call. ``"kernel"`` (the default): the call's own kernel, so the model returns
            bitwise what it returns without capture, while the weights are recomputed beside
            it. ``"weights"``: the captured weights times the call's values, as eager
            attention and the peers compute it, so the weights are computed once instead of
            twice (faster where the kernel is no faster than eager attention: short inputs
            on the CPU); the model's outputs then equal the kernel's within float tolerance,
            not bitwise. It applies to calls whose whole map is kept as computed (no
            ``heads=``/``rows=``/``keys=``, no ``dtype=``/``device=`` conversion, no dropout,
            no streaming or reduction); every other call still runs its kernel.

    Attributes:
        values: ``{layer_name: [tensor per call]}``, each ``(batch, heads, query, key)``,
            layers in model order, calls in call order.

    Raises:
        AttentionHookerTypeError: when ``model`` is not an ``nn.Module`` (also a ``TypeError``).
        AttentionHookerError: on an invalid or unmatched ``layer_regex``, a bad
            option, or a Hugging Face model whose attention implementation hides
            the weights (``flash_attention_*``).

    Example:
        >>> model = nn.TransformerEncoder(
        ...     nn.TransformerEncoderLayer(d_model=16, nhead=4, batch_first=True), num_layers=2)
        >>> with TransformerAttentionHooker(model) as hooker:
        ...     _ = model(torch.randn(1, 5, 16))
        >>> hooker.values["layers.0.self_attn"][0].shape
        torch.Size([1, 4, 5, 5])
    """

    def __init__(
        self,
        model: nn.Module,
        layer_regex: Optional[str] = None,
        *,
        device: Union[str, torch.device, None] = "auto",
        dtype: Optional[torch.dtype] = None,
        heads: Optional[Sequence[int]] = None,
        max_calls: Optional[int] = None,
        keep: str = "first",
        keep_grad: bool = False,
        rows=None,
        keys=None,
        wrapper_names: bool = False,
        keep_values: bool = False,
        windows: str = "dense",
        output_from: str = "kernel",
    ):
        check_module(model)
        policy = StoragePolicy.build(
            device=device, dtype=dtype, heads=heads, max_calls=max_calls, keep=keep, keep_grad=keep_grad, rows=rows,
            keys=keys, keep_values=keep_values, windows=windows, output_from=output_from,
        )
        self.model = model
        self.layer_regex = layer_regex
        self._selected = select_modules(model, layer_regex)  # (name in model.named_modules(), module)
        self._shown = display_names([name for name, _ in self._selected], model, keep_wrappers=wrapper_names)
        self._router = Router(policy, self.hooked_layers)
        self._coverage = Coverage(self.hooked_layers)
        self._session = CaptureSession(self._router, self._coverage)  # a new one at each setup()
        self._hooks = HookHandles()  # everything put on the model, taken off by one remove()
        self._forwards = ForwardWatch(model, self._router, self._coverage, self.hooked_layers)
        self._stream = None  # the StreamedCapture calls go to (stream_to), until it is closed
        self._reduction: Optional[Reduction] = None  # where calls are reduced (reduce_into)
        self._finalizer = None  # takes the hooks off when nobody can reach this hooker any more
        self._ever_set_up = False
        self._head_shards: Dict[str, tuple] = {}  # tensor parallelism: {layer: (this rank's block, blocks)}

    # ------------------------------------------------------------------ public
    @property
    def values(self) -> AttentionValues:
        """``{layer_name: [tensor per call]}``, each ``(batch, heads, query, key)``.

        A layer whose call also makes maps of another kind (ProphetNet's n-gram streams) has them
        after the hooked layers, each under ``"<layer>:<kind>"`` (``"...self_attn:ngram1"``): not
        token attention of the layer (see the capture guide)."""
        if not self._ever_set_up and "never set up" not in self._forwards.warned:
            self._forwards.warned.add("never set up")
            warnings.warn(
                "this hooker was never set up, so it captured nothing: put it on the model with "
                "`with TransformerAttentionHooker(model) as hooker:` or hooker.setup() before running the model",
                AttentionCaptureWarning, stacklevel=2)
        values = self._router.memory.values
        if not values:
            self._point_to_requests("values", "requests")
        return values

    def _point_to_requests(self, what: str, where: str) -> None:
        """Warns once, when nothing was kept outside continuous batching's requests, where they are."""
        if self._router.requests and what not in self._forwards.warned:
            self._forwards.warned.add(what)
            warnings.warn(
                f"this capture ran under continuous batching: each request's {what.replace('_', ' ')} are kept "
                f"apart, in hooker.{where}[request_id] ({len(self._router.requests)} requests), never packed "
                f"together in {what}", AttentionCaptureWarning, stacklevel=3)

    @property
    def requests(self) -> Dict[str, AttentionValues]:
        """Under continuous batching (``model.generate_batch``, transformers'
        ``ContinuousBatchingManager``): ``{request_id: {layer_name: [tensor per call]}}``.

        The engine packs every request's queries and keys into one row; each request's part is
        kept on its own, in the order the request saw it: its prompt ``(1, heads, prompt,
        prompt)`` (or its chunks), then one call per decode step ``(1, heads, 1, positions so
        far)``, with ``heads=``, ``rows=``, ``keys=`` and ``max_calls`` applying per request.
        ``stitch_steps(hooker.requests[rid][layer])`` gives the request's causal ``(1, heads,
        T, T)``. Requests in the order of their ids (``req_2`` before ``req_10``); empty
        outside continuous batching.

        A request's first call is its first computed position: with prefix sharing (the
        engine's default) a prompt whose first cache pages another request filled, or a
        forked sequence, starts later (``stitch_steps`` says so). A request computed again
        from an earlier position (evicted and prefilled again) or an id served by another
        run of the engine is kept under a new label, ``req_0#2``, with a warning.
        ``report()`` counts each request's call of a layer as a call.
        """
        return {rid: router.memory.values for rid, router in self._request_routers()}

    @property
    def request_value_vectors(self) -> Dict[str, AttentionValues]:
        """With ``keep_values=True`` under continuous batching: ``{request_id: {layer_name: [value
        vectors per call]}}`` matching :attr:`requests`, each ``(1, kv_heads, positions, head_dim)``."""
        return {rid: AttentionValues((name, list(calls)) for name, calls in router.memory.value_vectors.items())
                for rid, router in self._request_routers()}

    def _request_routers(self) -> list:
        routers = self._router.requests
        return [(rid, routers[rid]) for rid in sorted(routers, key=natural_order)]

    @property
    def gradients(self) -> AttentionValues:
        """With ``keep_grad=True``: ``{layer_name: [gradient per call]}`` matching
        ``values``, each ``(batch, heads, query, key)``; ``None`` for a call that
        backward has not reached (yet)."""
        gradients = AttentionValues(
            (name, [slot[0] for slot in slots]) for name, slots in self._router.memory.gradients.items()
        )
        if not gradients:
            self._point_to_requests("gradients", "requests")
        return gradients

    @property
    def value_vectors(self) -> AttentionValues:
        """With ``keep_values=True``: ``{layer_name: [value vectors per call]}`` matching
        ``values``, each ``(batch, kv_heads, key, head_dim)`` as the attention multiplied
        its weights with (grouped-query attention: fewer kv heads, each serving
        ``heads / kv_heads`` consecutive query heads). The sdpa route keeps the kernel's
        ``value``; ``nn.MultiheadAttention`` its value input through its value projection;
        eager code the other operand of the product its weights reach (``matmul``, ``@``,
        ``bmm``). ``None`` for a call whose product the capture does not follow (an
        ``einsum``, a hand-written loop): never a guess.
        For :func:`attention_hooker.value_weighted_norms`."""
        vectors = AttentionValues((name, list(calls)) for name, calls in self._router.memory.value_vectors.items())
        if not vectors:
            self._point_to_requests("value_vectors", "request_value_vectors")
        return vectors

    @property
    def window_index(self) -> Dict[str, list]:
        """With ``windows="keep"``: ``{layer_name: [WindowIndex per call]}`` matching ``values``,
        for the windowed layers, whose calls are stored ``(batch * windows, heads, N, N)``.

        A :class:`~attention_hooker.window_index.WindowIndex` holds ``table`` ``(windows, N)``
        (the token ``y * width + x`` in slot ``n`` of window ``w``, ``-1`` for padding the layer
        added; windows are batch-major: call row ``b * windows + w``), ``batch``, ``height`` and
        ``width``; ``index.dense(call)`` is the ``(batch, heads, H*W, H*W)`` map the default
        ``windows="dense"`` stores. Empty for other captures.
        """
        return self._router.memory.window_index_copy()  # under the keeper's lock

    @property
    def hooked_layers(self) -> List[str]:
        """Names of the hooked modules, in model order."""
        return [self._shown[name] for name, _ in self._selected]

    @property
    def is_setup(self) -> bool:
        """Whether the hooks are on the model."""
        return bool(self._hooks)

    def setup(self) -> "TransformerAttentionHooker":
        """Puts the hooks on the model; calling it again does nothing. Returns ``self``.

        Raises:
            AttentionHookerError: on a Hugging Face model whose attention kernel
                hides the weights.
        """
        if self._hooks:
            return self
        check_hf_implementation(self.model)
        self._session = CaptureSession(self._router, self._coverage)
        try:
            self._register_all()
        except BaseException:
            self.remove_hooks()
            raise
        self._ever_set_up = True
        # Nothing on the model holds this hooker: once nobody can reach it (a notebook cell run
        # again rebinds the name), its hooks come off and it captures no more.
        watch_collections()  # so that the finalizer can tell the collector's call from the last reference's
        self._finalizer = weakref.finalize(self, finalize_take_off, self._hooks, self._session, self._router)
        self._finalizer.atexit = False  # at exit, as before: nothing is taken off or written
        # Judged at the first forward, not here: `hooker = TransformerAttentionHooker(model).setup()` run
        # again in a notebook sets the new one up while the name still holds the old one.
        self._forwards.on_first_forward = weakly(self._warn_if_others)
        return self

    def _warn_if_others(self) -> None:
        """Warns once when, at its first forward, other hookers of the same model still capture on
        its modules (the pile-up of a notebook cell run again with the old hooker still held).
        A hooker of an inner module inside one of the whole model is deliberate nesting: not warned."""
        others = [other for other in LIVE.sharing(self) if other.is_setup and other.model is self.model]
        if others:
            self._forwards.warn_once(
                5, "others", f"{type(self.model).__name__} has {len(others)} other hooker(s) on the same modules, "
                f"capturing too: {others[0]!r}. Each forward stores its attention {len(others) + 1} times; remove "
                "the old one with hooker.remove_hooks(), or every one with attention_hooker.remove_hooks(model)")

    def remove_hooks(self) -> None:
        """Takes every hook off and undoes any state of ours; safe to call twice.

        The captured ``values`` stay. Forwards of this model still running on
        other threads record nothing more; the hooks that close their scopes
        (and hand the caller of an ``nn.MultiheadAttention`` back what it asked
        for) leave when the last of those forwards ends.
        """
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        LIVE.discard(self)
        take_off(self._hooks, self._session, self._router)

    def clear(self) -> None:
        """Forgets the captured values (the hooks stay).

        A tensor you kept (the dict, a call list, the tensor, a view, a numpy array,
        a DLPack capsule) keeps its numbers. The memory of those that nothing can
        reach any more takes the next calls' weights while the hooks are on,
        skipping the cost of fresh memory (see ``keep/allocator.py``).
        """
        self._router.clear(salvage=unreachable_tensors if self._hooks else None)  # their memory: the next calls'
        self._coverage.reset()

    def report(self) -> CoverageReport:
        """What each hooked layer gave since setup (or the last ``clear()``), in model order.

        Returns:
            ``{layer_name: LayerCoverage}``; each has ``runs``, ``captured``,
            ``refused``, ``reason`` (why a call was refused), ``kind`` (what the layer
            stores when it is not attention probabilities over tokens, such as
            DiffLlama's differential map; ``None`` otherwise), ``inside`` and ``status``
            (``"captured"``, ``"refused"``, ``"captured inside"``: a wrapper whose map was kept under
            the hooked layers ``inside`` it, one of which captured in each of its runs, ``"nothing
            captured"``, ``"did not run"``).
            ``report().missing`` lists the layers that ran and gave nothing.

        Example:
            >>> model = nn.TransformerEncoder(
            ...     nn.TransformerEncoderLayer(d_model=16, nhead=4, batch_first=True), num_layers=2)
            >>> with TransformerAttentionHooker(model) as hooker:
            ...     _ = model(torch.randn(1, 5, 16))
            >>> hooker.report()
            CoverageReport(2 layers: 2 captured)
        """
        return self._coverage.report()

    def save(self, path, *, tokens: Optional[Sequence[str]] = None, request: Optional[str] = None) -> None:
        """Writes the captured values to one safetensors file (read back with ``attention_hooker.load``),
        with the window index of calls kept per window (``windows="keep"``).

        Args:
            path: the file; missing folders are created.
            tokens: token labels to keep with the capture; their number must
                match the query or key positions of a captured call.
            request: under continuous batching, the request whose calls are written
                (a key of :attr:`requests`).

        Raises:
            AttentionHookerError: when nothing was captured yet, or the tokens
                or the path do not fit, or ``request`` names no request.
        """
        from .io.saved import save_values

        if request is not None:
            requests = self.requests
            if request not in requests:
                raise AttentionHookerError(f"request={request!r} names no request of this capture; it has "
                                           f"{list(requests)[:6] or 'none'}")
            values = requests[request]
        else:
            values = self._router.memory.values
            if not values and self._router.requests:
                raise AttentionHookerError(
                    f"this capture ran under continuous batching: its attention is kept per request; save one "
                    f"with hooker.save(path, request=...), one of {list(self.requests)[:6]}")
        save_values(values, path, tokens=tokens, model_class=type(self.model).__name__, selection=self.selection,
                    windows=self.window_index if request is None else None)

    def reduce_into(self, accumulator, *, padding_mask=None) -> "TransformerAttentionHooker":
        """Sends the following calls to ``accumulator`` (a :class:`~attention_hooker.analysis.stats.HeadStatsAccumulator`,
        a :class:`~attention_hooker.keep.pooling.PooledAttention` for pictures of long maps, or a
        :class:`~attention_hooker.keep.pooling.KeyReductions` for attention received per key and
        top keys per query) instead of keeping them: on the sdpa route each call is computed and reduced a
        tile of query rows at a time, so no ``(batch, heads, query, key)`` tensor of a
        whole layer is ever held; other routes reduce the map the model made anyway.
        ``values`` stays empty. Call again with each batch's ``padding_mask``
        (``(batch, tokens)``, 1 for real tokens); ``reduce_into(None)`` keeps calls again.
        With :meth:`stream_to` as well, each call is both written and reduced, in one pass
        (a capture on disk and a pooled map to draw it).

        Raises:
            AttentionHookerError: with ``keep_grad`` or ``rows``, which reductions do not take.
        """
        if accumulator is not None:  # checked first: a refused one leaves the reduction in use as it was
            if not callable(getattr(accumulator, "partial", None)):
                raise AttentionHookerError(
                    f"reduce_into() takes a HeadStatsAccumulator, PooledAttention or KeyReductions, "
                    f"got {type(accumulator).__name__}")
            self._router.policy.check_reductions()
        if self._reduction is not None:
            self._router.detach(self._reduction)
            self._reduction = None
        if accumulator is not None:
            self._reduction = Reduction(accumulator, padding_mask)
            self._router.attach(self._reduction)
        return self

    def stream_to(self, folder, *, overwrite: bool = False, expected_bytes: Optional[int] = None,
                  shard_bytes: Optional[int] = None, per_rank: Optional[bool] = None):
        """Writes the following calls to ``folder`` as sharded safetensors instead of keeping them.

        On the sdpa route a call larger than ``shard_bytes`` is computed a tile of query
        rows at a time and each tile is written as it comes, so memory holds one tile,
        not the call; smaller calls are gathered into shards. ``heads=``, ``rows=``,
        ``dtype=`` and ``max_calls=`` apply as they do in memory. Before the first byte
        is written, the size of the capture (the first call's size x the hooked layers x
        ``max_calls``, or ``expected_bytes`` when given, checked at once) is weighed
        against the disk's free space, and the capture is refused when it does not fit.
        ``values`` stays empty; :func:`attention_hooker.load` opens the folder lazily.
        With :meth:`reduce_into` as well, each call is both written and reduced.

        Args:
            folder: where the capture goes (created).
            overwrite: replace a capture already in ``folder``.
            expected_bytes: the bytes the capture will write, when known (checked now).
            shard_bytes: calls smaller than this are gathered into shards of about
                this size (256 MiB by default).
            per_rank: each process of a ``torch.distributed`` job writes its calls
                into ``folder/rank-NNNNN`` (by default when a job of several ranks is
                running); ``load(folder)`` reads them back as one capture.

        Returns:
            The :class:`~attention_hooker.keep.stream.StreamedCapture`; ``close(tokens=...)``
            it (or leave its ``with`` block, or remove the hooks) to write what is waiting.

        Raises:
            AttentionHookerError: with ``keep_grad`` or ``keep="last"``, when the folder
                holds another capture, or when the plan does not fit the free space.

        Example:
            >>> import tempfile
            >>> model = nn.TransformerEncoder(
            ...     nn.TransformerEncoderLayer(d_model=16, nhead=4, batch_first=True), num_layers=2)
            >>> folder = tempfile.mkdtemp()
            >>> with TransformerAttentionHooker(model) as hooker, hooker.stream_to(folder) as stream:
            ...     _ = model(torch.randn(1, 5, 16))
            >>> from attention_hooker import load
            >>> load(folder).values["layers.1.self_attn"][0].shape
            torch.Size([1, 4, 5, 5])
        """
        from .keep.stream import SHARD_BYTES, StreamedCapture

        p = self._router.policy
        p.check_stream()
        rank = job_rank()
        if per_rank or (per_rank is None and rank is not None):
            folder = os.path.join(os.fspath(folder), f"rank-{rank or 0:05d}")
        stream = StreamedCapture(
            folder, layer_order=self.hooked_layers, hooked_layers=len(self._selected),
            calls_per_layer=p.max_calls or 1, shard_bytes=SHARD_BYTES if shard_bytes is None else shard_bytes,
            expected_bytes=expected_bytes, overwrite=overwrite,
            metadata={"model_class": type(self.model).__name__, "selection": self.selection},
            on_close=self._router.detach, forward_running=self._forwards.running,
            on_roll_back=self._router.uncount)
        if self._stream is not None:
            self._router.detach(self._stream)  # left open, as it is: its owner closes it
        # Under continuous batching each request is written into a folder of its own (requests/<id>).
        self._router.attach(stream, per_request=lambda rid, router: stream.for_request(rid, router.uncount))
        self._stream = stream
        return stream

    @property
    def head_indices(self) -> Dict[str, List[int]]:
        """``{layer_name: [the global index of each stored head]}``: ``heads=`` when given;
        under tensor parallelism, the block of heads this rank computes (rank ``r`` of
        ``n`` with ``h`` local heads holds ``r*h .. r*h + h - 1``); else ``0 .. heads-1``."""
        indices = {}
        for name, calls in self._router.memory.values.items():
            if not calls:
                continue
            local = calls[0].shape[1]
            if name in self._head_shards:
                block, _ = self._head_shards[name]
                indices[name] = list(range(block * local, block * local + local))
            else:
                heads = self._router.policy.selection.heads
                indices[name] = list(heads) if heads is not None else list(range(local))
        return indices

    @property
    def selection(self) -> dict:
        """Which heads, query rows and keys each stored call holds: ``{"heads": [...] or
        None, "rows": "last" / [indices] / {"start", "stop", "step"} or None, "keys":
        the same forms}`` (saved with the capture). Stored calls are ``(batch,
        len(heads), len(rows), len(keys))``."""
        return self._router.policy.selection.describe()

    def __enter__(self) -> "TransformerAttentionHooker":
        return self.setup()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove_hooks()

    def __repr__(self) -> str:
        state = "hooks on" if self._hooks else "hooks off"
        values = self._router.memory.values
        calls = sum(len(v) for v in values.values())
        requests = list(self._router.requests.values())
        served = ""
        if requests:
            held = sum(len(c) for router in requests for c in router.memory.values.values())
            served = f", {len(requests)} requests / {held} calls kept per request"
        return (
            f"TransformerAttentionHooker({type(self.model).__name__}, {len(self._selected)} hooked layers, "
            f"{state}, {len(values)} layers / {calls} calls captured{served})"
        )

    # ----------------------------------------------------------------- hooking
    def _capture_targets(self) -> List:
        """``(module, layer name)`` pairs to hook: the selected modules, and the
        ``nn.MultiheadAttention`` modules inside them (:func:`.routes.mha.inner_mha_targets`)."""
        return [(module, self._shown[name]) for name, module in self._selected] + [
            (module, self._shown[owner]) for module, owner in inner_mha_targets(self.model, self._selected)]

    def _register_all(self) -> None:
        self._head_shards = {self._shown[name]: shard for name, module in self._selected
                             if (shard := head_shard(module)) is not None}
        self._router.policy.check_tensor_parallel(bool(self._head_shards))
        targets = self._capture_targets()
        install_layer_hooks(self.model, targets, self._session, self._hooks)
        self._forwards.install(self._session, self._hooks)
        LIVE.add(self, [module for module, _ in targets])
