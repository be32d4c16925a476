"""modapt-bottleneck: bottleneck adapters on the residual path of transformer blocks."""

from modapt import lazy_exports

# imported on first use: the entry module (modapt_bottleneck.plugin) imports this package first
__getattr__, __dir__ = lazy_exports(__name__, {
    "BottleneckAdapter": "adapter", "BottleneckAttachment": "attachment", "BottleneckOptions": "options",
    "build": "attachment", "Site": "sites", "find_blocks": "sites", "sites_of": "sites"})

__all__ = ["BottleneckAdapter", "BottleneckAttachment", "BottleneckOptions", "Site", "build", "find_blocks",
           "sites_of"]
