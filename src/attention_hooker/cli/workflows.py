"""What the command line does, as functions: one module each (models, capture_runs, outputs,
statistics, head_roles, token_flow); this module gathers their names for the commands."""

from ..errors import CommandError
from .models import (DEMO_PACKAGE, LoadedModel, demo_model_path, load_hf_model, position_limit, to_model_device,
                     token_labels, token_limit, with_article)
from .console import generation_progress, progress_bar
from .capture_runs import (Capture, DEFAULT_DEMO_TEXT, capture_image, capture_text, capture_words, check_words_model,
                           check_words_options)
from .outputs import check_save_path, notable_heads, prepare_out, summary, write_outputs
from .statistics import collect_statistics, write_statistics
from .head_roles import ROLE_COLUMNS, SINK_THRESHOLD, head_roles, write_head_roles, write_head_roles_page
from .token_flow import FLOW_MAX_TOKENS, token_flow, write_token_flow

__all__ = [
    "CommandError", "DEFAULT_DEMO_TEXT", "DEMO_PACKAGE", "demo_model_path", "LoadedModel", "load_hf_model",
    "capture_image", "to_model_device", "Capture", "token_labels", "with_article", "position_limit",
    "generation_progress", "capture_text", "prepare_out", "check_save_path", "write_outputs", "notable_heads",
    "summary", "progress_bar", "token_limit", "collect_statistics", "write_statistics", "ROLE_COLUMNS",
    "SINK_THRESHOLD", "head_roles", "write_head_roles_page", "FLOW_MAX_TOKENS", "token_flow", "write_token_flow",
    "write_head_roles", "capture_words", "check_words_options", "check_words_model",
]
