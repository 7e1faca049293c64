"""Re-param blocks that fuse exactly into one conv, the model zoo, conversion and substitution."""

if not __name__.startswith("repq."):  # one module, one name: `reparam` alone would load a second copy
    raise ImportError(f"import repq.reparam, not {__name__}: repq installs one namespace, `repq`")

from repq.errors import RepqError
from repq.reparam.block import BNTap, ReparamBlock
from repq.reparam.blocks import (
    BLOCKS,
    ACBlock,
    DBBlock,
    ECBlock,
    MobileOneBlock,
    OREPABlock,
    PlainBlock,
    QARepVGGBlock,
    RepVGGBlock,
)
from repq.reparam.convert import convert_convs, fuse_model, substitute_qarepvgg
from repq.reparam.models import create_model, custom_l2, is_super_resolution, list_models, model_doc, model_from_arch

__all__ = [
    "BLOCKS", "ACBlock", "BNTap", "DBBlock", "ECBlock", "MobileOneBlock", "OREPABlock", "PlainBlock", "QARepVGGBlock",
    "RepVGGBlock", "ReparamBlock", "RepqError", "convert_convs", "create_model", "custom_l2", "fuse_model",
    "is_super_resolution", "list_models", "model_doc", "model_from_arch", "substitute_qarepvgg",
]
