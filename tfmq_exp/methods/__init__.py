"""PTQ methods as recipes over the quantization core: fp, rtn (and brecq, qdiff, tfmq)."""

from tfmq_exp.methods.base import METHODS, MethodContext, MethodResult, build_recipe, get_method

__all__ = ["METHODS", "MethodContext", "MethodResult", "build_recipe", "get_method"]
