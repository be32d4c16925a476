"""modapt-bottleneck: bottleneck adapters on the residual path of transformer blocks."""

from .adapter import BottleneckAdapter
from .attachment import BottleneckAttachment, BottleneckOptions, build
from .sites import Site, find_blocks, sites_of

__all__ = ["BottleneckAdapter", "BottleneckAttachment", "BottleneckOptions", "Site", "build", "find_blocks",
           "sites_of"]
