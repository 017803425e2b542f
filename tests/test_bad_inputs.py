"""The catalogue of bad inputs: every public function, every mistake a user makes.

Each case either raises the library's error (``AttentionHookerError``, a
``ValueError``) with a message naming what was expected, or is a documented
valid input whose result is checked. None may end in a torch-internal
traceback or a silently wrong result.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

import attention_hooker as ah
from attention_hooker import AttentionHookerError, TransformerAttentionHooker
from tiny_models import SdpaAttention

torch.manual_seed(0)
P = torch.rand(2, 4, 5, 5).softmax(-1)  # (batch, heads, query, key): valid probabilities
CROSS = torch.rand(1, 2, 3, 6).softmax(-1)  # rectangular cross-attention
TOKENS = list("abcde")
VALUES = {"l0": [P], "l1": [P.flip(-1)]}


class _Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.attn = SdpaAttention(16, 4, use_softmax=kind == "eager")

    def forward(self, x):
        return self.attn(x)


def _mha():
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1).eval()


def _run(model_factory, **options):
    model = model_factory()
    with torch.no_grad(), TransformerAttentionHooker(model, **options) as hooker:
        model(torch.randn(1, 3, 16))
    return hooker


def _hooker(**options):
    return TransformerAttentionHooker(_Net("sdpa"), **options)


def _captured():
    return _run(lambda: _Net("sdpa"))


def _a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


class _Valid:
    """A documented valid input: ``check(result)`` must hold."""

    def __init__(self, check=lambda result: True, why=""):
        self.check, self.why = check, why


def _acc_then(update2):
    acc = ah.HeadStatsAccumulator()
    acc.update({"l": [P]})
    return update2(acc)


def _distance_grid():
    return ah.mean_attention_distance(torch.rand(1, 1, 5, 5).softmax(-1), grid=(2, 2), prefix_tokens=1)


def _unnormalised():
    return torch.rand(1, 2, 4, 4) * 3


def _zero_rows():
    a = torch.zeros(1, 1, 3, 3)
    a[..., 0, 0] = 1.0
    return a


CASES = {
    # ------------------------------------------------------------------ the hooker's options
    "model_none": (lambda t: TransformerAttentionHooker(None), r"model must be a torch\.nn\.Module, got NoneType"),
    "model_str": (lambda t: TransformerAttentionHooker("bert"), r"model must be a torch\.nn\.Module, got str"),
    "model_class": (lambda t: TransformerAttentionHooker(nn.Linear), r"model must be a torch\.nn\.Module, got type"),
    "regex_int": (lambda t: TransformerAttentionHooker(_Net("sdpa"), 5), r"layer_regex must be a str"),
    "regex_list": (lambda t: TransformerAttentionHooker(_Net("sdpa"), ["attn"]), r"layer_regex must be a str"),
    "regex_invalid": (lambda t: TransformerAttentionHooker(_Net("sdpa"), "attn("), r"not a valid regular expression"),
    "regex_no_match": (lambda t: TransformerAttentionHooker(_Net("sdpa"), "decoder"), r"matched none of the 4 module names"),
    "no_attention_module": (lambda t: TransformerAttentionHooker(nn.Linear(2, 2)), r"found no attention module in Linear"),
    "device_unknown": (lambda t: _hooker(device="tpu9"), r"is not a torch device"),
    "device_cuda_without_gpu": (lambda t: _hooker(device="cuda:7"), r"device='cuda:7' is not available on this machine"),
    "device_meta": (lambda t: _hooker(device="meta"), r"device='meta' holds no data"),
    "device_float": (lambda t: _hooker(device=3.5), r"device=3\.5 is not a torch device"),
    "device_object": (lambda t: _hooker(device=object()), r"is not a torch device"),
    "device_none_keeps": (lambda t: _run(lambda: _Net("sdpa"), device=None), _Valid(lambda h: h.values["attn"][0].device.type == "cpu")),
    "dtype_int": (lambda t: _hooker(dtype=torch.int64), r"not a floating torch dtype"),
    "dtype_str": (lambda t: _hooker(dtype="half"), r"not a floating torch dtype"),
    "dtype_bool": (lambda t: _hooker(dtype=torch.bool), r"not a floating torch dtype"),
    "dtype_python_float": (lambda t: _hooker(dtype=float), r"not a floating torch dtype"),
    "heads_string_digits": (lambda t: _hooker(heads="01"), r"heads='01' is not a sequence of head indices"),
    "heads_word": (lambda t: _hooker(heads="all"), r"not a sequence of head indices"),
    "heads_float_entry": (lambda t: _hooker(heads=[0.7]), r"non-integer entries \[0\.7\]"),
    "heads_float": (lambda t: _hooker(heads=1.5), r"not a sequence of head indices"),
    "heads_bool": (lambda t: _hooker(heads=[True]), r"non-integer entries \[True\]"),
    "heads_negative": (lambda t: _hooker(heads=[-1]), r"non-negative"),
    "heads_empty": (lambda t: _hooker(heads=[]), r"heads is empty"),
    "heads_repeated": (lambda t: _hooker(heads=[1, 1]), r"names \[1\] more than once"),
    "heads_nested": (lambda t: _hooker(heads=[[0]]), r"non-integer entries"),
    "heads_numpy_ints_ok": (lambda t: _run(lambda: _Net("sdpa"), heads=np.array([3, 1])),
                            _Valid(lambda h: h.values["attn"][0].shape == (1, 2, 3, 3))),
    "heads_tensor_ok": (lambda t: _run(lambda: _Net("sdpa"), heads=torch.tensor([2])),
                        _Valid(lambda h: h.values["attn"][0].shape == (1, 1, 3, 3))),
    "heads_range_ok": (lambda t: _run(lambda: _Net("sdpa"), heads=range(2)),
                       _Valid(lambda h: h.values["attn"][0].shape == (1, 2, 3, 3))),
    "heads_beyond_sdpa": (lambda t: _run(lambda: _Net("sdpa"), heads=[4]), r"names head\(s\) \[4\], but layer 'attn' has 4 heads"),
    "heads_beyond_eager": (lambda t: _run(lambda: _Net("eager"), heads=[0, 9]), r"names head\(s\) \[9\], but layer 'attn' has 4 heads"),
    "heads_beyond_mha": (lambda t: _run(_mha, heads=[4]), r"names head\(s\) \[4\], but layer 'layers\.0\.self_attn' has 4 heads"),
    "max_calls_zero": (lambda t: _hooker(max_calls=0), r"max_calls=0 must be a positive int"),
    "max_calls_negative": (lambda t: _hooker(max_calls=-2), r"max_calls=-2 must be a positive int"),
    "max_calls_float": (lambda t: _hooker(max_calls=1.5), r"max_calls=1\.5 must be a positive int"),
    "max_calls_bool": (lambda t: _hooker(max_calls=True), r"max_calls=True must be a positive int"),
    "max_calls_str": (lambda t: _hooker(max_calls="2"), r"max_calls='2' must be a positive int"),
    "keep_unknown": (lambda t: _hooker(keep="middle"), r"keep='middle' must be one of"),
    "keep_none": (lambda t: _hooker(keep=None), r"keep=None must be one of"),
    "keep_list": (lambda t: _hooker(keep=["first"]), r"must be one of"),
    "keep_grad_str": (lambda t: _hooker(keep_grad="yes"), r"keep_grad='yes' must be True or False"),
    "keep_grad_none": (lambda t: _hooker(keep_grad=None), r"keep_grad=None must be True or False"),
    "keep_grad_with_heads": (lambda t: _hooker(heads=[0], keep_grad=True), r"cannot be combined"),
    "positional_option": (lambda t: TransformerAttentionHooker(_Net("sdpa"), None, "cpu"), TypeError),
    # ------------------------------------------------------------------------ save / load
    "save_nothing_captured": (lambda t: _hooker().save(t / "a.safetensors"), r"nothing to save"),
    "save_parent_is_a_file": (lambda t: _captured().save(_a_file(t) / "x.safetensors"), r"is a file, not a folder"),
    "save_path_is_a_folder": (lambda t: _captured().save(t), r"is a folder"),
    "save_path_none": (lambda t: _captured().save(None), r"path must be a str or os\.PathLike, got NoneType"),
    "save_tokens_wrong_count": (lambda t: _captured().save(t / "a.safetensors", tokens=["a", "b"]),
                                r"2 tokens.*layer 'attn'.*3 query and 3 key positions"),
    "save_tokens_a_string": (lambda t: _captured().save(t / "a.safetensors", tokens="abc"), r"tokens must be a list"),
    "save_tokens_ok": (lambda t: _captured().save(t / "a.safetensors", tokens=["a", "b", "c"]) or ah.load(t / "a.safetensors"),
                       _Valid(lambda c: c.tokens == ["a", "b", "c"])),
    "save_values_not_a_mapping": (lambda t: ah.io.save_values([P], t / "a.safetensors"), r"expected .*layer_name"),
    "save_values_not_4d": (lambda t: ah.io.save_values({"l": [P[0, 0]]}, t / "a.safetensors"), r"Wrong shape for layer 'l' call 0"),
    "load_missing": (lambda t: ah.load(t / "missing.safetensors"), FileNotFoundError),
    "load_not_safetensors": (lambda t: ah.load(_a_file(t)), r"is not a safetensors file saved by attention_hooker"),
    "load_foreign_safetensors": (lambda t: (__import__("safetensors.torch").torch.save_file({"x": P}, str(t / "f.st")), ah.load(t / "f.st")),
                                 r"not an attention_hooker capture"),
    "load_folder": (lambda t: ah.load(t), r"is a folder"),
    "load_none": (lambda t: ah.load(None), r"path must be a str or os\.PathLike, got NoneType"),
    # ---------------------------------------------------------------------- exports
    "bertviz_call_out_of_range": (lambda t: ah.to_bertviz(VALUES, call=3), r"call=3 is out of range"),
    "bertviz_mixed_shapes": (lambda t: ah.to_bertviz({"a": [P], "b": [CROSS]}), r"one shape"),
    "bertviz_unknown_layer": (lambda t: ah.to_bertviz(VALUES, layers=["nope"]), r"unknown layer"),
    "bertviz_not_values": (lambda t: ah.to_bertviz(42), r"expected a hooker, a loaded capture"),
    "bertviz_empty": (lambda t: ah.to_bertviz({}), r"nothing to show"),
    "to_numpy_not_values": (lambda t: ah.to_numpy([P]), r"expected a hooker, a loaded capture"),
    # ------------------------------------------------------------------------ the page
    "page_no_tokens_ok": (lambda t: ah.render_html(VALUES), _Valid(lambda page: "<!DOCTYPE html>" in page.html)),
    "page_no_tokens_cross_ok": (lambda t: ah.render_html({"x": [CROSS]}), _Valid(lambda page: len(page) > 0)),
    "page_tokens_wrong_count": (lambda t: ah.render_html(VALUES, tokens=["a", "b"]), r"5 query and 5 key positions, while the number of tokens is 2"),
    "page_tokens_a_string": (lambda t: ah.render_html(VALUES, tokens="abcde"), r"tokens must be a list"),
    "page_tokens_int": (lambda t: ah.render_html(VALUES, tokens=5), r"tokens must be a list"),
    "page_query_tokens_wrong": (lambda t: ah.render_html({"x": [CROSS]}, query_tokens=["a"]), r"3 query and 6 key positions"),
    "page_no_positions": (lambda t: ah.render_html({"l": [torch.rand(1, 2, 0, 0)]}), r"layer 'l' call 0 has no query or key positions"),
    "page_no_key_positions": (lambda t: ah.render_html({"l": [torch.rand(1, 2, 3, 0)]}), r"has no query or key positions"),
    "page_tokens_empty": (lambda t: ah.render_html(VALUES, tokens=[]), r"the number of tokens is 0"),
    "grid_no_positions": (lambda t: ah.plot_attention_grid(torch.rand(1, 2, 0, 0)), r"the attention has no query or key positions"),
    "overview_no_positions": (lambda t: ah.plot_attention_overview({"l": [torch.rand(1, 2, 0, 0)]}), r"layer 'l' has no query or key positions"),
    "page_empty": (lambda t: ah.render_html({}), r"nothing to show"),
    "page_not_4d": (lambda t: ah.render_html({"l": [torch.rand(5, 5)]}), r"Wrong shape for layer 'l' call 0"),
    "page_unknown_layer": (lambda t: ah.render_html(VALUES, layers=["l9"]), r"unknown layer"),
    "page_compression_high": (lambda t: ah.render_html(VALUES, compression_level=10), r"compression_level=10 must be an int in 0\.\.9"),
    "page_compression_str": (lambda t: ah.render_html(VALUES, compression_level="fast"), r"compression_level='fast' must be an int"),
    "page_title_not_str": (lambda t: ah.render_html(VALUES, title=3), r"title must be a str"),
    "page_save_parent_is_a_file": (lambda t: ah.render_html(VALUES).save(_a_file(t) / "p.html"), r"is a file, not a folder"),
    "page_not_values": (lambda t: ah.render_html(P), r"expected a hooker, a loaded capture"),
    # ------------------------------------------------------------------------ plots
    "grid_1d": (lambda t: ah.plot_attention_grid(torch.rand(5)), r"Wrong shape for attention.*1-dim"),
    "grid_5d": (lambda t: ah.plot_attention_grid(torch.rand(1, 1, 1, 2, 2)), r"Wrong shape for attention.*5-dim"),
    "grid_strings": (lambda t: ah.plot_attention_grid(np.array([["a"]])), r"tensor or array of numbers"),
    "grid_tokens_wrong": (lambda t: ah.plot_attention_grid(P, tokens=TOKENS[:3]), r"5 query and 5 key positions, while the number of tokens is 3"),
    "grid_tokens_a_string": (lambda t: ah.plot_attention_grid(P, tokens="abcde"), r"tokens must be a list"),
    "grid_tokens_two_lists": (lambda t: ah.plot_attention_grid(CROSS, tokens=[list("abc"), list("uvwxyz")]),
                              r"tokens holds 2 lists; a plot takes one list"),
    "grid_batch_index": (lambda t: ah.plot_attention_grid(P, batch_index=2), r"batch_index=2 is out of range .* batch size 2"),
    "grid_batch_index_float": (lambda t: ah.plot_attention_grid(P, batch_index=0.5), r"batch_index=0\.5 must be an int"),
    "grid_heads_beyond": (lambda t: ah.plot_attention_grid(P, heads=[9]), r"names head\(s\) \[9\], but the attention has 4 heads"),
    "grid_heads_str": (lambda t: ah.plot_attention_grid(P, heads="01"), r"not a sequence of head indices"),
    "grid_heads_empty": (lambda t: ah.plot_attention_grid(P, heads=[]), r"heads is empty"),
    "grid_max_labels_zero": (lambda t: ah.plot_attention_grid(P, max_labels=0), r"max_labels=0 must be a positive int"),
    "grid_ncols_zero": (lambda t: ah.plot_attention_grid(P, ncols=0), r"ncols=0 must be a positive int"),
    "grid_cmap_unknown": (lambda t: ah.plot_attention_grid(P, cmap="nope"), r"cmap='nope' is not a matplotlib colormap"),
    "grid_panel_size": (lambda t: ah.plot_attention_grid(P, panel_size=-1), r"panel_size=-1 must be a finite number > 0"),
    "grid_save_parent_is_a_file": (lambda t: ah.plot_attention_grid(P, save_path=_a_file(t) / "g.png"), r"is a file, not a folder"),
    "grid_save_unknown_format": (lambda t: ah.plot_attention_grid(P, save_path=t / "g.xyz"), r"format .*xyz"),
    "grid_cross_ok": (lambda t: ah.plot_attention_grid(CROSS, query_tokens=list("abc"), key_tokens=list("uvwxyz")),
                      _Valid(lambda fig: len(fig.axes) == 3)),
    "overview_scale": (lambda t: ah.plot_attention_overview(VALUES, scale="log"), r"scale='log' must be 'shared' or 'row'"),
    "overview_call": (lambda t: ah.plot_attention_overview(VALUES, call=-5), r"call=-5 must be an int >= 0"),
    "overview_batch": (lambda t: ah.plot_attention_overview(VALUES, batch_index=7), r"batch_index=7 is out of range"),
    "overview_empty": (lambda t: ah.plot_attention_overview({}), r"nothing to show"),
    "overview_unknown_layer": (lambda t: ah.plot_attention_overview(VALUES, layers=["x"]), r"unknown layer"),
    "overview_cell_size": (lambda t: ah.plot_attention_overview(VALUES, cell_size=0), r"cell_size=0 must be a finite number > 0"),
    "vit_grid_mismatch": (lambda t: ah.vit_attention_map(P, grid=(3, 3)), r"grid=\(3, 3\) has 9 patches, but there are 4 tokens"),
    "vit_prefix_negative": (lambda t: ah.vit_attention_map(P, prefix_tokens=-1), r"prefix_tokens=-1 must be an int >= 0"),
    "vit_prefix_too_many": (lambda t: ah.vit_attention_map(P, prefix_tokens=5), r"prefix_tokens=5 leaves no patch tokens of the 5"),
    "vit_query_beyond": (lambda t: ah.vit_attention_map(P, query=5), r"query=5 is out of range .* 5 tokens"),
    "vit_heads_beyond": (lambda t: ah.vit_attention_map(P, heads=4), r"heads=4 must be 'mean', 'max', None or a head index < 4"),
    "vit_rollout_wrong_dims": (lambda t: ah.vit_attention_map(P, heads=None), r"Wrong shape for a rollout map"),
    "vit_image_wrong": (lambda t: ah.plot_vit_attention(P, torch.rand(5)), r"image must be"),
    "vit_alpha": (lambda t: ah.plot_vit_attention(P, torch.rand(3, 8, 8), alpha=2), r"alpha=2 must be a number in \[0, 1\]"),
    # ---------------------------------------------------------------------- analyses
    "rollout_empty": (lambda t: ah.attention_rollout([]), r"attentions is empty"),
    "rollout_not_square": (lambda t: ah.attention_rollout([CROSS]), r"needs square self-attention"),
    "rollout_mixed_shapes": (lambda t: ah.attention_rollout([P, P[:, :, :3, :3].softmax(-1)]), r"every layer must share"),
    "rollout_fusion": (lambda t: ah.attention_rollout([P], head_fusion="median"), r"head_fusion='median' must be one of"),
    "rollout_unnormalised": (lambda t: ah.attention_rollout([_unnormalised()]), r"attentions\[0\] is not attention probabilities"),
    "rollout_negative": (lambda t: ah.attention_rollout([P - 0.5]), r"negative weights"),
    "rollout_nan": (lambda t: ah.attention_rollout([P.clone().fill_(float("nan"))]), r"NaN"),
    "rollout_zero_rows_no_residual": (lambda t: ah.attention_rollout([_zero_rows()], add_residual=False),
                                      r"row 1 of attentions\[0\] .* sums to 0 .* add_residual=False"),
    "rollout_zero_rows_with_residual_ok": (lambda t: ah.attention_rollout([_zero_rows()]),
                                           _Valid(lambda r: torch.allclose(r.sum(-1), torch.ones(1, 3)))),
    "rollout_residual_str": (lambda t: ah.attention_rollout([P], add_residual="no"), r"add_residual='no' must be True or False"),
    "rollout_not_tensors": (lambda t: ah.attention_rollout(["x"]), r"expected .*tensor"),
    "gradrollout_count": (lambda t: ah.gradient_weighted_rollout([P, P], [P]), r"2 attention layers but 1 gradient layers"),
    "gradrollout_missing": (lambda t: ah.gradient_weighted_rollout([P], [None]), r"capture with keep_grad=True"),
    "gradrollout_shape": (lambda t: ah.gradient_weighted_rollout([P], [P[:1]]), r"expected \(2, 4, 5, 5\)"),
    "entropy_unnormalised": (lambda t: ah.head_entropy(_unnormalised()), r"attn is not attention probabilities"),
    "entropy_2d": (lambda t: ah.head_entropy(torch.rand(3, 3).softmax(-1)), r"Wrong shape for attn: expected 4 dims"),
    "entropy_mask_length": (lambda t: ah.head_entropy(P, padding_mask=torch.ones(2, 4)), r"padding_mask is \(2, 4\), expected \(batch, query\) = \(2, 5\)"),
    "entropy_mask_batch": (lambda t: ah.head_entropy(P, padding_mask=torch.ones(3, 5)), r"padding_mask is \(3, 5\)"),
    "entropy_mask_values": (lambda t: ah.head_entropy(P, padding_mask=torch.full((2, 5), 2)), r"padding_mask must hold 0/1 or True/False"),
    "entropy_mask_1d_ok": (lambda t: ah.head_entropy(P[:1], padding_mask=[1, 1, 1, 0, 0]), _Valid(lambda e: e.shape == (1, 4))),
    "distance_not_square": (lambda t: ah.mean_attention_distance(CROSS), r"needs self-attention"),
    "distance_grid": (lambda t: ah.mean_attention_distance(P, grid=(2, 3)), r"grid=\(2, 3\) has 6 patches but the attention has 5"),
    "distance_grid_prefix_ok": (lambda t: _distance_grid(), _Valid(lambda d: d.shape == (1, 1))),
    "distance_prefix_negative": (lambda t: ah.mean_attention_distance(P, grid=(2, 2), prefix_tokens=-1), r"prefix_tokens=-1 must be an int >= 0"),
    "distance_unnormalised": (lambda t: ah.mean_attention_distance(_unnormalised()), r"not attention probabilities"),
    "sink_beyond": (lambda t: ah.sink_share(torch.rand(1, 1, 4, 4).softmax(-1), [10]), r"positions=\[10\] names \[10\], out of range of the keys: it has 4"),
    "sink_too_negative": (lambda t: ah.sink_share(P, [-6]), r"positions=\[-6\] names \[-6\], out of range"),
    "sink_negative_ok": (lambda t: ah.sink_share(P, [-1]), _Valid(lambda s: torch.allclose(s, P[..., -1].mean(-1).double()))),
    "sink_empty": (lambda t: ah.sink_share(P, []), r"positions is empty"),
    "sink_float": (lambda t: ah.sink_share(P, [0.5]), r"non-integer entries \[0\.5\]"),
    "sink_str": (lambda t: ah.sink_share(P, "0"), r"not a sequence of position indices"),
    "sink_repeated": (lambda t: ah.sink_share(P, [0, 0]), r"more than once"),
    "sink_unnormalised": (lambda t: ah.sink_share(_unnormalised(), [0]), r"not attention probabilities"),
    "acc_head_count_changes": (lambda t: _acc_then(lambda acc: acc.update({"l": [P[:, :2].softmax(-1)]})),
                               r"layer 'l' has 2 heads in this update but 4 before"),
    "acc_not_mapping": (lambda t: ah.HeadStatsAccumulator().update([P]), r"expected .*layer_name"),
    "acc_empty_calls": (lambda t: ah.HeadStatsAccumulator().update({"l": []}), r"layer 'l' has no call"),
    "acc_mask_length": (lambda t: ah.HeadStatsAccumulator().update({"l": [P]}, padding_mask=torch.ones(2, 4)),
                        r"padding_mask is \(2, 4\), expected \(batch, query\) = \(2, 5\)"),
    "acc_unnormalised": (lambda t: ah.HeadStatsAccumulator().update({"l": [_unnormalised()]}), r"not attention probabilities"),
    "acc_result_before_update": (lambda t: ah.HeadStatsAccumulator().result(), r"no statistics yet"),
    "stitch_empty": (lambda t: ah.stitch_steps([]), r"calls is empty"),
    "stitch_first_not_square": (lambda t: ah.stitch_steps([CROSS]), r"starts with the prompt"),
    "stitch_not_consecutive": (lambda t: ah.stitch_steps([P, torch.rand(2, 4, 1, 9)]), r"not consecutive"),
    "stitch_heads_differ": (lambda t: ah.stitch_steps([P, torch.rand(2, 2, 1, 6)]), r"has batch 2 and 4 heads"),
    # ------------------------------------------------------------------ sdpa weights
    "sdpa_not_tensor": (lambda t: ah.sdpa_attention_weights([1.0], torch.rand(1, 1, 2, 2)), r"query must be a floating tensor, got list"),
    "sdpa_dim_mismatch": (lambda t: ah.sdpa_attention_weights(torch.rand(1, 2, 3, 4), torch.rand(1, 2, 5, 8)), r"query .* and key .* must share the last dim"),
    "sdpa_heads_not_divisible": (lambda t: ah.sdpa_attention_weights(torch.rand(1, 4, 3, 4), torch.rand(1, 3, 5, 4)),
                                 r"4 query heads cannot share 3 key heads"),
    "sdpa_mask_shape": (lambda t: ah.sdpa_attention_weights(torch.rand(1, 2, 3, 4), torch.rand(1, 2, 5, 4), torch.ones(4, 4, dtype=torch.bool)),
                        r"attn_mask of shape \(4, 4\) does not broadcast to \(batch, heads, query, key\) = \(1, 2, 3, 5\)"),
    "sdpa_heads_beyond": (lambda t: ah.sdpa_attention_weights(torch.rand(1, 2, 3, 4), torch.rand(1, 2, 5, 4), heads=[2]),
                          r"names head\(s\) \[2\], but the attention has 2 heads"),
    "sdpa_integer_query": (lambda t: ah.sdpa_attention_weights(torch.ones(1, 1, 2, 2, dtype=torch.long), torch.ones(1, 1, 2, 2)),
                           r"query must be a floating tensor, got torch\.int64"),
    "find_modules_not_module": (lambda t: ah.find_attention_modules("bert"), r"model must be a torch\.nn\.Module, got str"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_the_librarys_error_or_a_documented_result(case, tmp_path):
    call, expected = CASES[case]
    if isinstance(expected, _Valid):
        assert expected.check(call(tmp_path)), f"{case}: the documented result does not hold"
    elif isinstance(expected, type) and issubclass(expected, BaseException):
        with pytest.raises(expected):
            call(tmp_path)
    else:
        with pytest.raises(AttentionHookerError, match=expected) as info:
            call(tmp_path)
        assert isinstance(info.value, ValueError)
        assert "\n" not in str(info.value), "one readable line"
    assert torch._C._len_torch_function_stack() == 0


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 100
