"""One module per vision-language family, each registering its reader of image tokens."""

from . import aya_vision  # noqa: F401
from . import blip_2  # noqa: F401
from . import cohere2_vision  # noqa: F401
from . import colpali  # noqa: F401
from . import gemma3  # noqa: F401
from . import got_ocr2  # noqa: F401
from . import idefics3  # noqa: F401
from . import internvl  # noqa: F401
from . import llava  # noqa: F401
from . import llava_next  # noqa: F401
from . import llava_next_video  # noqa: F401
from . import llava_onevision  # noqa: F401
from . import mistral3  # noqa: F401
from . import mllama  # noqa: F401
from . import paligemma  # noqa: F401
from . import pixtral  # noqa: F401
from . import qwen_vl  # noqa: F401
from . import qwen3_vl  # noqa: F401
from . import vipllava  # noqa: F401

__all__: list = []
