"""Comparing generated text with training text: memorisation, novelty and verse structure.

Pure text analysis (numpy and the standard library only), so that it runs on any sample file
without loading a model.
"""

from charlstm.analysis.memorisation import (
    CorpusIndex,
    MemorisationReport,
    copied_spans,
    matching_statistics,
    memorisation_report,
    word_ngrams,
)
from charlstm.analysis.structure import (
    StructureStats,
    rhyme_key,
    structure_distance,
    structure_stats,
    total_variation,
)

__all__ = [
    "CorpusIndex",
    "MemorisationReport",
    "StructureStats",
    "copied_spans",
    "matching_statistics",
    "memorisation_report",
    "rhyme_key",
    "structure_distance",
    "structure_stats",
    "total_variation",
    "word_ngrams",
]
