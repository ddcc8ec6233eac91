"""Why did my MoE model answer differently? Record a `transformers` MoE model's run of a request, compare it
with another run of the same request (alone vs in a batch, left vs right padding, another batch size,
dtype or device), and name, for every token whose output moved, the first layer and module where its
bits differ and the cause: padding, arithmetic (reduction order), amplified (a top-k flip at a near tie)
or structural (a capacity router's slot).

    from detmoe.diagnose import record, compare
    alone = record(model, ids[:1])
    batch = record(model, ids, mask)
    print(compare(alone, batch, other_row=0).summary())

The model runs with its own code; forward hooks only read (detmoe/diagnose/trace.py). The model's parts
are found by structure (detmoe/diagnose/structure.py), the causes by the ablation's attribution
(detmoe/lab/attribution.py).
"""
from detmoe.diagnose.compare import CAUSES, Comparison, TokenDivergence, compare
from detmoe.diagnose.structure import Structure, find_structure
from detmoe.diagnose.fingerprint import fingerprint_rows
from detmoe.diagnose.trace import Trace, record, recording

__all__ = ["record", "recording", "compare", "Trace", "Comparison", "TokenDivergence", "CAUSES",
           "find_structure", "Structure", "fingerprint_rows"]
