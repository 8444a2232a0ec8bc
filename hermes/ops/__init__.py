"""Kernel front ends: validation, custom ops, autograd and pure-PyTorch references."""

from hermes.ops._extension import capabilities, extension, extension_loaded

__all__ = ["capabilities", "extension", "extension_loaded"]
