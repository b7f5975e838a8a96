"""picoalign: post-train small language models (data, SFT, DPO, eval, report) in one command."""

__version__ = "0.1.0"
