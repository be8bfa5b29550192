"""dsl-train: the thin trainer of dsl_kernels (issue 7).

Trains MF-BPR, LightGCN and a DLRM-style CTR model with embedding tables that are dense (stock
torch), or block-sparse at a fixed budget with Dynamic Sparse Learning, a static mask, one-shot
magnitude pruning or dense-to-sparse; measures Recall/NDCG@20 or AUC/log-loss, memory and time;
writes a JSON report and PNG plots per run. Command line: ``dsl-train --help``.

Modules: :mod:`.data` (loaders, synthetic generators), :mod:`.models`, :mod:`.methods`,
:mod:`.metrics`, :mod:`.loop`, :mod:`.report`, :mod:`.cli`.

>>> from dsl_train.data import synthetic_implicit
>>> from dsl_train.loop import TrainConfig, run_ranking
>>> from dsl_train.methods import MethodConfig
>>> import tempfile
>>> rep = run_ranking(synthetic_implicit(60, 40, per_user=8),
...                   TrainConfig(epochs=2, dim=16, batch_size=64, progress=False,
...                               out=tempfile.mkdtemp()),
...                   MethodConfig("static", density=0.5, block_size=4))
>>> sorted(rep["final"])
['density', 'ndcg@20', 'recall@20']
"""

__version__ = "0.1.0"
