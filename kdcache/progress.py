"""Progress bars: kdcache's own are tqdm; the libraries it drives draw their own too."""
from __future__ import annotations


def hide_library_progress_bars() -> None:
    """For --no-progress: also silence transformers' (load/save weights) and datasets' bars."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
