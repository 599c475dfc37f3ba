"""Comparing generated text with training text: memorisation, novelty, real words and verse
structure.

Pure text analysis (numpy, the standard library, and wordfreq's word lists for `words`), so that it
runs on any sample file without loading a model. `largecorpus` finds copies of a corpus too large
for `CorpusIndex`, such as a base model's.
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
