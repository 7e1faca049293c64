"""Re-param blocks that fuse exactly into one conv, the model zoo, conversion and substitution."""

from reparam.block import BNTap, ReparamBlock
from reparam.blocks import (
    BLOCKS,
    ACBlock,
    DBBlock,
    ECBlock,
    OREPABlock,
    PlainBlock,
    QARepVGGBlock,
    RepVGGBlock,
)
from reparam.convert import convert_convs, fuse_model, substitute_qarepvgg
from reparam.errors import RepqError
from reparam.models import create_model, custom_l2, is_super_resolution, list_models, model_doc, model_from_arch

__all__ = [
    "BLOCKS", "ACBlock", "BNTap", "DBBlock", "ECBlock", "OREPABlock", "PlainBlock", "QARepVGGBlock", "RepVGGBlock",
    "ReparamBlock", "RepqError", "convert_convs", "create_model", "custom_l2", "fuse_model", "is_super_resolution",
    "list_models", "model_doc", "model_from_arch", "substitute_qarepvgg",
]
