"""The cache package: the on-disk contract shared by stage one (dump) and stage two (train).

Stage one and stage two import each other never; both import only from here.
"""
from . import schema
from .manifest import read_manifest

__all__ = ["read_manifest", "schema"]
