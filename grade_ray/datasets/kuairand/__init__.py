"""KuaiRand-Pure (Gao et al., CIKM 2022, CC BY-SA 4.0) as logged sessions, and GRADE replayed on it.

Converting raw logs to sessions (``grade-ray data kuairand``), in pipeline order:

- ``dataset``: licence and attribution, the columns read, the label order, the options
- ``raw``: read the log, user and video tables; set bad rows aside with a reason
- ``grouping``: impressions -> requests (user x day, or sessions split at time gaps)
- ``features``: vocabularies fitted on the upstream days; policy context, upstream inputs
- ``upstream``: the multi-task model (MMoE) that scores later days
- ``scoring``: the trained upstream bundle: train, save, load, score (no training days)
- ``sessions``: requests -> session Parquet, split stats, README
- ``convert``: the entry points (``convert_kuairand``, ``convert_more``, ``score_log``)

The end-to-end run (``grade-ray kuairand``):

- ``datadir``: find the files, convert once (reused while the stamp matches), check dates
- ``pipeline``: convert, train Stage 1, GRADE and the ablations, evaluate, write results
- ``metrics``: per-request replay metrics, bootstrap CIs, paired differences
- ``evidence``: list lengths, label sparsity, context, headroom, weight statistics
- ``replay``: every arm's weights on the held-out requests, scored and compared
- ``results_text``: results.md (tables as rows of cells) and the interpretation
- ``commands``: the argparse subcommands (``data kuairand``, ``data kuairand-more``, ``kuairand``)
"""
